"""``kvferry serve router --pd`` over real mock engines: prefill on one instance, decode on
another with the hand-off the prefill returned.

The mock simulates P/D as vLLM's pull-style connectors do it: a request asking for remote
decode answers with ``kv_transfer_params``, and a decode instance given them counts the prompt
as handed off (``kvferry_mock_handoff_tokens_total``), not computed. The same router runs over
vLLM in ``test_disagg_vllm.py``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pydantic import ValidationError

from kvferry.config.serving import RouterConfig
from kvferry.testing.mock_engine import MockServerProcess
from kvferry.testing.router_process import RouterProcess

HANDOFF = "kvferry_mock_handoff_tokens_total"
PREFILL_TOKENS = "kvferry_mock_prefill_tokens_total"
GENERATED = "kvferry_mock_generated_tokens_total"


def words(tag: str, n: int) -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


def counter(engine: MockServerProcess, name: str) -> float:
    return engine.metrics().get(name, 0.0)


@pytest.fixture
def fleet() -> Iterator[tuple[list[MockServerProcess], MockServerProcess, RouterProcess]]:
    prefill = [MockServerProcess.start("--speedup-ratio", "20") for _ in range(2)]
    decode = MockServerProcess.start("--speedup-ratio", "20")
    router = None
    try:
        flags = ["--pd", "--decode", decode.url, "--set", "router.health_interval=0.5"]
        for p in prefill:
            flags += ["--prefill", p.url]
        router = RouterProcess.start(*flags)
        yield prefill, decode, router
    finally:
        if router is not None:
            router.stop()
        for e in (*prefill, decode):
            e.kill()


def test_a_request_is_prefilled_on_one_instance_and_decoded_on_another(
    fleet: tuple[list[MockServerProcess], MockServerProcess, RouterProcess],
) -> None:
    prefill, decode, router = fleet
    prompt = words("pd", 300)
    tokens = len(prompt.split())
    reply = router.routed("/v1/completions", {"prompt": prompt, "max_tokens": 12})
    assert reply.status == 200, reply.text
    assert reply.worker == decode.url  # the client's answer is the decode instance's
    assert reply.body["usage"]["completion_tokens"] == 12
    assert "kv_transfer_params" not in reply.body  # the hand-off stays between the instances
    # the prefill instance generated one token; the decode instance computed only the last
    # prompt token (its KV came with the hand-off) and generated the 12
    assert sum(counter(p, GENERATED) for p in prefill) == 1
    assert sum(counter(p, PREFILL_TOKENS) for p in prefill) == tokens
    assert counter(decode, HANDOFF) == tokens - 1
    assert counter(decode, PREFILL_TOKENS) == 1
    assert counter(decode, GENERATED) == 12

    chunks = router.stream(
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": words("chat", 200)}], "max_tokens": 5},
    )
    assert chunks[-1] == "[DONE]"
    assert (
        sum(1 for c in chunks[:-1] if c["choices"] and c["choices"][0]["delta"].get("content")) == 5
    )

    pd = router.stats()["pd"]
    assert pd["handoffs"] == 2 and pd["without_handoff"] == 0
    assert pd["prefills"] == 2 and pd["prefill_failures"] == 0
    roles = {w["url"]: w["role"] for w in router.stats()["workers"]}
    assert roles == {prefill[0].url: "prefill", prefill[1].url: "prefill", decode.url: "decode"}


def test_the_same_prefix_goes_to_the_prefill_instance_that_holds_it(
    fleet: tuple[list[MockServerProcess], MockServerProcess, RouterProcess],
) -> None:
    prefill, _, router = fleet
    prompt = words("shared", 400)
    for _ in range(3):
        assert router.routed("/v1/completions", {"prompt": prompt, "max_tokens": 2}).status == 200
    served = [router.worker_stats()[p.url]["requests"] for p in prefill]
    assert sorted(served) == [0, 3]  # KV-aware: every prefill of the prefix on one instance


def test_a_dead_prefill_instance_is_retried_elsewhere_and_then_none_left_is_a_clear_503(
    fleet: tuple[list[MockServerProcess], MockServerProcess, RouterProcess],
) -> None:
    prefill, decode, router = fleet
    prompt = words("failover", 200)
    first = router.routed("/v1/completions", {"prompt": prompt, "max_tokens": 3})
    assert first.status == 200
    holder = max(prefill, key=lambda p: router.worker_stats()[p.url]["requests"])
    holder.kill()
    # the router would send the prefix to the instance holding it: that one is dead now
    again = router.routed("/v1/completions", {"prompt": prompt, "max_tokens": 3})
    assert again.status == 200, again.text
    assert again.worker == decode.url
    stats = router.stats()
    assert stats["pd"]["prefill_retries"] == 1
    assert not router.worker_stats()[holder.url]["healthy"]

    for p in prefill:
        p.kill()
    gone = router.routed("/v1/completions", {"prompt": words("x", 50), "max_tokens": 3})
    assert gone.status in (502, 503)
    assert "prefill" in gone.body["error"]["message"]
    assert router.stats()["pd"]["prefill_failures"] >= 1


def test_a_request_the_prefill_refuses_gets_its_answer() -> None:
    with MockServerProcess.start("--max-model-len", "64") as p, MockServerProcess.start() as d:
        router = RouterProcess.start("--pd", "--prefill", p.url, "--decode", d.url)
        try:
            reply = router.routed("/v1/completions", {"prompt": words("long", 500)})
            assert reply.status == 400
            assert "max_model_len" in reply.body["error"]["message"]
            assert "prefill on" in reply.body["error"]["message"]
        finally:
            router.stop()


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"pd": True, "prefill_workers": ["http://127.0.0.1:1"]}, "at least one prefill and one"),
        (
            {
                "pd": True,
                "workers": ["http://127.0.0.1:3"],
                "prefill_workers": ["http://a:1"],
                "decode_workers": ["http://b:2"],
            },
            "instead of --worker",
        ),
        ({"prefill_workers": ["http://a:1"], "decode_workers": ["http://b:2"]}, "add --pd"),
        (
            {"pd": True, "prefill_workers": ["http://a:1"], "decode_workers": ["http://a:1"]},
            "both a prefill and a decode",
        ),
    ],
)
def test_pd_fleet_config_errors_say_what_to_give(fields: dict[str, object], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        RouterConfig(**fields)  # type: ignore[arg-type]
