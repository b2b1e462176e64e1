"""Request traces in the Mooncake format: reading, validating and analysing them.

A trace is JSON Lines, one request per line: ``timestamp`` (ms since the start), ``input_length``
and ``output_length`` (tokens) and ``hash_ids``, one id per ``block_tokens``-token block of the
prompt, where equal ids mean equal blocks *and* equal prefixes before them (Mooncake FAST'25,
Dynamo and aiperf all write this format). :func:`read_trace` validates every record at the edge
and says which line was wrong; :func:`analyze_trace` computes what ``aiperf analyze-trace``
prints, with aiperf's definitions, so the two agree number for number.

Hit rates here are for an infinite cache. Two definitions appear and are always labelled:

- ``cache_hit_rate`` (aiperf's): the MEAN over requests with any hash_ids of each request's
  leading-hit fraction (ids before the first id not seen in an earlier request, over its ids).
- ``block_weighted_ideal_hit_rate`` (kvferry's headline definition, a ratio of sums):
  ``1 - distinct ids / ids referenced``.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvferry.errors import KvferryError

DEFAULT_BLOCK_TOKENS = 512
"""Tokens per hash id unless told otherwise (Mooncake's traces and aiperf's default)."""

MAX_HASH_ID = (1 << 64) - 1
"""Ids are stored as 8-byte keys; larger ones are refused at the edge."""

FIELDS = ("timestamp", "input_length", "output_length", "hash_ids")

BUNDLED = {
    "mooncake-synthetic": "mooncake_synthetic_trace.jsonl",
    "aiperf-parity": "aiperf_parity_trace.jsonl",
    "mooncake-fig9": "mooncake_fig9.csv",
}
"""Data shipped in ``kvferry/data/traces`` (see its README), by the name commands accept."""


def bundled_path(name: str) -> str:
    """The file of a bundled trace or curve (``BUNDLED`` names or its file names)."""
    from importlib.resources import files

    return str(files("kvferry").joinpath("data", "traces", BUNDLED.get(name, name)))


def resolve_trace(spec: str) -> str:
    """A path as given, or the bundled file when ``spec`` is one of ``BUNDLED``'s names and no
    such file exists here."""
    if spec in BUNDLED and not os.path.exists(spec):
        return bundled_path(spec)
    return spec


class TraceError(KvferryError):
    """A trace cannot be read, or (``strict``) one of its records is bad."""


@dataclass(frozen=True, slots=True)
class TraceRequest:
    """One request of a trace, as read and validated."""

    line: int
    """1-based line in the file."""
    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: list[int]


@dataclass(frozen=True, slots=True)
class Problem:
    """A record that was skipped (or kept, for length mismatches under ``keep_mismatched``)."""

    line: int
    message: str
    kept: bool = False

    def __str__(self) -> str:
        return f"line {self.line}: {self.message}" + (" (kept)" if self.kept else "")


@dataclass
class Trace:
    """The valid requests of a trace file and what was wrong with the others."""

    path: str
    block_tokens: int
    requests: list[TraceRequest]
    problems: list[Problem] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return sum(1 for p in self.problems if not p.kept)

    def require_requests(self) -> None:
        """Raise TraceError when no record was valid (the message shows the first problem)."""
        if self.requests:
            return
        first = f"; first: {self.problems[0]}" if self.problems else ""
        raise TraceError(
            f"{self.path}: no valid request ({len(self.problems)} record(s) skipped{first})"
        )

    @property
    def total_blocks(self) -> int:
        return sum(len(r.hash_ids) for r in self.requests)

    @property
    def total_tokens(self) -> int:
        return sum(r.input_length for r in self.requests)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_record(record: Any, block_tokens: int) -> tuple[str, bool]:
    """What is wrong with one parsed record: ``("", False)`` when nothing is, else the message
    and whether it is only a length mismatch (which ``keep_mismatched`` lets through)."""
    if not isinstance(record, dict):
        return f"a record must be a JSON object, got {type(record).__name__}", False
    missing = [f for f in FIELDS if f not in record]
    if missing:
        return f"missing field(s) {', '.join(missing)}; a record needs {', '.join(FIELDS)}", False
    ts = record["timestamp"]
    if isinstance(ts, bool) or not isinstance(ts, int | float) or not math.isfinite(ts) or ts < 0:
        return f"timestamp must be a number of ms >= 0, got {ts!r}", False
    for name in ("input_length", "output_length"):
        v = record[name]
        if not _whole(v) or v < 0:
            return f"{name} must be a whole number of tokens >= 0, got {v!r}", False
    ids = record["hash_ids"]
    if not isinstance(ids, list):
        return f"hash_ids must be a list of ids, got {type(ids).__name__}", False
    for i, h in enumerate(ids):
        if not _whole(h) or not 0 <= h <= MAX_HASH_ID:
            return f"hash_ids[{i}] must be a whole number in [0, 2**64), got {h!r}", False
    want = -(-record["input_length"] // block_tokens)
    if len(ids) != want:
        return (
            f"{len(ids)} hash_ids, but input_length {record['input_length']} needs {want} at "
            f"{block_tokens} tokens per block (see --block-tokens, --keep-mismatched)"
        ), True
    return "", False


def iter_records(path: str) -> Iterator[tuple[int, Any, str]]:
    """``(line number, parsed record or None, JSON error message)`` per non-blank line.

    Raises:
        TraceError: the file cannot be opened or is not UTF-8 text.
    """
    try:
        f = open(path, encoding="utf-8")  # noqa: SIM115 (closed below; a generator owns it)
    except OSError as e:
        raise TraceError(
            f"cannot open trace {path!r}: {e.strerror or e} (bundled traces: "
            f"{', '.join(k for k in BUNDLED if k.endswith(('synthetic', 'parity')))})"
        ) from e
    with f:
        try:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as e:
                    yield number, None, f"not valid JSON ({e})"
                    continue
                except RecursionError:  # json recurses per level; a record is two deep
                    yield number, None, "not a record: JSON nested too deeply to read"
                    continue
                yield number, record, ""
        except UnicodeDecodeError as e:
            raise TraceError(f"{path}: not UTF-8 text ({e}); a trace is JSON Lines") from e


def read_trace(
    path: str | os.PathLike[str],
    *,
    block_tokens: int = DEFAULT_BLOCK_TOKENS,
    strict: bool = False,
    keep_mismatched: bool = False,
) -> Trace:
    """Read and validate a Mooncake-format trace.

    Args:
        path: the JSONL file.
        block_tokens: tokens per hash id; ``len(hash_ids)`` must be
            ``ceil(input_length / block_tokens)``.
        strict: raise on the first bad record instead of skipping it.
        keep_mismatched: keep records whose only fault is a hash_ids length that does not match
            input_length (aiperf keeps them); they are still listed as problems, marked kept.

    Raises:
        TraceError: the file cannot be read, ``block_tokens`` < 1, or (``strict``) a record is
            bad; the message names the file and line.
    """
    path = resolve_trace(os.fspath(path))
    return ingest(
        iter_records(path),
        source=path,
        block_tokens=block_tokens,
        strict=strict,
        keep_mismatched=keep_mismatched,
    )


def ingest(
    records: Iterable[tuple[int, Any, str]],
    *,
    source: str,
    block_tokens: int = DEFAULT_BLOCK_TOKENS,
    strict: bool = False,
    keep_mismatched: bool = False,
) -> Trace:
    """Validate ``(line number, record, JSON error)`` triples into a :class:`Trace` (the
    options as for :func:`read_trace`; a generated workload comes in this way too)."""
    if block_tokens < 1:
        raise TraceError(f"block_tokens must be >= 1, got {block_tokens}")
    requests: list[TraceRequest] = []
    problems: list[Problem] = []
    for number, record, json_error in records:
        if json_error:
            message, mismatch = json_error, False
        else:
            message, mismatch = check_record(record, block_tokens)
        if message:
            kept = mismatch and keep_mismatched
            if strict and not kept:
                raise TraceError(f"{source}:{number}: {message}")
            problems.append(Problem(number, message, kept))
            if not kept:
                continue
        requests.append(
            TraceRequest(
                line=number,
                timestamp_ms=float(record["timestamp"]),
                input_length=record["input_length"],
                output_length=record["output_length"],
                hash_ids=record["hash_ids"],
            )
        )
    return Trace(path=source, block_tokens=block_tokens, requests=requests, problems=problems)


def workload_trace(spec_text: str, block_tokens: int = DEFAULT_BLOCK_TOKENS) -> Trace:
    """The trace of a generated workload ``NAME[:KEY=VALUE,...]`` (see ``kvferry workload``),
    its spec read by :func:`kvferry.bench.workloads.parse_workload`; ``block_tokens`` is the
    default of the spec's own ``block_tokens=``. The hit-rate lab and ``bench serve`` both read
    ``--workload`` here.

    Raises:
        ConfigError: an unknown workload or key, or a bad value (one line naming the key and
            what it accepts).
    """
    from kvferry.bench.workloads import parse_workload  # workloads imports this module

    spec, options = parse_workload(spec_text, block_tokens=block_tokens)
    return ingest(
        ((i, r, "") for i, r in enumerate(spec.generator(options), start=1)),
        source=f"workload {spec_text}",
        block_tokens=options.block_tokens,
        strict=True,
    )


# -- analysis (aiperf analyze-trace, same definitions) -------------------------------------------

STAT_KEYS = ("mean", "std_dev", "min", "p25", "median", "p75", "max")


def metric_stats(values: list[float] | list[int]) -> dict[str, float] | None:
    """Mean, population std, min, p25, median, p75 and max (linear percentiles); None if empty."""
    if not values:
        return None
    a = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(np.mean(a)),
        "std_dev": float(np.std(a)),
        "min": float(np.min(a)),
        "p25": float(np.percentile(a, 25)),
        "median": float(np.median(a)),
        "p75": float(np.percentile(a, 75)),
        "max": float(np.max(a)),
    }


def analyze_trace(trace: Trace) -> dict[str, Any]:
    """What ``aiperf analyze-trace`` reports, plus kvferry's block-weighted figures.

    Definitions (aiperf's, so that the numbers match):

    - ``unique_prefixes``: distinct id sequences ``hash_ids[:i]`` over all requests and i >= 1;
      ``prefix_reuse_ratio``: occurrences of prefixes seen more than once over all occurrences.
    - ``num_prefix_groups``: distinct first ids shared by two or more requests.
    - ``context_length`` of a request: ``input_length`` when every (position, id) pair of it
      occurs in another request too, else ``block_tokens`` times the number of such pairs;
      ``unique_prompt_length`` = ``input_length - context_length`` (negative when the trace's
      lengths and ids disagree, as aiperf reports it).
    - ``cache_hit_rate``: per-request mean leading-hit fraction with an infinite cache.

    Prefixes are counted in a trie (node = (parent, id)), so memory grows with the ids
    referenced, not with the square of the request length.
    """
    reqs = trace.requests
    bt = trace.block_tokens
    isls = [r.input_length for r in reqs]
    osls = [r.output_length for r in reqs]
    nodes: dict[tuple[int, int], int] = {}  # (parent node, id) -> node
    counts: list[int] = []
    pairs: Counter[tuple[int, int]] = Counter()
    first_ids: Counter[int] = Counter()
    for r in reqs:
        ids = r.hash_ids
        if not ids:
            continue
        first_ids[ids[0]] += 1
        parent = -1
        for pos, h in enumerate(ids):
            node = nodes.get((parent, h))
            if node is None:
                node = nodes[(parent, h)] = len(counts)
                counts.append(0)
            counts[node] += 1
            parent = node
            pairs[(pos, h)] += 1

    context: list[int] = []
    unique_prompt: list[int] = []
    for r in reqs:
        ids = r.hash_ids
        if not ids:
            context.append(0)
            unique_prompt.append(r.input_length)
            continue
        repeated = sum(1 for pos, h in enumerate(ids) if pairs[(pos, h)] > 1)
        ctx = r.input_length if repeated == len(ids) else repeated * bt
        context.append(ctx)
        unique_prompt.append(r.input_length - ctx)

    seen: set[int] = set()
    per_request: list[float] = []
    hit_blocks = total_blocks = hit_tokens = 0
    for r in reqs:
        ids = r.hash_ids
        if not ids:
            continue
        lead = 0
        for h in ids:
            if h not in seen:
                break
            lead += 1
        per_request.append(lead / len(ids))
        hit_blocks += lead
        total_blocks += len(ids)
        hit_tokens += min(lead * bt, r.input_length)
        seen.update(ids)
    distinct = len(seen)
    total = sum(counts)
    reused = sum(c for c in counts if c > 1)
    tokens = sum(isls)
    return {
        "total_requests": len(reqs),
        "unique_prefixes": len(counts),
        "num_prefix_groups": sum(1 for c in first_ids.values() if c > 1),
        "cache_hit_rate": statistics.mean(per_request) if per_request else 0.0,
        "min_isl": min(isls) if isls else 0,
        "max_isl": max(isls) if isls else 0,
        "avg_isl": sum(isls) / len(isls) if isls else 0.0,
        "min_osl": min(osls) if osls else 0,
        "max_osl": max(osls) if osls else 0,
        "avg_osl": sum(osls) / len(osls) if osls else 0.0,
        "prefix_reuse_ratio": reused / total if total else 0.0,
        "isl_stats": metric_stats(isls),
        "osl_stats": metric_stats(osls),
        "context_length_stats": metric_stats(context),
        "unique_prompt_length_stats": metric_stats(unique_prompt),
        "hit_rate_stats": metric_stats(per_request),
        # kvferry's additions, labelled: ratios of sums with an infinite cache
        "block_tokens": bt,
        "total_blocks": total_blocks,
        "distinct_blocks": distinct,
        "block_weighted_ideal_hit_rate": 1.0 - distinct / total_blocks if total_blocks else 0.0,
        "block_weighted_prefix_hit_rate": hit_blocks / total_blocks if total_blocks else 0.0,
        "token_weighted_prefix_hit_rate": hit_tokens / tokens if tokens else 0.0,
        "records_skipped": trace.skipped,
        "records_kept_with_problems": sum(1 for p in trace.problems if p.kept),
    }
