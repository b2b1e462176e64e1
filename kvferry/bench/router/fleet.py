"""The processes of a router bench run and what is read from them: ``kvferry serve mock`` workers,
the ``kvferry serve router`` in front of them, and the counters that say what happened.

Owns starting a ``kvferry serve mock|router --port 0 --quiet`` child (:class:`ServeProcess`,
through :mod:`kvferry.launcher`: its ready line awaited with a real deadline, its stderr quoted
when it fails, the child stopped and reaped on close), and reading
``/metrics`` and ``/router/stats`` over plain HTTP (:func:`worker_counters`,
:func:`router_stats`). ``KVFERRY_*`` variables are not passed to the children: a run's fleet is
what its options say. Nothing here measures or decides (:mod:`kvferry.bench.router.harness`).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from kvferry.errors import KvferryError
from kvferry.launcher import LaunchError, launch

__all__ = [
    "RouterBenchError",
    "ServeProcess",
    "WorkerCounters",
    "router_stats",
    "worker_counters",
]


class RouterBenchError(KvferryError):
    """The router bench cannot run: a worker or the router did not start, or cannot be read."""


class ServeProcess:
    """A running ``kvferry serve KIND --port 0 --quiet ARGS`` child on 127.0.0.1.

    Args:
        kind: ``mock`` or ``router``.
        args: more flags of that command.
        timeout_s: seconds to wait for its ready line (``kvferry-KIND-ready HOST:PORT``).

    Raises:
        RouterBenchError: it exited or printed no ready line in time (the message has its exit
            status and the end of its stderr).
    """

    def __init__(self, kind: str, args: Sequence[str], *, timeout_s: float = 60.0) -> None:
        self.kind = kind
        argv = [sys.executable, "-m", "kvferry", "serve", kind, "--port", "0", "--quiet", *args]
        env = {k: v for k, v in os.environ.items() if not k.startswith("KVFERRY_")}
        marker = f"kvferry-{kind}-ready "
        try:
            self._child, line = launch(
                argv, marker, timeout_s, what=f"kvferry serve {kind}", env=env
            )
        except LaunchError as e:
            raise RouterBenchError(str(e)) from e
        self.url = f"http://{line.split()[1]}"

    def close(self) -> None:
        """Stop the child (SIGTERM, then SIGKILL after 10 s) and reap it; idempotent."""
        self._child.stop(timeout=10)

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _get(url: str, timeout_s: float = 10.0) -> str:
    """The body of ``GET url``.

    Raises:
        RouterBenchError: no answer, or not a 200.
    """
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            body: bytes = r.read()
    except urllib.error.HTTPError as e:
        e.close()
        raise RouterBenchError(f"GET {url} answered {e.code}") from e
    except (urllib.error.URLError, OSError) as e:
        raise RouterBenchError(f"GET {url} failed: {getattr(e, 'reason', e)}") from e
    return body.decode(errors="replace")


def _samples(text: str) -> dict[str, float]:
    """Prometheus text as ``{metric name: value summed over its labels}``."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        with contextlib.suppress(ValueError):
            out[name] = out.get(name, 0.0) + float(value)
    return out


@dataclass(frozen=True)
class WorkerCounters:
    """What a worker counted so far: prefix-cache hits out of lookups, and preemptions.

    ``basis`` is ``blocks`` for a kvferry mock (``kvferry_mock_{hit,prompt}_blocks_total``) and
    ``tokens`` for vLLM (``vllm:prefix_cache_{hits,queries}_total``)."""

    hits: float
    lookups: float
    preemptions: float
    basis: str

    def __sub__(self, before: WorkerCounters) -> WorkerCounters:
        return WorkerCounters(
            self.hits - before.hits,
            self.lookups - before.lookups,
            self.preemptions - before.preemptions,
            self.basis,
        )


def worker_counters(url: str) -> WorkerCounters:
    """The counters of the worker at ``url`` (its ``/metrics``).

    Raises:
        RouterBenchError: it cannot be read, or exposes neither kvferry mock nor vLLM counters.
    """
    samples = _samples(_get(url.rstrip("/") + "/metrics"))
    if "kvferry_mock_prompt_blocks_total" in samples:
        return WorkerCounters(
            samples.get("kvferry_mock_hit_blocks_total", 0.0),
            samples["kvferry_mock_prompt_blocks_total"],
            samples.get("kvferry_mock_preemptions_total", 0.0),
            "blocks",
        )
    if "vllm:prefix_cache_queries_total" in samples:
        return WorkerCounters(
            samples.get("vllm:prefix_cache_hits_total", 0.0),
            samples["vllm:prefix_cache_queries_total"],
            samples.get("vllm:num_preemptions_total", 0.0),
            "tokens",
        )
    raise RouterBenchError(
        f"{url}/metrics has neither kvferry mock nor vLLM prefix-cache counters: is it a "
        "kvferry serve mock or a vLLM server?"
    )


def router_stats(url: str) -> dict[str, Any]:
    """``GET /router/stats`` of the router at ``url``.

    Raises:
        RouterBenchError: it cannot be read.
    """
    try:
        stats: dict[str, Any] = json.loads(_get(url.rstrip("/") + "/router/stats"))
    except ValueError as e:
        raise RouterBenchError(f"{url}/router/stats is not JSON: {e}") from e
    return stats
