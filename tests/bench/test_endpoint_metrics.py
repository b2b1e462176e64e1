"""Per-request metrics, goodput and aggregation of the endpoint bench, against hand-computed
values and against numbers aiperf 0.13 itself exported."""

from __future__ import annotations

import numpy as np
import pytest

from kvferry.bench.endpoint_metrics import (
    PERCENTILES,
    RECORD_METRICS,
    ErrorInfo,
    MetricResult,
    RequestRecord,
    aggregate,
    is_good,
    parse_goodput,
    record_metrics,
)
from kvferry.errors import ConfigError

MS = 1_000_000


def rec(start_ms: float, chunks_ms: list[float], isl: int = 100, osl: int | None = None,
        **kw: object) -> RequestRecord:  # fmt: skip
    return RequestRecord(
        index=0,
        start_ns=round(start_ms * MS),
        end_ns=round((chunks_ms[-1] if chunks_ms else start_ms) * MS),
        chunk_ns=[round(c * MS) for c in chunks_ms],
        input_tokens=isl,
        output_tokens=len(chunks_ms) if osl is None else osl,
        **kw,  # type: ignore[arg-type]
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
    r = rec(0, [1, 2, 3], isl=10, usage_prompt_tokens=12, usage_completion_tokens=5,
            usage_cached_tokens=8)  # fmt: skip
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
