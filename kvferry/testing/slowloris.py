"""Slow HTTP clients for tests of the listeners' slowloris defence.

:class:`Trickle` opens many real TCP connections to a server and, from one thread, sends each a
request's headers one byte at a time and never finishes them, noting when the server closes
each one. Tests use it to show that a good client still gets served while the trickle runs and
that the trickling connections are closed (:mod:`kvferry.admission`). This module asserts
nothing.
"""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from types import TracebackType

__all__ = ["Trickle"]

HEAD = b"GET /health HTTP/1.1\r\nHost: kvferry\r\nX-Trickle: "
"""What each connection sends, one byte at a time, followed by endless ``a``: the headers
never end."""


class Trickle:
    """``n`` connections from ``source`` (an IP address of this host: 127.0.0.2 is another
    client than 127.0.0.1 on Linux loopback) to ``host:port``, each sending one more header
    byte every ``interval`` seconds until the server closes it or :meth:`stop`.

    Raises:
        OSError: a connection could not be opened.
    """

    def __init__(
        self, host: str, port: int, n: int, *, source: str = "127.0.0.1", interval: float = 0.2
    ) -> None:
        self.opened_at = time.monotonic()
        self._socks: dict[socket.socket, int] = {}  # socket -> bytes sent
        self.closed: dict[int, float] = {}
        """Connection number -> seconds after :attr:`opened_at` when the server closed it."""
        self._numbers: dict[socket.socket, int] = {}
        for i in range(n):
            s = socket.create_connection((host, port), timeout=5, source_address=(source, 0))
            s.setblocking(False)
            s.send(HEAD[:1])
            self._socks[s] = 1
            self._numbers[s] = i
        self._n = n
        self._interval = interval
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="trickle", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            with self._lock:
                socks = list(self._socks)
            if not socks:
                return
            readable, _, _ = select.select(socks, [], [], 0)
            gone = set()
            for s in readable:
                try:
                    if not s.recv(65536):
                        gone.add(s)
                except OSError:
                    gone.add(s)
            for s in socks:
                if s in gone:
                    continue
                sent = self._socks[s]
                byte = HEAD[sent : sent + 1] or b"a"
                try:
                    s.send(byte)
                except OSError:
                    gone.add(s)
                    continue
                self._socks[s] = sent + 1
            now = time.monotonic() - self.opened_at
            with self._lock:
                for s in gone:
                    self.closed[self._numbers[s]] = now
                    del self._socks[s]
                    s.close()

    def open(self) -> int:
        """Connections the server has not closed (as of the thread's last look)."""
        with self._lock:
            return len(self._socks)

    def wait_closed(self, timeout: float) -> bool:
        """Wait until the server closed every connection; False if ``timeout`` passed first."""
        deadline = time.monotonic() + timeout
        while self.open():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def stop(self) -> None:
        """Stop trickling and close the connections still open."""
        self._stop.set()
        self._thread.join(timeout=10)
        with self._lock:
            for s in self._socks:
                with contextlib.suppress(OSError):
                    s.close()
            self._socks.clear()

    def __enter__(self) -> Trickle:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
