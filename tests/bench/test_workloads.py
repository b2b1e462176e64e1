"""Synthetic workloads: valid Mooncake traces, seeded, with the sharing each one promises."""

from __future__ import annotations

import io
import itertools
import json
import math
import re
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pytest

from kvferry.bench import workloads
from kvferry.bench.endpoint.inputs import workload_trace
from kvferry.bench.hitrate import HitRateOptions, load_trace
from kvferry.bench.traces import analyze_trace, read_trace
from kvferry.bench.workloads import WORKLOADS, Record, Tally, generate, write_jsonl
from kvferry.errors import ConfigError

# Small sizes, block sizes that do not divide the lengths, and random lengths where offered, so
# partial blocks and clipping are exercised.
CASES: dict[str, dict[str, Any]] = {
    "prefix-ratio": {
        "requests": 200,
        "num_groups": 3,
        "prefix_ratio": 0.6,
        "isl": 1000,
        "isl_stddev": 400.0,
        "osl_stddev": 50.0,
        "block_tokens": 64,
    },
    "multi-turn": {
        "sessions": 12,
        "turns": 4,
        "system_tokens": 300,
        "user_tokens": 90,
        "user_tokens_stddev": 40.0,
        "osl": 70,
        "osl_stddev": 20.0,
        "block_tokens": 64,
    },
    "agent": {
        "sessions": 8,
        "steps": 6,
        "tools_tokens": 700,
        "tool_result_tokens": 50,
        "tool_result_tokens_stddev": 30.0,
        "osl": 20,
        "block_tokens": 64,
    },
    "long-doc-qa": {
        "documents": 4,
        "doc_tokens": 1000,
        "questions": 6,
        "question_tokens": 30,
        "block_tokens": 64,
    },
}


def text(name: str, **options: Any) -> str:
    out = io.StringIO()
    write_jsonl(generate(name, **options), out)
    return out.getvalue()


def write(tmp_path: Path, name: str, **options: Any) -> Path:
    path = tmp_path / f"{name}.jsonl"
    path.write_text(text(name, **options))
    return path


def fresh_after(records: list[Record]) -> list[set[int]]:
    """Per record, the ids that no earlier record used."""
    seen: set[int] = set()
    out = []
    for r in records:
        out.append(set(r["hash_ids"]) - seen)
        seen.update(r["hash_ids"])
    return out


def test_registry_names_the_four_workloads() -> None:
    assert list(WORKLOADS) == ["prefix-ratio", "multi-turn", "agent", "long-doc-qa"]
    for name, spec in WORKLOADS.items():
        assert spec.name == name and spec.options_type.workload == name
        assert spec.summary and "\n" not in spec.summary and spec.description


@pytest.mark.parametrize("name", list(WORKLOADS))
@pytest.mark.parametrize("options", ["case", "defaults"])
def test_reads_back_with_no_problems(tmp_path: Path, name: str, options: str) -> None:
    values = CASES[name] if options == "case" else {}
    bt = values.get("block_tokens", 512)
    trace = read_trace(write(tmp_path, name, **values), block_tokens=bt, strict=True)
    assert trace.problems == []
    assert len(trace.requests) > 0
    stamps = [r.timestamp_ms for r in trace.requests]
    assert stamps == sorted(stamps)
    lines = (tmp_path / f"{name}.jsonl").read_text().splitlines()
    for line in lines:
        record = json.loads(line)
        assert list(record) == ["timestamp", "input_length", "output_length", "hash_ids"]
        assert isinstance(record["timestamp"], int)
        assert line == json.dumps(record, separators=(",", ":"))


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_same_seed_same_bytes_other_seed_differs(name: str) -> None:
    case = CASES[name]
    assert text(name, **case, seed=7) == text(name, **case, seed=7)
    assert text(name, **case, seed=7) != text(name, **case, seed=8)


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_ids_are_prefix_chains_dense_and_whole_blocks_only(name: str) -> None:
    records = list(generate(name, **CASES[name]))
    bt = CASES[name]["block_tokens"]
    # Equal ids mean equal prefixes: each id always sits at one position after one parent.
    place: dict[int, tuple[int, int]] = {}
    for r in records:
        for pos, h in enumerate(r["hash_ids"]):
            parent = r["hash_ids"][pos - 1] if pos else -1
            assert place.setdefault(h, (pos, parent)) == (pos, parent)
    # Dense: ids first appear as 0, 1, 2, ... in output order.
    first_seen = list(dict.fromkeys(h for r in records for h in r["hash_ids"]))
    assert first_seen == list(range(len(first_seen)))
    # A partial last block is never shared.
    uses = Counter(h for r in records for h in r["hash_ids"])
    for r in records:
        if r["input_length"] % bt:
            assert uses[r["hash_ids"][-1]] == 1


def test_prefix_ratio_groups_share_exactly_their_prefix() -> None:
    isl, bt, ratio = 1000, 64, 0.6
    prefix = math.floor(ratio * isl / bt)  # 9 blocks
    records = list(
        generate(
            "prefix-ratio",
            requests=300,
            num_groups=3,
            prefix_ratio=ratio,
            isl=isl,
            block_tokens=bt,
        )
    )
    uses = Counter(h for r in records for h in r["hash_ids"])
    groups: dict[tuple[int, ...], int] = Counter(tuple(r["hash_ids"][:prefix]) for r in records)
    assert len(groups) == 3  # every group picked, each with one prefix
    assert all(count > 50 for count in groups.values())  # uniform-ish over 300 requests
    for r in records:
        assert len(r["hash_ids"]) == math.ceil(isl / bt)
        assert all(uses[h] == groups[tuple(r["hash_ids"][:prefix])] for h in r["hash_ids"][:prefix])
        assert all(uses[h] == 1 for h in r["hash_ids"][prefix:])  # nothing else is shared
    firsts = [g[0] for g in groups]
    assert len(set(firsts)) == 3  # groups share nothing with each other


def test_prefix_ratio_edges() -> None:
    def hit_rate(**options: Any) -> float:
        return tally_of(generate("prefix-ratio", **options)).ideal_hit_rate

    assert hit_rate(prefix_ratio=0.0, requests=50) == 0.0
    # Ratio 1 with whole blocks: each group's requests are identical.
    assert hit_rate(prefix_ratio=1.0, requests=100, num_groups=2) == 1 - 2 * 8 / (100 * 8)
    # 0.3 of 5120 tokens is 1536 tokens = 3 blocks exactly, not 2 from a float rounding down.
    r = next(generate("prefix-ratio", prefix_ratio=0.3, isl=5120, requests=1))
    second = list(generate("prefix-ratio", prefix_ratio=0.3, isl=5120, requests=40, num_groups=1))
    assert r["hash_ids"][:3] == second[-1]["hash_ids"][:3] == [0, 1, 2]
    assert second[-1]["hash_ids"][3] != 3


def test_prefix_ratio_short_request_shares_only_its_whole_blocks() -> None:
    records = list(
        generate(
            "prefix-ratio",
            requests=400,
            num_groups=1,
            prefix_ratio=1.0,
            isl=1000,
            isl_stddev=500.0,
            block_tokens=64,
        )
    )
    chain = max((r["hash_ids"] for r in records), key=len)
    for r in records:
        shared = min(1000 // 64, r["input_length"] // 64)
        assert r["hash_ids"][:shared] == chain[:shared]
    assert min(r["input_length"] for r in records) < 1000 // 2  # the draw did go short


def tally_of(records: Any) -> Tally:
    tally = Tally()
    for _ in tally.count(records):
        pass
    return tally


def sessions_of(records: list[Record], shared_blocks: int) -> dict[int, list[Record]]:
    """Group records by session: the first id after the shared prefix is its session's own."""
    out: dict[int, list[Record]] = defaultdict(list)
    for r in records:
        out[r["hash_ids"][shared_blocks]].append(r)
    return out


def check_context_growth(
    records: list[Record], *, shared: int, new: int, rounds: int, sessions: int, bt: int
) -> None:
    """Round k's input = round k-1's input + output + ``new``; it reuses round k-1's whole
    blocks and every id after them is new; round 1 starts with the shared prefix's blocks."""
    fresh = {id(r): f for r, f in zip(records, fresh_after(records))}
    groups = sessions_of(records, shared // bt)
    assert len(groups) == sessions
    for turns in groups.values():
        assert len(turns) == rounds
        first = turns[0]
        assert first["input_length"] == shared + new
        assert first["hash_ids"][: shared // bt] == list(range(shared // bt))
        for prev, cur in itertools.pairwise(turns):
            assert cur["timestamp"] >= prev["timestamp"]
            assert cur["input_length"] == prev["input_length"] + prev["output_length"] + new
            keep = prev["input_length"] // bt
            assert cur["hash_ids"][:keep] == prev["hash_ids"][:keep]
            assert fresh[id(cur)] == set(cur["hash_ids"][keep:])


@pytest.mark.parametrize("bt", [64, 512])
def test_multi_turn_each_turn_extends_the_last(bt: int) -> None:
    records = list(
        generate(
            "multi-turn",
            sessions=15,
            turns=5,
            system_tokens=1100,
            user_tokens=600,
            osl=70,
            osl_stddev=30.0,
            think_time=2.0,
            session_rate=3.0,
            block_tokens=bt,
        )
    )
    check_context_growth(records, shared=1100, new=600, rounds=5, sessions=15, bt=bt)
    # Sessions interleave in time (a session comes back after another one), so the merge by
    # timestamp did real work.
    order = [r["hash_ids"][1100 // bt] for r in records]
    runs = [s for i, s in enumerate(order) if i == 0 or order[i - 1] != s]
    assert len(runs) > len(set(runs))


def test_agent_steps_extend_the_context_over_a_shared_tools_prompt() -> None:
    records = list(
        generate("agent", sessions=6, steps=8, tools_tokens=4096, tool_result_tokens=600, osl=40)
    )
    check_context_growth(records, shared=4096, new=600, rounds=8, sessions=6, bt=512)
    assert all(r["hash_ids"][:8] == list(range(8)) for r in records)


def test_conversations_all_at_once_keep_round_order() -> None:
    records = list(generate("multi-turn", sessions=5, turns=4, think_time=0.0, session_rate=0.0))
    assert {r["timestamp"] for r in records} == {0}
    check_context_growth(records, shared=1024, new=512, rounds=4, sessions=5, bt=512)


@pytest.mark.parametrize("order", ["random", "sequential"])
@pytest.mark.parametrize(("doc_tokens", "question_tokens", "bt"), [(1000, 30, 64), (2048, 64, 512)])
def test_long_doc_qa_ideal_hit_rate_matches_the_parameters(
    tmp_path: Path, order: str, doc_tokens: int, question_tokens: int, bt: int
) -> None:
    documents, questions = 5, 7
    path = write(
        tmp_path,
        "long-doc-qa",
        documents=documents,
        questions=questions,
        doc_tokens=doc_tokens,
        question_tokens=question_tokens,
        order=order,
        block_tokens=bt,
    )
    trace = read_trace(path, block_tokens=bt)
    assert trace.problems == []
    per_request = math.ceil((doc_tokens + question_tokens) / bt)
    doc_blocks = doc_tokens // bt
    total = documents * questions * per_request
    distinct = documents * doc_blocks + documents * questions * (per_request - doc_blocks)
    report = analyze_trace(trace)
    assert report["total_blocks"] == total
    assert report["block_weighted_ideal_hit_rate"] == pytest.approx(1 - distinct / total)
    docs = [r.hash_ids[0] for r in trace.requests]
    if order == "sequential":
        assert docs == sorted(docs) and len(set(docs[:questions])) == 1
    else:
        assert docs != sorted(docs)
    assert all(count == questions for count in Counter(docs).values())


def test_rate_zero_puts_all_at_zero_and_rates_move_only_time() -> None:
    base = list(generate("prefix-ratio", requests=100, request_rate=0.0))
    assert {r["timestamp"] for r in base} == {0}
    faster = list(generate("prefix-ratio", requests=100, request_rate=50.0))
    assert [r["hash_ids"] for r in faster] == [r["hash_ids"] for r in base]
    assert faster[0]["timestamp"] == 0 and faster[-1]["timestamp"] > 0
    docs = list(generate("long-doc-qa", request_rate=0.0))
    assert {r["timestamp"] for r in docs} == {0}


def test_poisson_arrivals_average_the_rate() -> None:
    records = list(generate("prefix-ratio", requests=2000, request_rate=10.0, isl=512))
    span_s = records[-1]["timestamp"] / 1000
    assert 1999 / 10 * 0.85 < span_s < 1999 / 10 * 1.15


BAD = [
    ("prefix-ratio", "prefix_ratio", 1.5),
    ("prefix-ratio", "num_groups", 0),
    ("prefix-ratio", "isl", 2.5),
    ("prefix-ratio", "osl", True),
    ("prefix-ratio", "request_rate", -1.0),
    ("prefix-ratio", "request_rate", math.inf),
    ("prefix-ratio", "isl_stddev", "wide"),
    ("multi-turn", "turns", 0),
    ("multi-turn", "think_time", -0.5),
    ("multi-turn", "system_tokens", -1),
    ("agent", "tools_tokens", -1),
    ("agent", "step_delay", math.nan),
    ("long-doc-qa", "order", "shuffled"),
    ("long-doc-qa", "question_tokens", 0),
    ("long-doc-qa", "block_tokens", 0),
    ("agent", "seed", -1),
]


@pytest.mark.parametrize(("name", "option", "value"), BAD)
def test_bad_option_names_option_value_and_what_is_valid(
    name: str, option: str, value: object
) -> None:
    with pytest.raises(ConfigError) as e:
        generate(name, **{option: value})
    message = str(e.value)
    assert name in message and option in message and repr(value) in message
    assert "--" + option.replace("_", "-") in message and "must be" in message


def test_unknown_workload_or_option_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"unknown workload 'chat'.*prefix-ratio"):
        generate("chat")
    with pytest.raises(ConfigError, match=r"no option 'users'.*sessions"):
        generate("multi-turn", users=3)


def test_tally_agrees_with_analyze_trace(tmp_path: Path) -> None:
    case = CASES["multi-turn"]
    tally = tally_of(generate("multi-turn", **case))
    report = analyze_trace(read_trace(write(tmp_path, "multi-turn", **case), block_tokens=64))
    assert tally.requests == report["total_requests"]
    assert (tally.blocks, tally.distinct) == (report["total_blocks"], report["distinct_blocks"])
    assert tally.ideal_hit_rate == pytest.approx(report["block_weighted_ideal_hit_rate"])


def test_write_jsonl_counts_what_it_writes() -> None:
    out = io.StringIO()
    assert write_jsonl(generate("agent", sessions=2, steps=3), out) == 6
    assert out.getvalue().count("\n") == 6 and " " not in out.getvalue()


def _bullet(doc: str, name: str) -> str:
    """The bullet of the module docstring that documents option ``name``, continuation joined."""
    bullets = [b for b in doc.split("\n- ") if b.split(":")[0].count(f"``{name}``")]
    assert len(bullets) == 1, name
    return " ".join(bullets[0].split("\n\n")[0].split())


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_module_docstring_documents_every_option_with_its_default(name: str) -> None:
    doc = workloads.__doc__ or ""
    section = doc.split(f"\n\n``{name}``:")[1].split("\n\n``")[0]
    for info in WORKLOADS[name].option_infos():
        if isinstance(info.default, str):
            assert f"``{info.default}`` (default" in _bullet(section, info.name)
            continue
        default = f"{info.default:g}" if isinstance(info.default, float) else str(info.default)
        if info.common:
            assert f"``{info.name}``" in doc and f"default {default}" in doc
            continue
        bullet = _bullet(section, info.name)
        assert f"default {default}" in bullet or f"stddev {default}" in bullet, bullet
        assert info.help and info.metavar


def test_length_stddev_is_the_spread_of_the_draws() -> None:
    records = list(
        generate("prefix-ratio", requests=2000, isl=4096, isl_stddev=500.0, osl_stddev=0.0)
    )
    isls = [r["input_length"] for r in records]
    assert 4096 - 50 < statistics.mean(isls) < 4096 + 50
    assert 450 < statistics.pstdev(isls) < 550
    assert {r["output_length"] for r in records} == {256}


# -- the one workload-spec parser -----------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class _FlagOptions(workloads.WorkloadOptions):
    """A workload with a boolean option, as a plug-in might add one: ``flagged``."""

    workload: ClassVar[str] = "flagged"

    shared: bool = field(
        default=True, metadata={"metavar": "BOOL", "help": "reuse the prefix", "choices": ()}
    )


def _flagged(options: _FlagOptions) -> Iterator[Record]:
    """Two one-block requests; the second reuses the first's id when ``shared``."""
    yield {"timestamp": 0, "input_length": 1, "output_length": 1, "hash_ids": [0]}
    second = 0 if options.shared else 1
    yield {"timestamp": 1, "input_length": 1, "output_length": 1, "hash_ids": [second]}


@pytest.fixture
def flagged(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = workloads.WorkloadSpec("flagged", "test", "test", _FlagOptions, _flagged)
    monkeypatch.setitem(WORKLOADS, "flagged", spec)


def _both(text: str) -> list[list[int]]:
    """The hash ids of ``--workload text`` as ``bench hitrate`` and ``bench serve`` read it;
    they must agree."""
    lab = load_trace(HitRateOptions(workload=text, block_tokens=1))
    serve = workload_trace(text, 1)
    ids = [r.hash_ids for r in lab.requests]
    assert ids == [r.hash_ids for r in serve.requests], text
    return ids


@pytest.mark.parametrize(
    ("value", "shared"),
    [
        *[(v, False) for v in ("false", "False", "no", "0", "off")],
        *[(v, True) for v in ("true", "YES", "1", "on")],
    ],
)
def test_both_benches_read_a_boolean_alike(flagged: None, value: str, shared: bool) -> None:
    """bench serve read ``shared=false`` as True (``bool("false")``) and bench hitrate read
    ``shared=yes`` as False: one parser now reads both."""
    assert _both(f"flagged:shared={value}") == [[0], [0] if shared else [1]]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("flagged:shared=maybe", "shared must be true or false (1/0, yes/no, on/off), got 'maybe'"),
        ("multi-turn:sessions=2.5", "sessions must be a whole number, got '2.5'"),
        ("multi-turn:think_time=soon", "think_time must be a number, got 'soon'"),
        ("multi-turn:colour=red", "'colour=red' is not KEY=VALUE with KEY one of sessions, turns"),
        ("multi-turn:sessions", "'sessions' is not KEY=VALUE"),
        ("multi-turn:turns=2,turns=3", "turns is given twice"),
        ("long-doc-qa:order=backwards", "order (--order) must be 'random' or 'sequential'"),
        ("chat", "unknown workload 'chat'"),
    ],
)
def test_a_bad_spec_is_a_one_line_error_naming_the_key(
    flagged: None, text: str, fragment: str
) -> None:
    for read in (lambda: workloads.parse_workload(text), lambda: workload_trace(text)):
        with pytest.raises(ConfigError, match=re.escape(fragment)) as caught:
            read()
        assert "\n" not in str(caught.value)


def test_spec_keys_take_dashes_values_spaces_and_defaults_yield() -> None:
    spec, options = workloads.parse_workload(
        "long-doc-qa: documents = 2, question-tokens=8, order= sequential", block_tokens=16
    )
    assert spec.name == "long-doc-qa"
    assert options == workloads.LongDocQAOptions(
        documents=2, question_tokens=8, order="sequential", block_tokens=16
    )
    _, own = workloads.parse_workload("long-doc-qa:block_tokens=32", block_tokens=16)
    assert own.block_tokens == 32  # the spec's own value wins over the caller's default
    assert _both("long-doc-qa:documents=2,questions=3,order= sequential") == _both(
        "long-doc-qa:documents=2,questions=3,order=sequential"
    )
