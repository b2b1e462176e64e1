"""A real transfer target in its own process, for tests and conformance checks.

``python -m kvferry.testing.target --size 8MiB --seed 7`` allocates a region filled with a seeded
pattern (``pattern``), optionally registers a plain numpy buffer as a second region, listens on a
free port, prints one JSON line (``{"name": ..., "pid": ..., "regions": [...]}``) and serves until
its stdin closes or it is killed. Tying its life to stdin means a target never outlives the test
process that started it, even when that process is killed.

``TargetProcess.start`` launches one and waits for that line. This module owns launching and
describing a target; it asserts nothing about transports (``transport_kit`` does).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np

from kvferry.launcher import await_line

DEFAULT_SIZE = 8 << 20
DEFAULT_SEED = 20240611


def pattern(seed: int, size: int) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """The bytes a target region starts with: seeded, so any process can recompute them."""
    return np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)


@dataclass
class TargetProcess:
    """A running target process and what it serves.

    Attributes:
        name: the segment name to open (``host:port``, or the published name with redis).
        pid: the target's process id.
        regions: one dict per served region: ``id``, ``size``, ``kind`` ("shm"/"registered"),
            ``seed`` (the pattern it was filled with).
    """

    name: str
    pid: int
    regions: list[dict[str, Any]]
    proc: subprocess.Popen[bytes] = field(repr=False)
    log: IO[bytes] = field(repr=False)

    @classmethod
    def start(
        cls,
        *,
        size: int = DEFAULT_SIZE,
        seed: int = DEFAULT_SEED,
        token: str | None = None,
        registered_size: int = 0,
        metadata_url: str | None = None,
        key_prefix: str = "kvferry",
        segment_name: str | None = None,
        startup_timeout: float = 30.0,
    ) -> TargetProcess:
        """Launch a target and wait until it serves.

        Raises:
            RuntimeError: the target exited or did not report its name within the timeout.
        """
        argv = [sys.executable, "-m", "kvferry.testing.target", "--size", str(size)]
        argv += ["--seed", str(seed), "--registered-size", str(registered_size)]
        if token is not None:
            argv += ["--token", token]
        if metadata_url is not None:
            argv += ["--metadata-url", metadata_url, "--key-prefix", key_prefix]
        if segment_name is not None:
            argv += ["--segment-name", segment_name]
        # stderr goes to a file, not a pipe: nobody drains a pipe while the target serves, and a
        # full one would block the target's logging (one warning per refused peer) mid-request.
        log = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the target
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
        try:
            line = _read_line(proc, startup_timeout, log)
            doc = json.loads(line)
        except BaseException:
            _reap(proc)
            log.close()
            raise
        return cls(name=doc["name"], pid=doc["pid"], regions=doc["regions"], proc=proc, log=log)

    def expected(self, index: int = 0) -> np.ndarray[Any, np.dtype[np.uint8]]:
        """The initial content of region ``index`` (in the order the target serves them)."""
        region = self.regions[index]
        return pattern(region["seed"], region["size"])

    def region_id(self, index: int = 0) -> int:
        return int(self.regions[index]["id"])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal(self, signum: int) -> None:
        if self.alive():
            os.kill(self.pid, signum)

    def kill(self) -> None:
        """SIGKILL the target (resuming it first if stopped) and reap it; idempotent."""
        _reap(self.proc)
        self.log.close()

    def stderr(self) -> str:
        """What the target logged so far (warnings about refused peers, tracebacks)."""
        self.log.seek(0)
        return self.log.read().decode(errors="replace")


def _read_line(proc: subprocess.Popen[bytes], timeout: float, log: IO[bytes]) -> str:
    def tail() -> str:
        log.seek(0)
        return log.read().decode(errors="replace")

    return await_line(proc, lambda line: True, timeout, what="target", tail=tail)


def _reap(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)
    for stream in (proc.stdin, proc.stdout):
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=DEFAULT_SIZE)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--registered-size", type=int, default=0)
    parser.add_argument("--token")
    parser.add_argument("--metadata-url")
    parser.add_argument("--key-prefix", default="kvferry")
    parser.add_argument("--segment-name")
    args = parser.parse_args(argv)

    from kvferry import KvferryConfig, TransferEngine

    listen: dict[str, Any] = {"port": 0}
    if args.token:
        listen["auth_token"] = args.token
    metadata: dict[str, Any] = {}
    if args.metadata_url:
        metadata = {"backend": "redis", "url": args.metadata_url, "key_prefix": args.key_prefix}
    engine = TransferEngine(KvferryConfig(listen=listen, metadata=metadata))
    regions = []
    region = engine.allocate(args.size)
    region.array[:] = pattern(args.seed, args.size)
    regions.append({"id": region.region_id, "size": region.size, "kind": "shm", "seed": args.seed})
    keep = None
    if args.registered_size:
        keep = pattern(args.seed + 1, args.registered_size)  # a plain numpy buffer, not shm
        reg = engine.register(keep)
        regions.append(
            {"id": reg.region_id, "size": reg.size, "kind": "registered", "seed": args.seed + 1}
        )
    name = engine.listen(args.segment_name)
    print(json.dumps({"name": name, "pid": os.getpid(), "regions": regions}), flush=True)
    try:
        sys.stdin.buffer.read()  # serve until the parent closes our stdin (or kills us)
    finally:
        engine.close()
        del keep


if __name__ == "__main__":
    main()
