"""Chrome trace-event writer: real files, real threads, parsed back with json.load."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from kvferry.errors import ConfigError
from kvferry.observe.trace import NULL_TRACER, NullTracer, Tracer, open_tracer


def _load(path: Path) -> list[dict[str, object]]:
    with path.open(encoding="utf-8") as f:
        events = json.load(f)
    assert isinstance(events, list)
    return events


def _timed(events: list[dict[str, object]]) -> list[dict[str, object]]:
    return [e for e in events if e["ph"] != "M"]


def test_spans_instants_counters_from_several_threads(tmp_path: Path) -> None:
    path = tmp_path / "trace.json"
    # flush_every=7: several partial flushes happen while threads record, not just one at close.
    tracer = Tracer(path, flush_every=7)
    threads_n, spans_per_thread = 4, 50
    start = threading.Barrier(threads_n)

    def work(i: int) -> None:
        start.wait()
        for j in range(spans_per_thread):
            with tracer.span("get", "store", thread=i, seq=j, key=b"\x00\xff") as span:
                span.set(hit=j % 2 == 0)
        tracer.instant("evict", "store", thread=i)

    threads = [threading.Thread(target=work, args=(i,), name=f"w{i}") for i in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tracer.counter("usage", {"cpu": 3, "disk": 1.5})
    tracer.close()

    events = _load(path)
    spans = [e for e in events if e["ph"] == "X"]
    assert len(spans) == threads_n * spans_per_thread
    assert {e["name"] for e in spans} == {"get"}
    assert all(e["cat"] == "store" for e in spans)
    assert all(isinstance(e["dur"], float) and e["dur"] >= 0 for e in spans)
    assert all(isinstance(e["ts"], float) and e["ts"] > 0 for e in spans)
    # Every (thread, seq) pair arrived exactly once, with its args intact.
    seen = sorted((e["args"]["thread"], e["args"]["seq"]) for e in spans)  # type: ignore[index]
    assert seen == [(i, j) for i in range(threads_n) for j in range(spans_per_thread)]
    assert all(e["args"]["key"] == "00ff" for e in spans)  # type: ignore[index]
    assert all(e["args"]["hit"] == (e["args"]["seq"] % 2 == 0) for e in spans)  # type: ignore[index]

    instants = [e for e in events if e["ph"] == "i"]
    assert sorted(e["args"]["thread"] for e in instants) == list(range(threads_n))  # type: ignore[index]
    counters = [e for e in events if e["ph"] == "C"]
    assert counters == [
        {
            "name": "usage",
            "ph": "C",
            "ts": counters[0]["ts"],
            "pid": counters[0]["pid"],
            "tid": counters[0]["tid"],
            "args": {"cpu": 3.0, "disk": 1.5},
        }
    ]
    # One thread_name record per recording thread (4 workers + the main thread).
    names = {e["args"]["name"] for e in events if e["name"] == "thread_name"}  # type: ignore[index]
    assert names == {"w0", "w1", "w2", "w3", threading.current_thread().name}
    assert tracer.written == len(events)


def test_span_records_an_exception_and_reraises(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    with Tracer(path) as tracer, pytest.raises(KeyError), tracer.span("lookup", "index"):
        raise KeyError("x")
    (span,) = [e for e in _load(path) if e["ph"] == "X"]
    assert span["args"] == {"error": "KeyError"}


def test_nested_spans_nest_in_time(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    with Tracer(path) as tracer, tracer.span("outer"), tracer.span("inner"):
        pass
    spans = {e["name"]: e for e in _load(path) if e["ph"] == "X"}
    outer, inner = spans["outer"], spans["inner"]
    assert outer["ts"] <= inner["ts"]  # type: ignore[operator]
    assert inner["ts"] + inner["dur"] <= outer["ts"] + outer["dur"]  # type: ignore[operator]
    assert "cat" not in outer or outer["cat"] == ""


def test_close_is_idempotent_and_later_events_are_dropped(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    tracer = Tracer(path)
    with tracer.span("before"):
        pass
    tracer.close()
    tracer.close()
    assert tracer.closed
    text = path.read_text(encoding="utf-8")
    # Documented choice: after close the tracer is a no-op that counts what it dropped.
    with tracer.span("after"):
        pass
    tracer.instant("after")
    tracer.counter("after", {"x": 1})
    tracer.flush()
    tracer.close()
    assert tracer.dropped == 3
    assert path.read_text(encoding="utf-8") == text
    assert [e["name"] for e in _timed(_load(path))] == ["before"]


def test_empty_trace_is_valid_json(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    Tracer(path, process_name="bench").close()
    events = _load(path)
    assert events == [
        {
            "name": "process_name",
            "ph": "M",
            "pid": events[0]["pid"],
            "tid": 0,
            "args": {"name": "bench"},
        }
    ]


def test_unflushed_file_is_an_unterminated_array(tmp_path: Path) -> None:
    # What a killed process leaves: "[" plus whole batches, which trace viewers accept.
    path = tmp_path / "t.json"
    tracer = Tracer(path, flush_every=2)
    for _ in range(3):
        with tracer.span("s"):
            pass
    text = path.read_text(encoding="utf-8")
    assert text.startswith("[\n")
    assert json.loads(text + "\n]")[-1]["name"] == "s"
    tracer.close()
    assert len(_timed(_load(path))) == 3


def test_odd_argument_values_are_written_as_text(tmp_path: Path) -> None:
    path = tmp_path / "t.json"
    with Tracer(path) as tracer:
        tracer.instant("odd", "x", obj=Path("a/b"), n=None, f=float("inf"), s='a"\n', ok=True)
    (event,) = _timed(_load(path))
    args = event["args"]
    assert isinstance(args, dict)
    assert args["obj"] == "a/b" and args["n"] is None and args["s"] == 'a"\n' and args["ok"] is True
    assert args["f"] == float("inf")


def test_bad_path_and_flush_every_raise_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be opened"):
        Tracer(tmp_path / "missing-dir" / "t.json")
    with pytest.raises(ConfigError, match="flush_every"):
        Tracer(tmp_path / "t.json", flush_every=0)


def test_open_tracer_and_null_tracer(tmp_path: Path) -> None:
    null = open_tracer("")
    assert null is NULL_TRACER and isinstance(null, NullTracer) and not null.enabled
    # One shared no-op span object: no allocation per untraced span.
    first = null.span("a", "b", x=1)
    assert first is null.span("c")
    with first as span:
        span.set(y=2)
    null.instant("x")
    null.counter("x", {"a": 1})
    null.close()

    path = tmp_path / "t.json"
    tracer = open_tracer(str(path), flush_every=3)
    assert isinstance(tracer, Tracer) and tracer.enabled and tracer.flush_every == 3
    tracer.close()
    assert _load(path)[0]["name"] == "process_name"


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_a_failed_write_turns_tracing_off_without_raising() -> None:
    # /dev/full: every write fails with ENOSPC, a real disk-full condition.
    tracer = Tracer("/dev/full", flush_every=1)
    with tracer.span("first"):
        pass
    assert isinstance(tracer.error, OSError)
    assert tracer.closed and tracer.dropped >= 1
    with tracer.span("later"):
        pass
    tracer.close()
    assert tracer.written == 0
