"""A/B of two checkouts of kvferry on one kvferry bench command, in alternating runs.

Runs ``python -m kvferry <bench args> --json FILE`` with PYTHONPATH set to the base checkout and
then to the head checkout (the order swaps every pair: A B, B A, ...), reads one number from each
JSON, and prints each pair's head/base ratio and their median. Both sides run on the same machine
in the same minutes, so drift of a noisy VM lands on both.

    git worktree add /tmp/base 3b5d5cc
    python benchmarks/ab_commits.py --base /tmp/base --head . --pairs 6 \\
        --metric 'phases[phase=read_perf].gbps' --label 'cpu batch-get 4KiB' -- \\
        bench store --backend cpu --op batch-get --value-size 4KiB --duration 2

``--metric`` is a dotted path into the JSON; ``name[key=value]`` picks the list element whose
``key`` equals ``value``; ``PATH|PATH`` takes the first path that resolves (when the two sides
write different JSON layouts, as across the lab's move to one result model).
``--out FILE`` appends a JSON line per run (for BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def pick(doc: Any, path: str) -> float:
    """The number at ``path`` (dotted; ``list[key=value]`` selects an element; ``a|b``: the
    first of the alternatives that resolves)."""
    if "|" in path:
        errors = []
        for alternative in path.split("|"):
            try:
                return pick(doc, alternative)
            except (KeyError, IndexError, StopIteration, TypeError, ValueError) as e:
                errors.append(f"{alternative}: {e!r}")
        raise KeyError("no alternative resolves: " + "; ".join(errors))
    for part in path.split("."):
        if "[" in part:
            name, sel = part[:-1].split("[", 1)
            key, want = sel.split("=", 1)
            items = doc[name] if name else doc
            doc = next(x for x in items if str(x.get(key)) == want)
        elif isinstance(doc, list):
            doc = doc[int(part)]
        else:
            doc = doc[part]
    return float(doc)


def _env(tree: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(tree.resolve())}


def check_tree(tree: Path) -> None:
    """Make sure ``python -m kvferry`` run the way ``run`` runs it imports ``tree``'s package.

    ``-m`` puts the working directory first on sys.path, ahead of PYTHONPATH: run from another
    checkout, both sides would import that checkout and an A/B would be an A/A.
    """
    probe = [sys.executable, "-c", "import kvferry; print(kvferry.__file__)"]
    where = subprocess.run(
        probe, env=_env(tree), cwd=tree, capture_output=True, text=True, check=True
    ).stdout.strip()
    if not Path(where).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"{tree}: python imports kvferry from {where}, not from this checkout")


def run(tree: Path, args: list[str], metric: str) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cmd = [sys.executable, "-m", "kvferry", *args, "--json", str(out)]
        # cwd = the checkout: child processes the bench starts (`-m kvferry ...` targets and
        # servers) inherit it and PYTHONPATH, so they run the same side's code.
        proc = subprocess.run(
            cmd, env=_env(tree), cwd=tree, capture_output=True, text=True, check=False
        )
        if proc.returncode != 0 or not out.exists():
            raise SystemExit(f"{' '.join(cmd)} (in {tree}) failed:\n{proc.stderr[-2000:]}")
        return pick(json.loads(out.read_text()), metric)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, required=True, help="the reference checkout")
    parser.add_argument("--head", type=Path, default=Path("."), help="the checkout under test")
    parser.add_argument("--pairs", type=int, default=6)
    parser.add_argument("--metric", required=True, help="dotted path of the number in the JSON")
    parser.add_argument("--lower-is-better", action="store_true")
    parser.add_argument("--label", default="")
    parser.add_argument("--out", type=Path, help="append one JSON line per run here")
    parser.add_argument("bench", nargs=argparse.REMAINDER, help="-- then the kvferry arguments")
    a = parser.parse_args()
    args = a.bench[1:] if a.bench[:1] == ["--"] else a.bench
    check_tree(a.base)
    check_tree(a.head)
    ratios: list[float] = []
    for i in range(a.pairs):
        order = [("base", a.base), ("head", a.head)]
        if i % 2:
            order.reverse()
        got = {name: run(tree, args, a.metric) for name, tree in order}
        ratio = got["head"] / got["base"]
        ratios.append(ratio)
        base, head = got["base"], got["head"]
        print(f"pair {i + 1}: base {base:.4g}  head {head:.4g}  head/base {ratio:.3f}")
        if a.out:
            with a.out.open("a") as f:
                row = {"label": a.label, "pair": i + 1, "metric": a.metric, **got}
                f.write(json.dumps(row) + "\n")
    med = statistics.median(ratios)
    print(
        f"{a.label or ' '.join(args)}: head/base median {med:.3f} "
        f"(range {min(ratios):.3f}-{max(ratios):.3f}, {a.pairs} pairs"
        f"{', lower is better' if a.lower_is_better else ''})"
    )


if __name__ == "__main__":
    main()
