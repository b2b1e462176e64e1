"""What a store-bench run is asked to do: :class:`StoreBenchOptions`, typed and validated.

Owns the options (master_bench's flags: backend, op, value size, batch, clients x threads,
duration, keys, read ratio, seed, verify, slot size, a running server's address), the ops and the
phase each one times, and the slot size a value gets by default. Nothing here runs anything.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvferry.bench.store.backends import BACKENDS
from kvferry.bench.store.client import BULK_BATCH
from kvferry.errors import ConfigError

__all__ = ["OPS", "PERF_PHASE", "StoreBenchOptions", "auto_slot_size"]

OPS = ("put", "get", "batch-put", "batch-get", "mixed")
PERF_PHASE = {
    "put": "write_perf",
    "batch-put": "write_perf",
    "get": "read_perf",
    "batch-get": "read_perf",
    "mixed": "mixed",
}
"""The timed phase each op runs."""


@dataclass(frozen=True)
class StoreBenchOptions:
    """One store bench run (sizes in bytes, times in seconds); flag names in ``validate``.

    Validated on construction: a value that makes no sense raises ConfigError naming the flag.
    """

    backend: str = "cpu"
    """A name of :data:`~kvferry.bench.store.backends.BACKENDS`."""
    op: str = "batch-get"
    value_size: int = 4096
    batch_size: int = 0
    """Keys per call of batch-put, batch-get and mixed; 0 = 128 for batch ops, 1 otherwise."""
    clients: int = 1
    """Client processes (the first runs in this process when there is only one)."""
    threads: int = 1
    """Threads per client process."""
    duration: float = 5.0
    warmup: float = 1.0
    num_keys: int = 10_000
    read_ratio: float = 0.9
    """Fraction of gets in the mixed phase."""
    seed: int = 0
    verify: bool = True
    slot_size: int = 0
    """store.slot_size; 0 = value_size rounded up (see :func:`auto_slot_size`)."""
    address: str | None = None
    """server: a running store server; mooncake: a running master (host:port). None: start one."""
    overfill: bool = False
    """Allow ``num_keys`` beyond what the capacity holds below the eviction threshold: the store
    evicts while it is filled and measured (a churn workload, for the eviction knobs); verify
    counts the keys evicted as evicted, not as lost."""
    reference: bool = False
    """disk: also run fio on the tier's directory with the same block size, direction, jobs and
    direct I/O, for the timed phase's duration: the device's speed in the same run."""

    @property
    def batch(self) -> int:
        if self.batch_size:
            return self.batch_size
        return BULK_BATCH if self.op.startswith("batch-") else 1

    @property
    def phases(self) -> tuple[str, ...]:
        perf = PERF_PHASE.get(self.op, "read_perf")
        return ("fill", perf, "verify") if self.verify else ("fill", perf)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raises ConfigError naming the flag when a value makes no sense."""
        takes_address = [b.name for b in BACKENDS.values() if "--address" in b.settings]
        checks = [
            (self.backend in BACKENDS, "--backend", self.backend, ", ".join(BACKENDS)),
            (self.op in OPS, "--op", self.op, ", ".join(OPS)),
            (self.value_size >= 1, "--value-size", self.value_size, ">= 1 byte"),
            (0 <= self.batch_size <= 65536, "--batch-size", self.batch_size, "1..65536"),
            (
                self.batch_size <= 1 or self.op not in ("put", "get"),
                "--batch-size",
                self.batch_size,
                f"1 with --op {self.op} (one key per call); use --op batch-{self.op}",
            ),
            (1 <= self.clients <= 256, "--clients", self.clients, "1..256"),
            (1 <= self.threads <= 256, "--threads", self.threads, "1..256"),
            (self.duration > 0, "--duration", self.duration, "> 0 seconds"),
            (self.warmup >= 0, "--warmup", self.warmup, ">= 0 seconds"),
            (self.num_keys >= 1, "--num-keys", self.num_keys, ">= 1"),
            (
                self.num_keys >= self.batch or self.op in ("put", "batch-put"),
                "--num-keys",
                self.num_keys,
                f">= the batch size ({self.batch}) so one batch reads distinct keys",
            ),
            (0.0 <= self.read_ratio <= 1.0, "--read-ratio", self.read_ratio, "in [0, 1]"),
            (
                self.slot_size == 0 or self.slot_size >= self.value_size,
                "--slot-size",
                self.slot_size,
                f">= --value-size ({self.value_size})",
            ),
            (
                self.address is None or self.backend in takes_address,
                "--address",
                self.address,
                f"given only with --backend {' or '.join(takes_address)}",
            ),
            (
                self.address is None or _is_host_port(self.address),
                "--address",
                self.address,
                "HOST:PORT",
            ),
        ]
        for ok, flag, value, valid in checks:
            if not ok:
                raise ConfigError(f"{flag} {value!r} is invalid: must be {valid}")


def _is_host_port(text: str) -> bool:
    host, sep, port = text.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


def auto_slot_size(value_size: int) -> int:
    """The slot for a value: a multiple of 4 KiB from 4 KiB up (page-aligned slots for the disk
    tier's O_DIRECT), else the next power of two, at least 64 bytes (store.slot_size minimum)."""
    if value_size >= 4096:
        return -(-value_size // 4096) * 4096
    return max(64, 1 << (value_size - 1).bit_length())
