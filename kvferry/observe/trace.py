"""Trace files in Chrome's trace-event JSON format (opened by Perfetto and chrome://tracing).

Owns the writer only: components call ``span`` / ``instant`` / ``counter`` on the tracer they
were given, and this module turns the calls into events in a file. It decides nothing about what
is traced and never touches the store or the transfer engine.

File format: the JSON *array* form, one event per line::

    [
    {"name":"process_name","ph":"M","pid":7,"tid":0,"args":{"name":"kvferry"}},
    {"name":"get","cat":"store","ph":"X","ts":1234.500,"dur":8.250,"pid":7,"tid":9,"args":{...}},
    ...
    ]

The array form is chosen over the ``{"traceEvents": [...]}`` object form because the trace-event
format lets an array miss its closing ``]``: a process killed before ``close()`` still leaves a
file Perfetto opens. After ``close()`` the file is complete JSON (``json.load`` parses it).
``ts`` and ``dur`` are microseconds with three decimals (nanosecond resolution) on the monotonic
clock, so the files of several processes on one machine line up when opened together. Each
thread gets a ``thread_name`` metadata event the first time it records, so Perfetto shows its
name. Argument values that are not JSON scalars are written as text (bytes as hex).

Memory: events are buffered in a list under a lock and appended to the file every
``flush_every`` events, so a long run holds at most one batch in memory. No background thread.

Thread safety: every method may be called from any thread. The thread that fills the buffer
serialises and writes the batch; the others only wait for the short buffer lock.

After ``close()``: the tracer is a no-op. Events recorded later (a background demotion that
finishes after its store closed) are dropped and counted in ``dropped``, never raised: tracing
must not fail the data path. For the same reason a failed write (disk full) is logged once,
kept in ``error``, and turns the tracer off.

``NULL_TRACER`` is what components hold when tracing is off: its ``span()`` hands back one shared
no-op context manager, so the cost of an untraced span is an attribute lookup and a call (plus
the ``with`` protocol). ``open_tracer(path)`` picks one of the two from ``store.trace_file``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from json.encoder import encode_basestring_ascii as _esc
from types import TracebackType
from typing import IO, Final

from kvferry.errors import ConfigError

log = logging.getLogger("kvferry.observe.trace")

DEFAULT_FLUSH_EVERY: Final = 1024
"""Events buffered before a batch is appended to the file."""

_Event = tuple[str, str, str, int, int, int, dict[str, object] | None]
"""(ph, name, cat, ts_ns, dur_ns, tid, args): kept as a tuple, formatted to JSON at flush."""

# monotonic_ns: the same clock in every process of the machine, so their files line up.
_now_ns = time.monotonic_ns


def _jsonable(value: object) -> object:
    """``json`` fallback for span arguments: bytes (block hashes) as hex, others as str."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()
    return str(value)


# One encoder for odd argument values: json.dumps with options builds a new encoder per call.
_ENCODER: Final = json.JSONEncoder(default=_jsonable, separators=(",", ":"))


def _encode_args(args: dict[str, object]) -> str:
    # Hand-formatting the usual scalar types is ~4x faster than the json encoder (which costs
    # ~1 us per small dict); anything else goes through the encoder.
    parts = []
    for key, value in args.items():
        if isinstance(value, bool) or value is None:
            text = "true" if value else ("false" if value is False else "null")
        elif isinstance(value, int):
            text = str(value)
        elif isinstance(value, float) and math.isfinite(value):
            text = repr(value)
        elif isinstance(value, str):
            text = _esc(value)
        elif isinstance(value, bytes):
            text = '"' + value.hex() + '"'
        else:
            text = _ENCODER.encode(value)
        parts.append(_esc(key) + ":" + text)
    return "{" + ",".join(parts) + "}"


def _us(ns: int) -> str:
    # Integer nanoseconds printed as microseconds with 3 decimals: exact, and cheaper than
    # repr() of a large float.
    q, r = divmod(ns, 1000)
    return f"{q}.{r:03d}"


def _format(event: _Event, pid: int) -> str:
    ph, name, cat, ts, dur, tid, args = event
    if ph == "X":
        out = (
            f'{{"name":{_esc(name)},"cat":{_esc(cat)},"ph":"X","ts":{_us(ts)},'
            f'"dur":{_us(dur)},"pid":{pid},"tid":{tid}'
        )
    elif ph == "i":
        out = (
            f'{{"name":{_esc(name)},"cat":{_esc(cat)},"ph":"i","s":"t","ts":{_us(ts)},'
            f'"pid":{pid},"tid":{tid}'
        )
    elif ph == "C":
        out = f'{{"name":{_esc(name)},"ph":"C","ts":{_us(ts)},"pid":{pid},"tid":{tid}'
    else:  # "M": metadata (process and thread names) has no time
        out = f'{{"name":{_esc(name)},"ph":"M","pid":{pid},"tid":{tid}'
    if args:
        out += ',"args":' + _encode_args(args)
    return out + "}"


class _NullSpan:
    """The shared no-op span that ``NullTracer.span`` returns."""

    __slots__ = ()

    def __enter__(self) -> _NullSpan:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    def set(self, **args: object) -> None:
        """Add arguments to the span (ignored)."""


_NULL_SPAN: Final = _NullSpan()


class NullTracer:
    """A tracer that records nothing; what components hold when tracing is off."""

    __slots__ = ()

    enabled: Final = False
    """False: callers may skip computing costly span arguments."""

    def span(self, name: str, cat: str = "", **args: object) -> _NullSpan:
        return _NULL_SPAN

    def instant(self, name: str, cat: str = "", **args: object) -> None:
        return None

    def counter(self, name: str, values: dict[str, float]) -> None:
        return None

    def flush(self) -> None:
        return None

    def close(self) -> None:
        return None

    def __enter__(self) -> NullTracer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None


NULL_TRACER: Final = NullTracer()


class _Span:
    """One complete ("X") event: timed from ``__enter__`` to ``__exit__``."""

    __slots__ = ("_start_ns", "args", "cat", "name", "tracer")

    def __init__(self, tracer: Tracer, name: str, cat: str, args: dict[str, object]) -> None:
        self.tracer = tracer
        self.name = name
        self.cat = cat
        self.args = args
        self._start_ns = 0

    def __enter__(self) -> _Span:
        self._start_ns = _now_ns()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        end_ns = _now_ns()
        if exc_type is not None:
            # The span still ends; the failure shows in its args instead of vanishing.
            self.args["error"] = exc_type.__name__
        start = self._start_ns
        self.tracer._record("X", self.name, self.cat, start, max(0, end_ns - start), self.args)

    def set(self, **args: object) -> None:
        """Add arguments known only inside the span (bytes moved, blocks hit)."""
        self.args.update(args)


class Tracer:
    """Writes Chrome trace-event JSON to ``path`` (see the module docstring for the format).

    Args:
        path: the file to write; created or truncated now.
        flush_every: events buffered before a batch is appended to the file.
        process_name: the name Perfetto shows for this process.

    Raises:
        ConfigError: ``path`` cannot be opened for writing, or ``flush_every`` < 1.
    """

    enabled: Final = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        flush_every: int = DEFAULT_FLUSH_EVERY,
        process_name: str = "kvferry",
    ) -> None:
        if flush_every < 1:
            raise ConfigError(f"flush_every={flush_every!r} is invalid; it must be >= 1")
        self.path = os.fspath(path)
        self.pid = os.getpid()
        self.flush_every = flush_every
        self.dropped = 0
        """Events recorded after close (or after a write error) and so not written."""
        self.written = 0
        """Events written to the file so far (metadata events included)."""
        self.error: OSError | None = None
        """The write error that turned the tracer off, if any."""
        # _io_lock (file, first-line state) is always taken before _lock (buffer), never after.
        self._lock = threading.Lock()
        self._io_lock = threading.Lock()
        self._buffer: list[_Event] = []
        self._tids: set[int] = set()
        self._closed = False
        self._first = True
        try:
            self._file: IO[str] | None = open(self.path, "w", encoding="utf-8")  # noqa: SIM115
            self._file.write("[\n")
        except OSError as e:
            raise ConfigError(
                f"trace file {self.path!r} cannot be opened for writing: {e.strerror or e}"
            ) from e
        self._buffer.append(("M", "process_name", "", 0, 0, 0, {"name": process_name}))

    @property
    def closed(self) -> bool:
        return self._closed

    def span(self, name: str, cat: str = "", **args: object) -> _Span:
        """A context manager that records a complete event ("ph": "X") when it exits.

        ``with tracer.span("get", "store", blocks=4) as s: ...; s.set(hit=3)``. An exception
        leaving the block is recorded as ``args["error"]`` (its class name) and re-raised.
        """
        return _Span(self, name, cat, args)

    def instant(self, name: str, cat: str = "", **args: object) -> None:
        """Record an instant event ("ph": "i", thread scope) at the current time."""
        self._record("i", name, cat, _now_ns(), 0, args)

    def counter(self, name: str, values: dict[str, float]) -> None:
        """Record a counter event ("ph": "C"): one track per key of ``values``.

        Raises:
            ValueError, TypeError: a value is not a number (from ``float()``).
        """
        numbers: dict[str, object] = {k: float(v) for k, v in values.items()}
        self._record("C", name, "", _now_ns(), 0, numbers)

    def _record(
        self, ph: str, name: str, cat: str, ts: int, dur: int, args: dict[str, object]
    ) -> None:
        tid = threading.get_native_id()
        with self._lock:
            if self._closed:
                self.dropped += 1
                return
            if tid not in self._tids:
                # Name the thread once so Perfetto shows "disk-io-0" rather than a number.
                self._tids.add(tid)
                thread: dict[str, object] = {"name": threading.current_thread().name}
                self._buffer.append(("M", "thread_name", "", 0, 0, tid, thread))
            self._buffer.append((ph, name, cat, ts, dur, tid, args))
            full = len(self._buffer) >= self.flush_every
        if full:
            self.flush()

    def flush(self) -> None:
        """Append the buffered events to the file now."""
        with self._io_lock:
            with self._lock:
                batch, self._buffer = self._buffer, []
            self._write(batch)

    def _write(self, batch: list[_Event]) -> None:
        # Caller holds _io_lock. Serialising outside _lock keeps recording threads unblocked.
        if not batch or self._file is None:
            return
        pid = self.pid
        text = ",\n".join([_format(e, pid) for e in batch])
        try:
            self._file.write(text if self._first else ",\n" + text)
            self._file.flush()
        except OSError as e:
            self._fail(e, len(batch))
            return
        self._first = False
        self.written += len(batch)

    def _fail(self, error: OSError, lost: int) -> None:
        # Caller holds _io_lock. Tracing is off from here on; the data path keeps running.
        log.warning("trace file %s: write failed, tracing stops: %s", self.path, error)
        self.error = error
        with self._lock:
            self._closed = True
            self.dropped += lost + len(self._buffer)
            self._buffer = []
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None

    def close(self) -> None:
        """Write the remaining events and the closing bracket; idempotent.

        The file then parses with ``json.load``. Later calls on this tracer are no-ops (their
        events are counted in ``dropped``).
        """
        with self._io_lock:
            with self._lock:
                if self._closed and self._file is None:
                    return
                self._closed = True
                batch, self._buffer = self._buffer, []
            self._write(batch)
            if self._file is None:  # the last write failed
                return
            try:
                self._file.write("\n]\n")
                self._file.close()
            except OSError as e:
                self._fail(e, 0)
            self._file = None

    def __enter__(self) -> Tracer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def open_tracer(
    path: str, *, flush_every: int = DEFAULT_FLUSH_EVERY, process_name: str = "kvferry"
) -> Tracer | NullTracer:
    """``NULL_TRACER`` for ``""`` (tracing off, the ``store.trace_file`` default), else a Tracer.

    Raises:
        ConfigError: the file cannot be opened for writing, or ``flush_every`` < 1.
    """
    if not path:
        return NULL_TRACER
    return Tracer(path, flush_every=flush_every, process_name=process_name)
