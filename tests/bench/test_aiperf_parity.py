"""``kvferry bench serve`` against the pinned aiperf (0.13.0, ``make aiperf``): the same
``kvferry serve mock``, the same fixed prompts (one ``--input-file`` both read), the same load.

Two checks of the export parity:

- Both tools run for real; kvferry's ``profile_export_aiperf.json`` must hold every key aiperf's
  does (top level and warm-up), with the same units, and every value aiperf computes from the
  same information within a stated tolerance (:data:`EXACT` for counts and tokens,
  :data:`LATENCIES` and :data:`RATES` for times and rates, which two clients measure apart;
  :data:`CLIENT_SIDE` values measure the client itself and are not compared); its CSV every
  row, its per-request lines every metric. The keys aiperf writes that kvferry cannot compute
  from what it measures are :data:`NOT_COMPUTABLE`, each with the reason.
- Definitions, exactly: aiperf's own per-request export (``profile_export.jsonl``) is read
  back into kvferry's records and aggregated by kvferry; every number aiperf wrote (warm-up
  included) must come out again to 1e-6.

Both runs include two prompts longer than the mock's context (failed requests: the error
metrics) and goodput SLOs every valid request meets (the goodput metrics, exactly).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kvferry.bench.endpoint.aggregate import aggregate
from kvferry.bench.endpoint.metrics import ErrorInfo, HttpTrace, RequestRecord
from kvferry.cli.main import main
from kvferry.testing.mock_engine import MockServerProcess

ROOT = Path(__file__).resolve().parents[2]
AIPERF = ROOT / ".venv-aiperf" / "bin" / "aiperf"
if not AIPERF.exists():
    pytest.skip(f"aiperf is not installed at {AIPERF} (run `make aiperf`)", allow_module_level=True)
pytest.importorskip("transformers", reason="the tiny model's tokenizer needs transformers")

pytestmark = [pytest.mark.aiperf, pytest.mark.slow, pytest.mark.timeout(600)]

ISL, OSL, CONCURRENCY, REQUESTS, WARMUP = 64, 8, 1, 16, 4
TOO_LONG = (5, 13)
"""Prompt lines (0-based) longer than the mock's context: failed requests in both runs."""
GOODPUT = "time_to_first_token:60000 inter_token_latency:60000"

NOT_COMPUTABLE = {
    "aiperf_version": "names the aiperf release that wrote the file; kvferry writes `generator`",
    "telemetry_data": "GPU telemetry aiperf scrapes from DCGM exporters; kvferry bench serve "
    "reads no GPU counters (and the mock has no GPU)",
}

EXACT = {
    "request_count", "error_request_count", "completed_request_count", "request_error_rate",
    "context_overflow_count", "good_request_count", "good_request_fraction",
    "input_sequence_length", "output_sequence_length", "output_token_count", "error_isl",
    "total_isl", "total_osl", "total_output_tokens", "total_error_isl",
    "usage_prompt_tokens", "usage_completion_tokens", "usage_total_tokens",
    "usage_prompt_cache_read_tokens", "total_usage_prompt_tokens",
    "total_usage_completion_tokens", "total_usage_total_tokens",
    "total_usage_prompt_cache_read_tokens", "overall_usage_prompt_cache_read_pct",
    "usage_prompt_tokens_diff_pct", "usage_completion_tokens_diff_pct", "usage_discrepancy_count",
    "osl_mismatch_diff_pct", "osl_mismatch_count", "http_req_chunks_sent",
}  # fmt: skip
"""Counts and tokens: the same prompts and outputs give the same numbers (avg, compared to
1e-9)."""

LATENCIES = {
    "time_to_first_token", "time_to_first_output_token", "request_latency",
    "inter_token_latency", "decode_duration", "output_token_throughput_per_user",
    "e2e_output_token_throughput", "http_req_duration", "http_req_total", "http_req_receiving",
    "adj_time_to_first_token", "adj_request_latency", "adj_inter_token_latency",
    "adj_decode_duration",
}  # fmt: skip
"""Per-request times of the server's work: their p50 within :data:`LATENCY_REL` of aiperf's
(measured on 2 shared CPUs at load average 8 to 12: 1 to 16 % apart; aiperf stamps in worker
processes that wait for a CPU, so its TTFT runs longer). The band is a sanity band, within 2x:
two live runs on a shared machine are not a measurement, but a unit or definition slip is off by
far more; the definitions themselves are held exact by
``test_aiperfs_own_records_give_aiperfs_numbers`` (aiperf's records through kvferry's code)."""
LATENCY_REL = 0.5

RATES = {
    "benchmark_duration", "request_throughput", "output_token_throughput",
    "input_token_throughput", "total_token_throughput", "goodput", "effective_concurrency",
    "effective_decode_throughput", "effective_prefill_throughput", "effective_total_throughput",
    "effective_decode_concurrency", "effective_prefill_concurrency", "tokens_in_flight",
    "effective_decode_throughput_per_user", "effective_prefill_throughput_per_user",
    "active_decode_throughput", "active_prefill_throughput", "active_total_throughput",
    "active_decode_throughput_per_user", "active_prefill_throughput_per_user",
}  # fmt: skip
"""Rates and load curves of the whole run: their avg within :data:`RATE_REL` of aiperf's. Wider
than latencies: aiperf's closed loop leaves the server idle between requests (its
effective_concurrency is 0.85 to 0.9 at concurrency 1, kvferry's 0.99), so its run is longer
(measured as above: 3 to 25 % apart). A sanity band as for latencies: within 2x."""
RATE_REL = 0.5

CLIENT_SIDE = {
    "credit_to_start_latency": "how long the client itself takes to send an issued request",
    "effective_latency": "request latency plus that client-side wait",
    "http_req_sending": "the client's write of its request",
    "http_req_waiting": "measured from the client's last write",
    "http_req_blocked": "the client's connection pool (0 in both here)",
    "http_req_dns_lookup": "the client's resolver (0 in both: an IP address)",
    "http_req_connecting": "the client's connection pool (0 in both here)",
    "http_req_connection_overhead": "the sum of those three",
    "http_req_connection_reused": "the client's connection pool",
    "http_req_data_sent": "the request bodies differ (field order, stream options)",
    "http_req_data_received": "response ids and timestamps differ in length",
    "http_req_chunks_received": "how the client's reads split the stream",
    "time_to_second_token": "a gap of one decode step, often within one read",
    "inter_chunk_latency": "as time_to_second_token",
    "prefill_throughput_per_user": "ISL / TTFT: a few-ms TTFT swings it",
}
"""Keys compared for presence and unit only: their values measure each client, or a gap so
small that two clients see it differently (the list says which)."""


@dataclass
class Runs:
    work: Path
    aiperf: Path
    kvferry: Path


def _prompts(path: Path, tokenizer: str) -> None:
    from kvferry.bench.endpoint.inputs import SyntheticSource

    source = SyntheticSource(isl=ISL, osl=OSL, seed=0, tokenizer=tokenizer)
    with path.open("w") as f:
        for i in range(REQUESTS + WARMUP + 4):
            text = " ".join(["hello world"] * 3000) if i in TOO_LONG else source.spec(1, i).prompt
            f.write(json.dumps({"text": text}) + "\n")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    from kvferry.serving.tiny_model import build_tiny_model

    work = tmp_path_factory.mktemp("aiperf-parity")
    model = build_tiny_model(work / "tiny")
    assert main(["model", "hf-cache", str(model), str(work / "hub")]) == 0
    prompts = work / "prompts.jsonl"
    _prompts(prompts, str(model))
    tok = str(model / "tokenizer.json")
    # Steps twice the mock's default length: each client's own overhead (ms) weighs less.
    # Not pinned apart (as benchmarks/serve_vs_aiperf.py pins): on two CPUs that crowds
    # aiperf's dozen processes onto one and delays its own stamps.
    flags = ("--tokenizer", tok, "--max-model-len", "4096", "--speedup-ratio", "0.5")
    with MockServerProcess.start(*flags) as mock:
        _run_both(mock, model, prompts, work)
    return Runs(work, work / "aiperf", work / "kvferry")


def _run_both(mock: MockServerProcess, model: Path, prompts: Path, work: Path) -> None:
    """aiperf, then kvferry, each from an empty prefix cache."""
    mock.post("/kv/clear", {})
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(work / "hub"),
               TRANSFORMERS_OFFLINE="1")  # fmt: skip
    cmd = [
        str(AIPERF), "profile", "--model", "kvferry-mock", "--tokenizer", "local/tiny",
        "--url", mock.url, "--endpoint-type", "completions", "--streaming",
        "--input-file", str(prompts), "--custom-dataset-type", "single_turn",
        "--dataset-sampling-strategy", "sequential",
        "--output-tokens-mean", str(OSL), "--output-tokens-stddev", "0",
        "--extra-inputs", "ignore_eos:true", "--extra-inputs", f"min_tokens:{OSL}",
        "--concurrency", str(CONCURRENCY), "--request-count", str(REQUESTS),
        "--warmup-request-count", str(WARMUP), "--random-seed", "0",
        "--goodput", GOODPUT, "--artifact-dir", str(work / "aiperf"), "--ui-type", "none",
    ]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"aiperf failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}"
    mock.post("/kv/clear", {})
    rc = main(
        ["bench", "serve", "--quiet", "--url", mock.url, "--tokenizer", str(model),
         "--input-file", str(prompts), "--concurrency", str(CONCURRENCY),
         "--request-count", str(REQUESTS), "--warmup-requests", str(WARMUP),
         "--isl", str(ISL), "--osl", str(OSL), "--goodput", GOODPUT,
         "--artifact-dir", str(work / "kvferry")]
    )  # fmt: skip
    assert rc == 0


def _load(directory: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((directory / "profile_export_aiperf.json").read_text())
    return data


def _metrics(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in data.items() if isinstance(v, dict) and "unit" in v}


def test_kvferry_writes_every_key_aiperf_writes(runs: Runs) -> None:
    ours, theirs = _load(runs.kvferry), _load(runs.aiperf)
    missing = set(theirs) - set(ours) - set(NOT_COMPUTABLE)
    assert not missing, f"aiperf writes, kvferry does not: {sorted(missing)}"
    assert set(theirs) >= set(NOT_COMPUTABLE), "an exclusion aiperf no longer writes"
    missing = set(theirs["warmup_metrics"]) - set(ours["warmup_metrics"])
    assert not missing, f"warm-up metrics kvferry lacks: {sorted(missing)}"
    for tag, metric in _metrics(theirs).items():
        assert ours[tag]["unit"] == metric["unit"], tag
        assert set(ours[tag]) >= set(metric), f"{tag}: {sorted(metric)} vs {sorted(ours[tag])}"
    compared = EXACT | LATENCIES | RATES | set(CLIENT_SIDE)
    unclassified = set(_metrics(theirs)) - compared
    assert not unclassified, f"say how to compare: {sorted(unclassified)}"


def test_values_agree(runs: Runs) -> None:
    ours, theirs = _metrics(_load(runs.kvferry)), _metrics(_load(runs.aiperf))
    wrong = []
    for tag in sorted(set(theirs) - set(CLIENT_SIDE)):
        stat, rel = "avg", 1e-9
        if tag in LATENCIES:
            stat, rel = "p50", LATENCY_REL
        elif tag in RATES:
            rel = RATE_REL
        got, want = ours[tag].get(stat), theirs[tag].get(stat)
        if got is None or want is None or not math.isclose(got, want, rel_tol=rel, abs_tol=1e-9):
            wrong.append(f"{tag} {stat}: kvferry {got}, aiperf {want}")
    assert not wrong, "\n".join(wrong)
    # The error details aiperf keeps are the server's whole body; kvferry keeps its message.
    summary = _load(runs.kvferry)["error_summary"]
    assert [(e["error_details"]["code"], e["count"]) for e in summary] == [
        (e["error_details"]["code"], e["count"]) for e in _load(runs.aiperf)["error_summary"]
    ]


def test_csv_rows_and_per_request_metrics(runs: Runs) -> None:
    def rows(directory: Path) -> set[str]:
        with (directory / "profile_export_aiperf.csv").open(newline="") as f:
            text = f.read()
        names = set()
        for row in csv.reader(io.StringIO(text)):
            if row and row[0] != "Metric":
                names.add(row[0])
        return names

    aiperf_rows = rows(runs.aiperf)
    gpu_header = {"Endpoint"}  # the header of aiperf's (empty) GPU telemetry table
    assert not (aiperf_rows - gpu_header) - rows(runs.kvferry)
    assert (runs.kvferry / "profile_export_aiperf.csv").read_bytes().count(b"\r\n") > 10

    def lines(directory: Path) -> list[dict[str, Any]]:
        path = directory / "profile_export.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines()]

    ours, theirs = lines(runs.kvferry), lines(runs.aiperf)
    for phase in ("warmup", "profiling"):
        count = WARMUP if phase == "warmup" else REQUESTS
        assert sum(x["metadata"]["benchmark_phase"] == phase for x in ours) == count
    for failed in (False, True):
        want = set().union(*(x["metrics"] for x in theirs if ("error" in x) is failed))
        got = set().union(*(x["metrics"] for x in ours if ("error" in x) is failed))
        assert want <= got, f"per-request metrics kvferry lacks: {sorted(want - got)}"


def _ns(ms: float) -> int:
    return round(ms * 1e6)


def _rebuild(line: dict[str, Any]) -> RequestRecord:
    """A kvferry record from one line of aiperf's ``profile_export.jsonl``."""
    meta = line["metadata"]
    metric = {tag: m["value"] for tag, m in line["metrics"].items()}
    record = RequestRecord(
        index=meta["session_num"],
        start_ns=meta["request_start_ns"],
        end_ns=meta["request_end_ns"],
        last_response_ns=meta["request_end_ns"],
        credit_ns=meta.get("credit_issued_ns"),
    )
    if "error" in line:
        e = line["error"]
        record.error = ErrorInfo(e["code"], e["type"], e["message"])
        record.input_tokens = metric.get("error_isl")
        return record
    record.chunk_ns = [record.start_ns + _ns(metric["time_to_first_token"])]
    for gap in metric.get("inter_chunk_latency", []):
        record.chunk_ns.append(record.chunk_ns[-1] + _ns(gap))
    record.first_output_ns = record.start_ns + _ns(metric["time_to_first_output_token"])
    record.input_tokens = metric["input_sequence_length"]
    record.output_tokens = metric["output_token_count"]
    # max_tokens is not exported; the OSL mismatch gives it back
    record.requested_osl = round(
        metric["output_sequence_length"] / (1 + metric["osl_mismatch_diff_pct"] / 100)
    )
    record.usage = {
        "prompt_tokens": metric["usage_prompt_tokens"],
        "completion_tokens": metric["usage_completion_tokens"],
        "total_tokens": metric["usage_total_tokens"],
        "prompt_tokens_details": {"cached_tokens": metric["usage_prompt_cache_read_tokens"]},
    }
    send_end = _ns(metric["http_req_sending"])
    receive_start = send_end + _ns(metric["http_req_waiting"])
    record.http = HttpTrace(
        send_start_ns=0,
        send_end_ns=send_end,
        receive_start_ns=receive_start,
        receive_end_ns=receive_start + _ns(metric["http_req_receiving"]),
        request_chunks=metric["http_req_chunks_sent"],
        response_chunks=metric["http_req_chunks_received"],
        request_bytes=round(metric["http_req_data_sent"] * 1024),
        response_bytes=round(metric["http_req_data_received"] * 1024),
        reused=bool(metric["http_req_connection_reused"]),
    )
    if not record.http.reused:
        record.http.connect_start_ns, record.http.connect_end_ns = (
            0,
            _ns(metric["http_req_connecting"]),
        )
    return record


def test_aiperfs_own_records_give_aiperfs_numbers(runs: Runs) -> None:
    from kvferry.bench.endpoint.metrics import parse_goodput

    lines = [json.loads(x) for x in (runs.aiperf / "profile_export.jsonl").open()]
    manifest = json.loads((runs.aiperf / "phase_manifest.json").read_text())
    windows = {p["phase_name"]: (p["start_ns"], p["end_ns"]) for p in manifest["phases"]}
    exported = _load(runs.aiperf)
    wrong = []
    for phase, want in (("profiling", exported), ("warmup", exported["warmup_metrics"])):
        records = [_rebuild(x) for x in lines if x["metadata"]["benchmark_phase"] == phase]
        run = aggregate(records, goodput=parse_goodput(GOODPUT), window_ns=windows[phase])
        for tag, metric in _metrics(want).items():
            if tag not in run.metrics:
                wrong.append(f"{phase} {tag}: missing")
                continue
            got = run.metrics[tag].to_json()
            # aiperf takes these two from float64 epoch-ns stamps (256 ns steps)
            abs_tol = 1e-3 if tag in ("credit_to_start_latency", "effective_latency") else 1e-9
            for stat, value in metric.items():
                if stat == "unit":
                    ok = got["unit"] == value
                else:
                    g = got.get(stat)
                    ok = isinstance(g, int | float) and math.isclose(
                        g, value, rel_tol=1e-6, abs_tol=abs_tol
                    )
                if not ok:
                    wrong.append(f"{phase} {tag} {stat}: kvferry {got.get(stat)}, aiperf {value}")
    assert not wrong, "\n".join(wrong)
