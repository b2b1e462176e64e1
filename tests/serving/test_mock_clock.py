"""The simulated engine keeps its timing model's time (kvferry/serving/clock.py and the engine
loop of kvferry/serving/scheduler.py).

End to end: the real endpoint bench (:func:`run_serve_bench`, a worker process) measures a real
``kvferry serve mock`` process at speed-ups 1, 10 and 100, one request at a time, and its TTFT
and ITL (aiperf's: (latency - TTFT) / (OSL - 1)) are compared with what
:class:`~kvferry.serving.timing.TimingModel` gives for those requests. Issue 27: the engine slept
each step with ``asyncio.sleep``, whose epoll timeout is rounded up to whole milliseconds, so a
7.05 ms step took about 7.5 ms, a 0.7 ms step 1.2 ms and a 0.07 ms step up to 1.1 ms.

That check is about the simulator's clock, not the machine's speed, and its bounds say so:

- ITL within 5%. The first and last token of a request take the same path (engine, HTTP writer,
  socket, client process), so its length cancels out; what is left is how late each of the two
  arrives. The first is the later one: the client process went to sleep waiting for it, and on
  this shared 2-core VM it sees the first chunk 0.1-0.7 ms after the server sent it, up to 2 ms
  when other work holds the cores (measured with server-side timestamps). Each OSL makes the ITL
  window, (OSL - 1) model steps, about 65-70 ms, so that is at most 3%; before the fix the
  errors were +7%, +70% and +300% or more.
- TTFT never below the model (a token must not leave before its step ends) and at most 5% +
  5 ms above it: the model does not include the HTTP path (the client's send, aiohttp's parsing,
  the client's wake-up), 1-2 ms p50 here and up to 5 ms when the VM is busy. So this bound only
  catches a TTFT that is early or far off.
"""

from __future__ import annotations

import random
import statistics

import pytest

from kvferry.bench.endpoint import ServeBenchOptions, run_serve_bench
from kvferry.serving.timing import TimingModel
from kvferry.testing.mock_engine import MockServerProcess

VOCAB = 128256
ISL = 64
REQUESTS = 7
ITL_TOLERANCE = 0.05
TTFT_TOLERANCE = 0.05
TTFT_OVERHEAD_MS = 5.0


def ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(VOCAB) for _ in range(n)]


# --- end to end: what the endpoint bench measures ---------------------------------------------


@pytest.mark.parametrize(
    ("speedup", "osl"),
    [(1, 10), (10, 96), (100, 1024)],  # ITL windows of about 63, 67 and 72 ms
)
def test_bench_measures_the_timing_models_ttft_and_itl(speedup: int, osl: int) -> None:
    with MockServerProcess.start("--speedup-ratio", str(speedup)) as server:
        report = run_serve_bench(
            ServeBenchOptions(
                url=server.url,
                concurrency=(1,),
                request_count=REQUESTS,
                warmup_requests=1,
                isl=ISL,
                osl=osl,
            )
        )
    level = report.levels[0]
    records = [r for r in level.records if r.valid]
    assert len(records) == REQUESTS, [r.error for r in level.records]
    model = TimingModel(speedup_ratio=speedup)
    # One request at a time: its prefill is one step (a cached prefix shortens it), then one
    # decode step per further token, with a context of the prompt and the tokens so far.
    cached = [min(r.usage_cached_tokens or 0, ISL - 1) for r in records]
    ttft_model = statistics.median(model.prefill_ms([(ISL - c, c)]) for c in cached)
    itl_model = sum(model.decode_ms(1, ISL + k) for k in range(1, osl)) / (osl - 1)
    ttft = level.metrics.value("time_to_first_token", "p50")
    itl = level.metrics.value("inter_token_latency", "p50")
    assert ttft is not None and itl is not None
    assert itl == pytest.approx(itl_model, rel=ITL_TOLERANCE), (
        f"speedup {speedup}: ITL p50 {itl:.4f} ms, the model gives {itl_model:.4f} ms"
    )
    assert ttft_model * 0.999 <= ttft <= ttft_model * (1 + TTFT_TOLERANCE) + TTFT_OVERHEAD_MS, (
        f"speedup {speedup}: TTFT p50 {ttft:.4f} ms, the model gives {ttft_model:.4f} ms"
    )
