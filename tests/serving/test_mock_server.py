"""``kvferry serve mock`` for real: a server process on a free port, spoken to over HTTP.

Servers run with a high ``--speedup-ratio`` so the suite is fast; timing is checked on the
numbers the timing model computed (``kvferry_mock_model_seconds_total``), never on wall-clock
time. Prompts are token-id lists from seeded generators, so block boundaries are exact and tests
sharing a server never share a prefix by accident.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import re
import socket
import sys
import threading
import time
import urllib.error
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvferry.cli.main import main
from kvferry.config import load_config
from kvferry.config.models import MockConfig
from kvferry.errors import MissingDependency
from kvferry.index.hashing import BlockHasher
from kvferry.serving.mock.openai_api import CompletionFormatter, ParsedRequest, data_line
from kvferry.serving.mock.scheduler import MockEngine, MockRequest, SamplingParams
from kvferry.serving.mock.timing import TimingModel
from kvferry.serving.mock.tokenizer import WordTokenizer, load_tokenizer
from kvferry.testing.mock_engine import KvEventReader, MockServerProcess

MODEL = "kvferry-mock"
BS = 16
VOCAB = 128256


def ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(VOCAB) for _ in range(n)]


def block_hashes(tokens: list[int], model: str = MODEL) -> list[str]:
    return [h.hex() for h in BlockHasher(BS, model_name=model).hashes(tokens)]


@pytest.fixture(scope="module")
def server() -> Iterator[MockServerProcess]:
    with MockServerProcess.start(
        "--speedup-ratio", "1000", "--num-blocks", "1024", "--max-model-len", "2048"
    ) as s:
        yield s


# --- OpenAI formats ---------------------------------------------------------------------------


def test_streaming_completion_chunks_and_usage(server: MockServerProcess) -> None:
    words = " ".join(f"w{i}" for i in range(20))  # the word tokenizer: 20 tokens
    body = {
        "model": MODEL,
        "prompt": words,
        "max_tokens": 5,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    chunks = server.stream("/v1/completions", body)
    assert chunks[-1] == "[DONE]"
    tokens, usage = chunks[:-2], chunks[-2]
    assert len(tokens) == 5
    for i, chunk in enumerate(tokens):
        assert chunk["object"] == "text_completion" and chunk["model"] == MODEL
        assert chunk["id"] == tokens[0]["id"] and chunk["id"].startswith("cmpl-")
        (choice,) = chunk["choices"]
        assert choice["index"] == 0 and choice["text"].startswith(" ")
        assert choice["finish_reason"] == ("length" if i == 4 else None)
        assert chunk["usage"] is None
    assert usage["choices"] == []
    assert usage["usage"] == {
        "prompt_tokens": 20,
        "completion_tokens": 5,
        "total_tokens": 25,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    # Deterministic: the same prompt gives the same text, streamed or not.
    whole = server.complete(words, 5, ignore_eos=True)
    assert whole["choices"][0]["text"] == "".join(c["choices"][0]["text"] for c in tokens)
    assert whole["usage"]["prompt_tokens_details"]["cached_tokens"] == 16  # one block hit


def test_streaming_chat_chunks(server: MockServerProcess) -> None:
    body = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "hello there"}]},
        ],
        "max_tokens": 3,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,
    }
    chunks = server.stream("/v1/chat/completions", body)
    assert [c == "[DONE]" for c in chunks] == [False] * 5 + [True]
    role, *tokens, usage, _ = chunks
    assert role["object"] == "chat.completion.chunk" and role["id"].startswith("chatcmpl-")
    assert role["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert len(tokens) == 3
    assert all(len(c["choices"][0]["token_ids"]) == 1 for c in tokens)
    assert [c["choices"][0]["finish_reason"] for c in tokens] == [None, None, "length"]
    # <|system|> be brief / <|user|> hello there / <|assistant|>: 7 words.
    assert usage["usage"]["prompt_tokens"] == 7
    assert usage["usage"]["completion_tokens"] == 3
    assert len(role["prompt_token_ids"]) == 7


def test_non_streaming_chat_and_max_tokens(server: MockServerProcess) -> None:
    reply = server.post(
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "count"}], "max_completion_tokens": 9},
    )
    assert reply.status == 200
    body = reply.body
    assert body["object"] == "chat.completion"
    message = body["choices"][0]["message"]
    assert message["role"] == "assistant" and len(message["content"].split()) == 9
    assert body["usage"]["completion_tokens"] == 9
    assert body["choices"][0]["finish_reason"] == "length"


def test_answers_stop_on_their_own_unless_ignore_eos_and_min_tokens_holds_them(
    server: MockServerProcess,
) -> None:
    prompt = ids(1, 10)
    natural = server.complete(prompt, 2000)
    n = natural["usage"]["completion_tokens"]
    assert natural["choices"][0]["finish_reason"] == "stop" and 16 <= n <= 512
    held = server.complete(prompt, 2000, min_tokens=n + 7)
    assert held["usage"]["completion_tokens"] == n + 7
    assert held["choices"][0]["finish_reason"] == "stop"
    forced = server.complete(prompt, n + 20, ignore_eos=True)
    assert forced["usage"]["completion_tokens"] == n + 20
    assert forced["choices"][0]["finish_reason"] == "length"
    # The forced answer continues the natural one.
    assert forced["choices"][0]["text"].startswith(natural["choices"][0]["text"])


def test_models_health_and_token_id_prompts(server: MockServerProcess) -> None:
    models = server.get("/v1/models").body
    assert models["object"] == "list"
    assert models["data"][0]["id"] == MODEL and models["data"][0]["max_model_len"] == 2048
    assert server.get("/health").body["status"] == "ok"
    body = server.complete(ids(2, 33), 1, return_token_ids=True)
    assert body["usage"]["prompt_tokens"] == 33
    assert body["prompt_token_ids"] == ids(2, 33)
    assert len(body["choices"][0]["token_ids"]) == 1


# --- the KV cache through HTTP ----------------------------------------------------------------


def test_repeated_prompt_hits_all_its_blocks(server: MockServerProcess) -> None:
    prompt = ids(3, 64)  # 4 full blocks
    before = server.kv_stats()
    server.complete(prompt, 1)
    again = server.complete(prompt, 1)
    after = server.kv_stats()
    assert after["lookup_blocks"] - before["lookup_blocks"] == 8
    assert after["hit_blocks"] - before["hit_blocks"] == 4
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] == 64
    assert after["block_size"] == BS and after["num_blocks"] == 1024


def test_shared_prefix_hits_only_its_blocks(server: MockServerProcess) -> None:
    a = ids(4, 64)
    b = a[:40] + ids(5, 24)  # shares 2 full blocks and half of the third
    server.complete(a, 1)
    before = server.kv_stats()
    body = server.complete(b, 1)
    after = server.kv_stats()
    assert after["hit_blocks"] - before["hit_blocks"] == 2
    assert after["lookup_blocks"] - before["lookup_blocks"] == 4
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 32


def test_metrics_count_tokens_blocks_and_every_response(server: MockServerProcess) -> None:
    before = server.metrics()
    server.complete(ids(6, 20), 4, ignore_eos=True)
    server.post("/v1/completions", {"prompt": ""})
    after = server.metrics()

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta("kvferry_mock_prompt_tokens_total") == 20
    assert delta("kvferry_mock_generated_tokens_total") == 4
    assert delta("kvferry_mock_prompt_blocks_total") == 1
    assert delta('kvferry_mock_requests_total{finish_reason="length"}') == 1
    assert delta('kvferry_mock_http_responses_total{path="/v1/completions",status="200"}') == 1
    assert delta('kvferry_mock_http_responses_total{path="/v1/completions",status="400"}') == 1
    assert delta('kvferry_mock_http_responses_total{path="/metrics",status="200"}') == 1
    assert after['vllm:num_requests_running{model_name="kvferry-mock"}'] == 0
    assert "kvferry_mock_kv_usage" in after


def test_eviction_and_kv_events_match_block_hashes() -> None:
    # 8 blocks of 16 tokens: max_model_len defaults to the capacity, 128 tokens.
    with MockServerProcess.start("--num-blocks", "8", "--speedup-ratio", "1000") as s:
        a, b = ids(10, 48), ids(11, 100)
        ha, hb = block_hashes(a), block_hashes(b)
        with s.events() as events:
            assert events.next() == {"id": 0, "type": "snapshot", "block_size": BS, "blocks": []}
            s.complete(a, 1)  # 3 blocks published
            s.complete(b, 1)  # 7 blocks: 5 free + a's last two, evicted tail first
            s.complete(a, 1)  # a's first block hits; 3 more: 1 free + b's last two
            seen = [events.next() for _ in range(5)]
        assert seen == [
            {
                "id": 1,
                "type": "stored",
                "block_hashes": ha,
                "parent_hash": None,
                "token_count": 48,
                "block_size": BS,
            },
            {"id": 2, "type": "removed", "block_hashes": [ha[2], ha[1]]},
            {
                "id": 3,
                "type": "stored",
                "block_hashes": hb,
                "parent_hash": None,
                "token_count": 96,
                "block_size": BS,
            },
            {"id": 4, "type": "removed", "block_hashes": [hb[5], hb[4]]},
            {
                "id": 5,
                "type": "stored",
                "block_hashes": ha[1:],
                "parent_hash": ha[0],
                "token_count": 32,
                "block_size": BS,
            },
        ]
        stats = s.kv_stats()
        assert stats["hit_blocks"] == 1 and stats["lookup_blocks"] == 3 + 6 + 3
        assert stats["evicted_blocks"] == 4 and stats["last_event_id"] == 5
        # A late subscriber gets a snapshot of what is cached; a resuming one, the missed events.
        with s.events() as late:
            snapshot = late.next()
        assert snapshot["id"] == 5
        assert {blk["hash"] for blk in snapshot["blocks"]} == set(ha + hb[:4])
        with s.events(since=3) as resumed:
            assert [resumed.next()["id"], resumed.next()["id"]] == [4, 5]
        s.post("/kv/clear", {})
        assert s.complete(a, 1)["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert s.stop() == 0


def test_speedup_ratio_shortens_the_modelled_times(server: MockServerProcess) -> None:
    # The module's server runs at --speedup-ratio 1000: every step it models takes 1/1000 of
    # what the default timing model gives. One request at a time, so the batches are known.
    prompts = [ids(20 + i, 40 + 10 * i) for i in range(3)]
    before = server.metrics()
    for prompt in prompts:
        server.complete(prompt, 2, ignore_eos=True)  # a prefill, then one decode step
    after = server.metrics()

    def modelled(phase: str) -> float:
        name = f'kvferry_mock_model_seconds_total{{phase="{phase}"}}'
        return after[name] - before[name]

    t = TimingModel()
    prefill = sum(t.prefill_ms([(len(p), 0)]) for p in prompts) / 1000
    decode = sum(t.decode_ms(1, len(p) + 1) for p in prompts) / 1000
    assert modelled("prefill") == pytest.approx(prefill / 1000)
    assert modelled("decode") == pytest.approx(decode / 1000)
    assert TimingModel(speedup_ratio=1000).prefill_ms([(40, 0)]) * 1000 == pytest.approx(
        t.prefill_ms([(40, 0)])
    )


# --- auth and bad requests --------------------------------------------------------------------


def test_auth_token_is_required_everywhere_but_health() -> None:
    with MockServerProcess.start("--speedup-ratio", "1000", token="s3cret") as s:
        assert s.get("/health", token="").status == 200
        for path in ("/v1/models", "/metrics", "/kv/stats"):
            denied = s.get(path, token="")
            assert denied.status == 401, path
            assert denied.body["error"]["type"] == "authentication_error"
            assert s.get(path, token="wrong").status == 401
            assert s.get(path).status == 200
        assert s.post("/v1/completions", {"prompt": "a"}, token="").status == 401
        assert s.complete("a b", 1)["usage"]["completion_tokens"] == 1
        with pytest.raises(RuntimeError, match="401"):
            KvEventReader(s.host, s.port, "/kv/events", token=None, timeout=5)
        with s.events() as events:
            assert events.next()["type"] == "snapshot"
        assert s.metrics()['kvferry_mock_http_responses_total{path="/kv/stats",status="401"}'] == 2


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/v1/completions", b"{nope", 400, "not valid JSON"),
        ("/v1/completions", b"[1, 2]", 400, "must be a JSON object"),
        ("/v1/completions", {"max_tokens": 3}, 400, "prompt is required"),
        ("/v1/completions", {"prompt": ""}, 400, "prompt is empty"),
        ("/v1/completions", {"prompt": []}, 400, "prompt is empty"),
        ("/v1/completions", {"prompt": 5}, 400, "must be a string or a list of token ids"),
        ("/v1/completions", {"prompt": ["a", "b"]}, 400, "batched prompts"),
        ("/v1/completions", {"prompt": [1, -2]}, 400, "prompt[1] = -2 is not a token id"),
        ("/v1/completions", {"prompt": [VOCAB]}, 400, f"ids are in [0, {VOCAB})"),
        ("/v1/completions", {"prompt": [1, "x"]}, 400, "prompt[1] must be an integer"),
        ("/v1/completions", {"prompt": "a", "max_tokens": 0}, 400, "max_tokens must be at least 1"),
        ("/v1/completions", {"prompt": "a", "max_tokens": "5"}, 400, "must be an integer"),
        ("/v1/completions", {"prompt": [1] * 2048}, 400, "the prompt is 2048 tokens"),
        ("/v1/completions", {"prompt": [1] * 2000, "max_tokens": 100}, 400, "asks for 2100"),
        (
            "/v1/completions",
            {"prompt": "a", "max_tokens": 2, "min_tokens": 3},
            400,
            "min_tokens (3) must not exceed max_tokens (2)",
        ),
        ("/v1/completions", {"prompt": "a", "stream_options": {}}, 400, "only allowed with"),
        ("/v1/completions", {"prompt": "a", "n": 2}, 400, "n must be 1"),
        ("/v1/completions", {"prompt": "a", "stream": "yes"}, 400, "stream must be true or false"),
        ("/v1/completions", {"prompt": "a", "logprobs": 2}, 400, "logprobs is not supported"),
        ("/v1/completions", {"prompt": "a", "cache_salt": ""}, 400, "cache_salt must be"),
        # A lone UTF-16 surrogate (valid JSON, not valid Unicode) is the client's mistake.
        ("/v1/completions", b'{"prompt": "a \\ud800 b"}', 400, "prompt is not valid Unicode"),
        (
            "/v1/completions",
            b'{"prompt": "a", "cache_salt": "\\udfff"}',
            400,
            "cache_salt is not valid Unicode",
        ),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "x \\ud800"}]}',
            400,
            "messages is not valid Unicode",
        ),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "\\ud800", "content": "x"}]}',
            400,
            "messages is not valid Unicode",
        ),
        ("/v1/completions", b"[" * 100_000, 400, "nested too deeply"),
        ("/v1/completions", {"prompt": "a", "model": "gpt-9"}, 404, "'gpt-9' does not exist"),
        ("/v1/chat/completions", {"prompt": "a"}, 400, "messages is required"),
        ("/v1/chat/completions", {"messages": [{"content": "x"}]}, 400, "role must be"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            400,
            "takes text only",
        ),
        ("/v1/nothing", {"prompt": "a"}, 404, "POST /v1/nothing not found"),
    ],
)
def test_bad_requests_get_openai_errors(
    server: MockServerProcess, path: str, body: object, status: int, message: str
) -> None:
    raw = body if isinstance(body, bytes) else None
    reply = server.request("POST", path, None if raw else body, raw=raw)
    assert reply.status == status, reply.text
    error = reply.body["error"]
    assert message in error["message"]
    assert error["code"] == status and error["type"]
    assert server.get("/health").status == 200


def test_bad_since_and_wrong_method(server: MockServerProcess) -> None:
    reply = server.get("/kv/events?since=-3")
    assert reply.status == 400 and "since must be a non-negative" in reply.body["error"]["message"]
    reply = server.get("/v1/completions")
    assert reply.status == 405 and "GET is not allowed" in reply.body["error"]["message"]


def test_a_huge_prompt_is_tokenized_off_the_event_loop() -> None:
    """While a prompt of millions of words is tokenized (then refused: longer than
    max_model_len), /health keeps answering: its longest silence is a fraction of the time the
    big request took, where the tokenizer used to hold the event loop for all of it."""
    text = " ".join(f"w{i % 1000}" for i in range(1_500_000))
    with MockServerProcess.start(
        "--speedup-ratio",
        "1000",
        "--set",
        "mock.max_body_size=64MiB",
        "--set",
        "mock.max_prompt_chars=100000000",
    ) as s:
        answered: list[float] = []
        done = threading.Event()

        def poll() -> None:
            while not done.is_set():
                if s.get("/health", timeout=30).status == 200:
                    answered.append(time.monotonic())

        poller = threading.Thread(target=poll)
        poller.start()
        time.sleep(0.2)
        start = time.monotonic()
        reply = s.post("/v1/completions", {"prompt": text, "max_tokens": 1})
        took = time.monotonic() - start
        done.set()
        poller.join()
    assert reply.status == 400 and "the prompt is 1500000 tokens" in reply.text
    during = [start, *[t for t in answered if start < t], start + took]
    longest_silence = max(b - a for a, b in itertools.pairwise(during))
    assert longest_silence < took / 2, (longest_silence, took)


def test_a_client_that_hangs_up_stops_its_request() -> None:
    with MockServerProcess.start("--speedup-ratio", "1") as s:
        body = json.dumps({"prompt": "a b c", "max_tokens": 5000, "ignore_eos": True}).encode()
        with socket.create_connection((s.host, s.port), timeout=5) as c:
            c.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            deadline = time.monotonic() + 10
            while s.metrics()["kvferry_mock_requests_running"] < 1:
                assert time.monotonic() < deadline, "the request never ran"
                time.sleep(0.02)
        # 5000 decode steps of ~7 ms would run for 35 s; the hang-up aborts them now.
        deadline = time.monotonic() + 5
        while s.metrics()["kvferry_mock_requests_running"] > 0:
            assert time.monotonic() < deadline, "the request kept running without its client"
            time.sleep(0.05)
        assert s.metrics()['kvferry_mock_requests_total{finish_reason="abort"}'] == 1


# --- process, config and tokenizer ------------------------------------------------------------


def test_sigterm_ends_a_running_stream_and_exits_0() -> None:
    s = MockServerProcess.start("--speedup-ratio", "1")
    chunks: list[Any] = []

    def read() -> None:
        body = {"prompt": "a b c", "max_tokens": 5000, "ignore_eos": True}
        try:
            chunks.extend(s.stream("/v1/completions", body))
        except (urllib.error.URLError, OSError) as e:  # pragma: no cover - reported below
            chunks.append(repr(e))

    reader = threading.Thread(target=read)
    reader.start()
    deadline = time.monotonic() + 10
    while s.metrics()["kvferry_mock_requests_running"] < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert s.stop() == 0
    reader.join(timeout=10)
    assert chunks[-1] == "[DONE]"
    assert chunks[-2]["error"]["code"] == 503
    assert "shutting down" in chunks[-2]["error"]["message"]


def test_config_precedence_flag_env_file(tmp_path: Path) -> None:
    cfg = tmp_path / "mock.yaml"
    cfg.write_text("mock:\n  block_size: 32\n  num_blocks: 100\n  model: from-file\n")
    loaded = load_config(
        config_file=cfg,
        environ={"KVFERRY_MOCK_NUM_BLOCKS": "200", "KVFERRY_MOCK_MODEL": "from-env"},
        flags={"mock.model": "from-flag"},
    )
    m = loaded.config.mock
    assert (m.block_size, m.num_blocks, m.model) == (32, 200, "from-flag")
    assert loaded.sources["mock.block_size"] == f"file:{cfg}"
    assert loaded.sources["mock.num_blocks"] == "env:KVFERRY_MOCK_NUM_BLOCKS"
    assert loaded.sources["mock.model"] == "flag"
    assert m.model_len == 6400  # 0 = the KV capacity
    assert MockConfig().model_len == 32768


def test_start_up_errors_exit_2_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(RuntimeError, match=r"rc=2[\s\S]*max_model_len 999 exceeds"):
        MockServerProcess.start("--num-blocks", "4", "--max-model-len", "999")
    # The same error boundary in process (no server process needed to see the messages).
    assert main(["serve", "mock", "--port", "0", "--profile", str(tmp_path / "no.json")]) == 2
    assert re.search(r"^error: timing profile \S+no\.json not found", capsys.readouterr().err)
    assert main(["serve", "mock", "--port", "0", "--tokenizer", str(tmp_path)]) == 2
    assert "no tokenizer.json there" in capsys.readouterr().err


def test_profile_and_hf_tokenizer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    words = ["[UNK]", "hello", "world", "the", "a", "sea", "quick", "brown", "fox"]
    tok = tokenizers.Tokenizer(
        tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]")
    )
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    profile = [
        {"kind": "prefill", "tokens": 100, "ms": 20.0},
        {"kind": "prefill", "tokens": 300, "ms": 40.0},
    ]
    (tmp_path / "profile.json").write_text(json.dumps(profile))
    with MockServerProcess.start(
        "--tokenizer", str(tmp_path), "--profile", str(tmp_path / "profile.json")
    ) as s:
        body = s.complete("hello world hello", 2, ignore_eos=True)
        assert body["usage"]["prompt_tokens"] == 3
        reply = s.post("/v1/completions", {"prompt": [len(words)]})
        assert reply.status == 400 and f"[0, {len(words)})" in reply.body["error"]["message"]
        m = s.metrics()
        # Fitted prefill: 10 ms + 0.1 ms/token, so 3 tokens take 10.3 ms.
        assert m['kvferry_mock_model_seconds_total{phase="prefill"}'] == pytest.approx(0.0103)
        stats = s.kv_stats()
        assert (stats["tokenizer"], stats["vocab_size"]) == ("hf", None)
        # A router that would count words instead refuses to start, saying how to fix it.
        assert main(["serve", "router", "--port", "0", "--worker", s.url]) == 2
        err = capsys.readouterr().err
        assert "tokenizes with a Hugging Face tokenizer" in err and "--tokenizer" in err


def test_hf_tokenizer_without_the_library_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers -> ImportError
    with pytest.raises(MissingDependency, match=r"pip install 'kvferry\[tokenizer\]'"):
        load_tokenizer(str(tmp_path), VOCAB)


# --- the scheduler in process: preemption under block pressure --------------------------------


def test_preemption_under_block_pressure_keeps_outputs_exact() -> None:
    async def main() -> tuple[list[list[int]], list[list[int]], int]:
        # 8 blocks of 4 tokens; 4 requests that grow to 24 tokens (6 blocks) each. Steps of
        # about 0.07 ms: the four arrive microseconds apart, so they overlap in model time (at
        # 1e6 the first would finish before the second arrived).
        config = MockConfig(num_blocks=8, block_size=4, speedup_ratio=100)
        params = SamplingParams(max_tokens=20, ignore_eos=True)
        prompts = [[i, i + 1, i + 2, i + 3] for i in range(0, 40, 10)]

        async def collect(engine: MockEngine, prompt: list[int]) -> list[int]:
            request = engine.submit(prompt, params)
            return [out.token_id async for out in engine.stream(request)]

        outputs = []
        for concurrent in (False, True):
            engine = MockEngine(config, WordTokenizer(VOCAB))
            loop = asyncio.create_task(engine.run())
            if concurrent:
                got = await asyncio.gather(*(collect(engine, p) for p in prompts))
            else:
                got = [await collect(engine, p) for p in prompts]
            preemptions = engine.counters.preemptions
            stats = engine.blocks.stats()
            assert stats.used_blocks == 0
            assert stats.used_blocks + stats.cached_blocks + stats.free_blocks == 8
            engine.stop()
            await loop
            outputs.append(list(got))
        return outputs[0], outputs[1], preemptions

    alone, together, preemptions = asyncio.run(main())
    assert preemptions > 0
    assert together == alone
    assert all(len(out) == 20 for out in together)


def test_long_prompts_prefill_in_chunks_and_a_full_hit_computes_one_token() -> None:
    async def main() -> MockEngine:
        config = MockConfig(max_num_batched_tokens=16, speedup_ratio=1e6)
        engine = MockEngine(config, WordTokenizer(VOCAB))
        loop = asyncio.create_task(engine.run())
        for prompt in (ids(30, 40), ids(31, 32), ids(31, 32)):
            request = engine.submit(prompt, SamplingParams(max_tokens=1))
            assert [out.finish_reason async for out in engine.stream(request)] == ["length"]
        engine.stop()
        await loop
        return engine

    engine = asyncio.run(main())
    c = engine.counters
    # 40 tokens: chunks of 16, 16 and 8, each attending to the chunks before it. 32 tokens:
    # two chunks; then again: both blocks hit, and only the last token is computed (its
    # logits give the first output token).
    chunks = [[(16, 0)], [(16, 16)], [(8, 32)], [(16, 0)], [(16, 16)], [(1, 31)]]
    t = TimingModel(speedup_ratio=1e6)
    assert c.prefill_tokens == 40 + 32 + 1 and c.cached_prompt_tokens == 32
    assert c.prefill_seconds == pytest.approx(sum(t.prefill_ms(ch) for ch in chunks) / 1000)
    assert c.steps == 6 and c.decode_seconds == 0.0


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("usage", [False, True])
@pytest.mark.parametrize("token_ids", [False, True])
def test_fast_chunk_encoding_equals_the_json_objects(
    chat: bool, usage: bool, token_ids: bool
) -> None:
    parsed = ParsedRequest(
        chat=chat,
        prompt_ids=[1, 2],
        params=SamplingParams(max_tokens=4),
        stream=True,
        include_usage=usage,
        return_token_ids=token_ids,
        cache_salt="",
    )
    request = MockRequest("r", [1, 2], parsed.params, BlockHasher(BS))
    formatter = CompletionFormatter(parsed, request, MODEL)
    for text, token, finish in [
        (" a", 7, None),
        (' "quoted" \\ é', 8, None),
        (" z", 9, "length"),
        ("", 10, "stop"),
    ]:
        expected = data_line(formatter.chunk(text, [token], finish))
        assert formatter.chunk_bytes(text, token, finish) == expected
