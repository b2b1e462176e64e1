"""Prompts of the endpoint bench: exact lengths, determinism, and trace blocks that share text
exactly where their hash_ids are equal."""

from __future__ import annotations

import pickle
import random
from pathlib import Path

import pytest

from kvferry.bench.endpoint.inputs import (
    HfCounter,
    PromptFileSource,
    PromptMaker,
    SyntheticSource,
    TraceSource,
    WordCounter,
    workload_trace,
)
from kvferry.bench.traces import ingest
from kvferry.errors import ConfigError


def trace_of(rows: list[tuple[int, int, list[int]]], block: int = 8) -> TraceSource:
    records = (
        (i, {"timestamp": i * 10, "input_length": n, "output_length": o, "hash_ids": ids}, "")
        for i, (n, o, ids) in enumerate(rows, start=1)
    )
    return TraceSource(ingest(records, source="t", block_tokens=block, strict=True), seed=3)


def test_synthetic_prompts_are_exact_fresh_and_deterministic() -> None:
    source = SyntheticSource(isl=300, osl=7, seed=1)
    a, b = source.spec(1, 0), source.spec(1, 1)
    assert a.isl == len(a.prompt.split()) == 300 and a.osl == 7
    assert a.prompt.split()[:32] != b.prompt.split()[:32]  # no shared first block by chance
    assert source.spec(1, 0) == a  # same (salt, index), same request
    assert source.spec(2, 0).prompt != a.prompt  # another level: another prompt
    copy = pickle.loads(pickle.dumps(source))  # as a worker process gets it
    assert copy.spec(1, 0) == a
    varied = SyntheticSource(isl=100, osl=10, isl_stddev=20, osl_stddev=3, seed=0)
    specs = [varied.spec(1, i) for i in range(50)]
    assert len({s.isl for s in specs}) > 10 and all(s.isl == len(s.prompt.split()) for s in specs)
    assert len({s.osl for s in specs}) > 3 and min(s.osl for s in specs) >= 1


def test_long_synthetic_prompt_wraps_the_corpus() -> None:
    maker = PromptMaker(WordCounter(), seed=0)
    text, count = maker.synthetic(random.Random(0), (1 << 18) + 100)
    assert count == len(text.split()) == (1 << 18) + 100


def test_trace_blocks_share_text_exactly_where_hash_ids_are_equal() -> None:
    source = trace_of([(20, 3, [0, 1, 2]), (20, 3, [0, 1, 5]), (13, 2, [0, 7]), (4, 1, [0])])
    s = [source.spec(1, i).prompt.split() for i in range(4)]
    assert [len(w) for w in s] == [20, 20, 13, 4]
    assert s[0][:16] == s[1][:16] and s[0][16:] != s[1][16:]  # ids 0, 1 shared; 2 vs 5
    assert s[2][:8] == s[0][:8] and s[2][8:] != s[0][8:13]  # id 0 shared; 7 is new
    assert s[3] == s[0][:4]  # a cut block is a prefix of the whole block
    assert source.spec(1, 1).conversation == "line-2" and source.spec(1, 1).osl == 3
    other_level = source.spec(2, 0).prompt.split()
    assert other_level[:8] != s[0][:8]  # levels do not share cache contents
    assert source.timestamps_ms() == [0.0, 10.0, 20.0, 30.0]


def test_prompt_file(tmp_path: Path) -> None:
    f = tmp_path / "p.jsonl"
    f.write_text('{"text": "a b c", "timestamp": 100}\n{"texts": ["d", "e f"], "timestamp": 250.5,'
                 ' "output_length": 9, "type": "single_turn"}\n')  # fmt: skip
    source = PromptFileSource(f, osl=4)
    assert source.size == 2 and source.cycles
    assert source.timestamps_ms() == [0.0, 150.5]
    a, b, c = (source.spec(1, i) for i in range(3))
    assert (a.prompt, a.isl, a.osl) == ("a b c", 3, 4)
    assert (b.prompt, b.isl, b.osl, b.conversation) == ("d e f", 3, 9, "entry-2")
    assert c.prompt == a.prompt and c.index == 2  # wraps
    assert pickle.loads(pickle.dumps(source)).spec(2, 1).prompt == "d e f"
    plain = tmp_path / "q.jsonl"
    plain.write_text('{"text": "x"}\n')
    assert PromptFileSource(plain, osl=1).timestamps_ms() is None


@pytest.mark.parametrize(
    ("lines", "match"),
    [
        ("", "has no prompt"),
        ('{"text": "a"}\nnope\n', "line 2: not JSON"),
        ("[" * 100_000 + "\n", "line 1: JSON nested too deeply"),
        ("[1]\n", "line 1: expected a JSON object"),
        ('{"text": "a", "image": "x.png"}\n', "unsupported field\\(s\\) image"),
        ('{"text": ""}\n', 'needs a non-empty string "text"'),
        ('{"text": "a", "texts": ["b"]}\n', "text or texts, not both"),
        ('{"texts": [1]}\n', "texts must be a non-empty list of strings"),
        ('{"text": "a", "output_length": 0}\n', "output_length must be a whole number >= 1"),
        ('{"text": "a", "timestamp": -1}\n', "timestamp must be milliseconds >= 0"),
        ('{"text": "a", "timestamp": 1}\n{"text": "b"}\n', "1 of 2 lines have a timestamp"),
    ],
)
def test_bad_prompt_files(tmp_path: Path, lines: str, match: str) -> None:
    f = tmp_path / "p.jsonl"
    f.write_text(lines)
    with pytest.raises(ConfigError, match=match):
        PromptFileSource(f, osl=4)


def test_workload_trace() -> None:
    trace = workload_trace("prefix-ratio:requests=12,isl=64,osl=4,num_groups=2", 16)
    assert len(trace.requests) == 12 and trace.block_tokens == 16
    assert all(r.input_length == 64 and len(r.hash_ids) == 4 for r in trace.requests)
    for bad, match in (
        ("prefix-ratio:nope=1", "is not KEY=VALUE with KEY one of"),
        ("prefix-ratio:requests=x", "requests must be a whole number"),
        ("nosuch", "unknown workload"),
    ):
        with pytest.raises(ConfigError, match=match):
            workload_trace(bad)


def test_hf_tokenizer_prompts_have_exact_counts(tmp_path: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    from kvferry.bench.endpoint.tokens import lexicon

    words = ["[UNK]", *lexicon()[:300]]
    tok = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]")
    )
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    counter = HfCounter(tmp_path)
    assert 200 <= len(counter.words()) <= 300 and "[UNK]" not in counter.words()
    maker = PromptMaker(counter, seed=0)
    text, count = maker.synthetic(random.Random(1), 77)
    assert count == 77 == counter.count(text)
    source = SyntheticSource(isl=50, osl=5, tokenizer=str(tmp_path))
    assert counter.count(source.spec(1, 3).prompt) == 50
    with pytest.raises(ConfigError, match="no such file or directory"):
        HfCounter(tmp_path / "missing")
