"""Per-request metrics, goodput and aggregation of the endpoint bench, against hand-computed
values and against numbers aiperf 0.13 itself exported."""

from __future__ import annotations

import numpy as np
import pytest

from kvferry.bench.endpoint.aggregate import MetricResult, aggregate
from kvferry.bench.endpoint.metrics import (
    PERCENTILES,
    RECORD_METRICS,
    ErrorInfo,
    HttpTrace,
    RequestRecord,
    is_good,
    parse_goodput,
    record_metrics,
    usage_values,
)
from kvferry.errors import ConfigError

MS = 1_000_000


def rec(start_ms: float, chunks_ms: list[float], isl: int = 100, osl: int | None = None,
        **kw: object) -> RequestRecord:  # fmt: skip
    fields: dict[str, object] = {"output_tokens": len(chunks_ms) if osl is None else osl}
    fields.update(kw)
    return RequestRecord(
        index=0,
        start_ns=round(start_ms * MS),
        end_ns=round((chunks_ms[-1] if chunks_ms else start_ms) * MS),
        chunk_ns=[round(c * MS) for c in chunks_ms],
        input_tokens=isl,
        **fields,  # type: ignore[arg-type]
    )


def test_record_metrics_by_hand() -> None:
    # Sent at 0; content chunks at 10, 15, 22, 30 ms; 4 output tokens.
    m = record_metrics(rec(0, [10, 15, 22, 30]))
    assert m["time_to_first_token"] == pytest.approx(10.0)
    assert m["time_to_second_token"] == pytest.approx(5.0)
    assert m["inter_chunk_latency"] == pytest.approx([5.0, 7.0, 8.0])
    assert m["request_latency"] == pytest.approx(30.0)  # the last content chunk, not [DONE]
    assert m["inter_token_latency"] == pytest.approx(20.0 / 3)  # (30 - 10) / (4 - 1)
    assert m["output_token_throughput_per_user"] == pytest.approx(150.0)  # 1 / 6.667 ms
    assert m["e2e_output_token_throughput"] == pytest.approx(4 / 0.030)
    assert m["input_sequence_length"] == 100 and m["output_sequence_length"] == 4


def test_itl_divides_by_tokens_not_chunks() -> None:
    # Two chunks carrying 9 tokens: ITL = (latency - TTFT) / (OSL - 1) = 8 ms / 8.
    m = record_metrics(rec(0, [2, 10], osl=9))
    assert m["inter_token_latency"] == pytest.approx(1.0)
    assert m["inter_chunk_latency"] == pytest.approx([8.0])


def test_matches_an_aiperf_export() -> None:
    """A request aiperf 0.13 exported (profile_export.jsonl of a vLLM run): its TTFT, chunk
    gaps and OSL in, its ITL, TPS/user, E2E TPS and TTST out."""
    gaps = [318.35649, 28.892408, 18.799741, 15.920113, 15.980616, 15.669803, 13.500244]
    chunks = [515.881807]
    for gap in gaps:
        chunks.append(chunks[-1] + gap)
    m = record_metrics(rec(0, chunks, isl=2114, osl=8))
    assert m["request_latency"] == pytest.approx(943.001222, abs=1e-5)
    assert m["inter_token_latency"] == pytest.approx(61.01705928571428, abs=1e-5)
    assert m["output_token_throughput_per_user"] == pytest.approx(16.38885930764819, rel=1e-6)
    assert m["e2e_output_token_throughput"] == pytest.approx(8.483552102968536, rel=1e-6)
    assert m["time_to_second_token"] == pytest.approx(318.35649, abs=1e-5)


def test_short_outputs_and_errors() -> None:
    one = record_metrics(rec(0, [4], osl=1))
    assert one["time_to_first_token"] == one["request_latency"] == pytest.approx(4.0)
    for tag in ("inter_token_latency", "time_to_second_token", "inter_chunk_latency"):
        assert tag not in one
    failed = rec(0, [], error=ErrorInfo(400, "Bad Request", "prompt too long"))
    assert record_metrics(failed) == {}
    assert record_metrics(rec(0, [])) == {}  # no content: not a valid request


def test_server_counts_and_usage() -> None:
    usage = {"prompt_tokens": 12, "completion_tokens": 5,
             "prompt_tokens_details": {"cached_tokens": 8}}  # fmt: skip
    r = rec(0, [1, 2, 3], isl=10, usage=usage)
    client = record_metrics(r)
    server = record_metrics(r, server_counts=True)
    assert client["input_sequence_length"] == 10 and client["output_sequence_length"] == 3
    assert server["input_sequence_length"] == 12 and server["output_sequence_length"] == 5
    assert server["inter_token_latency"] == pytest.approx(2.0 / 4)
    assert client["usage_prompt_cache_read_tokens"] == 8


def test_parse_goodput() -> None:
    assert parse_goodput("ttft:500 itl:50") == {
        "time_to_first_token": 500.0,
        "inter_token_latency": 50.0,
    }
    assert parse_goodput("request_latency=2000,tps_user:20") == {
        "request_latency": 2000.0,
        "output_token_throughput_per_user": 20.0,
    }
    for bad, match in (
        ("", "is empty"),
        ("ttft", "is not NAME:VALUE"),
        ("foo:1", "unknown metric 'foo'"),
        ("inter_chunk_latency:3", "unknown metric"),
        ("ttft:-1", "finite number >= 0"),
        ("itl:abc", "finite number >= 0"),
    ):
        with pytest.raises(ConfigError, match=match):
            parse_goodput(bad)


def test_is_good_uses_each_metrics_direction() -> None:
    slos = parse_goodput("ttft:10 tps_user:100")
    assert is_good({"time_to_first_token": 10.0, "output_token_throughput_per_user": 100.0}, slos)
    assert not is_good({"time_to_first_token": 10.1, "output_token_throughput_per_user": 200}, slos)
    assert not is_good({"time_to_first_token": 1.0, "output_token_throughput_per_user": 99}, slos)
    assert not is_good({"time_to_first_token": 1.0}, slos)  # a missing metric fails


def test_aggregate() -> None:
    records = [
        rec(0, [10, 15, 22, 30]),  # TTFT 10, ITL 6.67
        rec(5, [25, 27, 29, 31]),  # TTFT 20, ITL 2
        rec(8, [38, 40]),  # TTFT 30, ITL 2
        rec(9, [], error=ErrorInfo(500, "Internal Server Error", "boom")),
        rec(9, [], error=ErrorInfo(500, "Internal Server Error", "boom")),
    ]
    run = aggregate(records, goodput=parse_goodput("ttft:20 itl:5"))
    m = run.metrics
    assert run.request_count == 3 and run.error_count == 2
    assert run.duration_s == pytest.approx(0.040)  # first start 0 ms .. last content 40 ms
    assert m["request_count"].to_json() == {"unit": "requests", "avg": 3.0}
    assert m["error_request_count"].avg == 2
    assert m["request_throughput"].avg == pytest.approx(3 / 0.040)
    assert m["output_token_throughput"].avg == pytest.approx(10 / 0.040)
    assert m["total_osl"].avg == 10 and m["total_isl"].avg == 300
    # good: request 2 only (request 1's ITL 6.67 > 5, request 3's TTFT 30 > 20)
    assert m["good_request_count"].avg == 1
    assert m["goodput"].avg == pytest.approx(1 / 0.040)
    ttft = m["time_to_first_token"]
    assert (ttft.count, ttft.min, ttft.max, ttft.sum) == (3, 10.0, 30.0, 60.0)
    assert ttft.avg == pytest.approx(20.0) and ttft.std == pytest.approx(np.std([10, 20, 30]))
    expected = np.percentile([10.0, 20.0, 30.0], PERCENTILES)  # linear, as aiperf and stats
    assert ttft.percentiles == pytest.approx(tuple(expected))
    assert ttft.p(25) == pytest.approx(15.0) and ttft.p(99) == pytest.approx(29.8)
    icl = m["inter_chunk_latency"]  # every gap of every request
    assert icl.count == 3 + 3 + 1 and icl.sum == pytest.approx(20 + 6 + 2)
    assert run.error_summary() == [
        {
            "error_details": {"code": 500, "type": "Internal Server Error", "message": "boom"},
            "count": 2,
        }
    ]
    assert run.value("time_to_first_token", "p50") == pytest.approx(20.0)
    assert run.value("goodput") == pytest.approx(25.0)
    assert run.value("no_such_metric") is None


def test_aggregate_of_nothing_valid() -> None:
    run = aggregate([rec(0, [], error=ErrorInfo(None, "ClientConnectorError", "refused"))])
    assert run.request_count == 0 and run.duration_s == 0
    assert "request_throughput" not in run.metrics and "time_to_first_token" not in run.metrics
    assert run.metrics["error_request_count"].avg == 1


def test_metric_json_has_aiperfs_keys_in_order() -> None:
    result = MetricResult.of(RECORD_METRICS["time_to_first_token"], [1.0, 2.0, 4.0])
    keys = list(result.to_json())
    assert keys == ["unit", "avg", "p1", "p5", "p10", "p25", "p50", "p75", "p90", "p95", "p99",
                    "min", "max", "std", "count", "sum"]  # fmt: skip
    assert result.to_json()["unit"] == "ms" and result.to_json()["count"] == 3


def test_http_metrics_from_the_trace() -> None:
    # A new connection (2 ms), the body written by 3 ms, the first byte at 10, the last at 25.
    trace = HttpTrace(send_start_ns=0, send_end_ns=3 * MS, request_chunks=1, request_bytes=2048,
                      connect_start_ns=MS, connect_end_ns=3 * MS, receive_start_ns=10 * MS,
                      receive_end_ns=25 * MS, response_chunks=4, response_bytes=512)  # fmt: skip
    m = record_metrics(rec(0, [10, 25], http=trace))
    assert m["http_req_sending"] == 3.0 and m["http_req_waiting"] == 7.0
    assert m["http_req_receiving"] == 15.0 and m["http_req_duration"] == 25.0
    assert m["http_req_connecting"] == 2.0 and m["http_req_connection_reused"] == 0
    assert m["http_req_blocked"] == 0 and m["http_req_dns_lookup"] == 0
    assert m["http_req_connection_overhead"] == 2.0 and m["http_req_total"] == 27.0
    assert m["http_req_data_sent"] == 2.0 and m["http_req_data_received"] == 0.5  # KB
    assert m["http_req_chunks_sent"] == 1 and m["http_req_chunks_received"] == 4
    reused = HttpTrace(send_start_ns=0, send_end_ns=MS, reused=True, receive_start_ns=2 * MS,
                       receive_end_ns=2 * MS, response_chunks=1)  # fmt: skip
    m = record_metrics(rec(0, [2], http=reused))
    assert m["http_req_connecting"] == 0 and m["http_req_connection_reused"] == 1
    assert m["http_req_receiving"] == 0  # one chunk


def test_usage_synonyms() -> None:
    openai = {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14,
              "prompt_tokens_details": {"cached_tokens": 8},
              "completion_tokens_details": {"reasoning_tokens": 3}}  # fmt: skip
    assert usage_values(openai) == {
        "usage_prompt_tokens": 10,
        "usage_completion_tokens": 4,
        "usage_total_tokens": 14,
        "usage_reasoning_tokens": 3,
        "usage_prompt_cache_read_tokens": 8,
    }
    # Anthropic counts cached prompt tokens apart from input_tokens: they are added back.
    anthropic = {"input_tokens": 5, "output_tokens": 2, "cache_read_input_tokens": 20,
                 "cache_creation_input_tokens": 3, "prompt_audio_seconds": {}}  # fmt: skip
    got = usage_values(anthropic)
    assert got["usage_prompt_tokens"] == 28 and got["usage_prompt_cache_read_tokens"] == 20
    assert got["usage_prompt_cache_write_tokens"] == 3
    assert "usage_prompt_audio_seconds" not in got  # a non-numeric placeholder is "absent"
    assert usage_values(None) == {} and usage_values({}) == {}


def test_reasoning_and_output_are_counted_apart() -> None:
    usage = {"prompt_tokens": 50, "completion_tokens": 9,
             "completion_tokens_details": {"reasoning_tokens": 6}}  # fmt: skip
    r = rec(0, [5, 9, 12, 20], isl=50, osl=3, reasoning_tokens=6, first_output_ns=12 * MS,
            requested_osl=10, usage=usage)  # fmt: skip
    m = record_metrics(r)
    assert m["output_sequence_length"] == 9  # 3 output + 6 reasoning
    assert m["output_token_count"] == 3 and m["reasoning_token_count"] == 6
    assert m["time_to_first_token"] == 5.0 and m["time_to_first_output_token"] == 12.0
    assert m["decode_duration"] == 15.0 and m["prefill_throughput_per_user"] == 10_000.0
    assert m["osl_mismatch_diff_pct"] == pytest.approx(-10.0)
    assert m["usage_completion_tokens_diff_pct"] == 0.0
    assert m["usage_reasoning_tokens_diff_pct"] == 0.0
    server = record_metrics(r, server_counts=True)
    assert server["output_token_count"] == 3 and server["reasoning_token_count"] == 6
    only_reasoning = record_metrics(rec(0, [5, 9], osl=None, output_tokens=None,
                                        reasoning_tokens=2))  # fmt: skip
    assert "output_token_count" not in only_reasoning
    assert only_reasoning["output_sequence_length"] == 2


def test_error_adjusted_band_and_error_metrics() -> None:
    ok = [rec(0, [t]) for t in (10, 20, 30)]
    overflow = ErrorInfo(400, "Bad Request", "This model's maximum context length is 4096")
    failed = [rec(0, [], error=overflow), rec(0, [], error=ErrorInfo(500, "x", "boom"))]
    run = aggregate([*ok, *failed])
    adj = run.metrics["adj_time_to_first_token"].to_json()
    # [10, 20, 30, inf, inf]: nearest-rank percentiles; the infinite stats are left out
    assert adj["p50"] == 30.0 and "p99" not in adj and "avg" not in adj and "max" not in adj
    assert adj["min"] == 10.0 and adj["count"] == 5
    assert run.metrics["error_isl"].count == 2 and run.metrics["total_error_isl"].avg == 200
    assert run.metrics["context_overflow_count"].avg == 1
    assert run.metrics["request_error_rate"].avg == 40.0
    assert run.metrics["completed_request_count"].avg == 5
    clean = aggregate(ok)
    assert "error_request_count" not in clean.metrics and "adj_request_latency" not in clean.metrics
    assert "context_overflow_count" not in clean.metrics


def test_rates_are_over_the_window_when_there_is_one() -> None:
    records = [rec(0, [10, 20]), rec(20, [30, 40])]
    assert aggregate(records).value("request_throughput") == pytest.approx(2 / 0.040)
    run = aggregate(records, window_ns=(0, 100 * MS))
    assert run.value("request_throughput") == pytest.approx(2 / 0.100)
    assert run.value("output_token_throughput") == pytest.approx(4 / 0.100)
    assert run.value("benchmark_duration") == pytest.approx(0.040)  # last response - first start


def test_sweep_metrics_by_hand() -> None:
    # A: sent 0, content at 20, 30, 40, 50, 60 ms, ISL 100, OSL 5 (4 gaps of 10 ms);
    # B: sent 40, content at 50, 75, 100 ms, ISL 50, OSL 3 (2 gaps of 25 ms). Window 0-100 ms.
    a = rec(0, [20, 30, 40, 50, 60], isl=100, osl=5)
    b = rec(40, [50, 75, 100], isl=50, osl=3)
    for r in (a, b):
        r.last_response_ns = r.chunk_ns[-1]
    run = aggregate([a, b], window_ns=(0, 100 * MS))
    conc = run.metrics["effective_concurrency"]
    assert conc.avg == pytest.approx(1.2)  # 1 for 80 ms, 2 for 20 ms
    assert (conc.min, conc.max, conc.p(50), conc.p(90)) == (1.0, 2.0, 1.0, 2.0)
    assert conc.count is None and conc.p(25) is None  # a curve has no count or low band
    # prefill: 100 tokens over [0, 20), 50 over [40, 50): 150 tokens in 0.1 s
    assert run.value("effective_prefill_throughput") == pytest.approx(1500.0)
    # decode: OSL - 1 tokens spread over the gaps: 4 + 2 tokens in 0.1 s; 80 ms active
    assert run.value("effective_decode_throughput") == pytest.approx(60.0)
    assert run.value("active_decode_throughput") == pytest.approx(75.0)
    # ISL held from start to end, output tokens added as they arrive: 100 (0-20 ms), 101, 102,
    # 153 (B sent at 40), 155, then B alone 51 (60-75), 52: an integral of 9175 token-ms
    assert run.value("tokens_in_flight") == pytest.approx(91.75)
    assert run.value("effective_decode_concurrency") == pytest.approx(0.9)  # 40 + 50 ms


def test_credit_and_replay_lag() -> None:
    a = rec(10, [20], credit_ns=4 * MS)
    b = rec(30, [45], credit_ns=30 * MS)
    run = aggregate([a, b])
    assert run.metrics["credit_to_start_latency"].to_json()["max"] == 6.0
    assert run.value("effective_latency", "min") == 15.0  # end (last content) - credit
    late = [rec(s, [s + 5], scheduled_ns=round(k * 10 * MS)) for k, s in enumerate((1, 12, 27))]
    lag = aggregate(late).metrics
    assert "credit_to_start_latency" not in lag  # a replay has a schedule, not credits
    assert lag["replay_sched_lag_p50"].avg == pytest.approx(1.0)  # lateness 1, 2, 7 ms - 1
    assert lag["replay_sched_lag_p99"].to_json() == {"unit": "ms", "avg": pytest.approx(5.9),
                                                     "count": 1}  # fmt: skip
    assert lag["replay_sched_degraded"].avg == 0.0
