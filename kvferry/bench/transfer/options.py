"""What a transfer-bench run is asked to do: the sweep's options and the engines it measures.

Owns :class:`TransferBenchOptions` (tebench's flags as typed, validated fields) and the grammar
of its ``backend`` field: comma-separated entries, each ``NAME`` or
``NAME+SECTION.KEY=VALUE[+...]``, a backend with config overrides of its own
(``kvferry,kvferry+transfer.grace_period_ns=200000``), so that two configs of one engine (or
kvferry and Mooncake) are measured side by side in one run. Each entry is a
:class:`ContenderSpec`; :meth:`ContenderSpec.config` lays its overrides over the run's config
with the config loader's own checks and messages. Nothing here measures or starts anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from pydantic import SecretStr

from kvferry.config.loader import load_config
from kvferry.config.models import KvferryConfig
from kvferry.errors import ConfigError

__all__ = ["ContenderSpec", "TransferBenchOptions", "parse_contenders"]


@dataclass(frozen=True)
class ContenderSpec:
    """One ``backend`` entry: an engine (a registry name) and the config overrides it runs with.

    ``label`` (the entry as typed) names its results, so two configs of one engine differ.
    """

    label: str
    name: str
    overrides: Mapping[str, str] = field(default_factory=dict)

    def config(self, base: KvferryConfig) -> KvferryConfig:
        """``base`` with this entry's overrides on top (the same precedence as a flag).

        Raises:
            ConfigError: an unknown key or a value the config rejects; the message names the
                key, the value and this entry (``--backend kvferry+transfer.x=1``).
        """
        if not self.overrides:
            return base
        flags: dict[str, object] = {}
        for section, body in base.model_dump(mode="json").items():
            if not isinstance(body, dict):
                continue
            model = getattr(base, section)
            for key, value in body.items():
                actual = getattr(model, key)
                # model_dump masks secrets; the entry's config must keep the real token
                flags[f"{section}.{key}"] = (
                    actual.get_secret_value() if isinstance(actual, SecretStr) else value
                )
        flags.update(self.overrides)
        names = {key: f"--backend {self.label}" for key in self.overrides}
        return load_config(flags=flags, flag_names=names, environ={}).config


def parse_contenders(text: str) -> list[ContenderSpec]:
    """The entries of a ``backend`` value, in order.

    Raises:
        ConfigError: an empty list, an entry named twice, or an override that is not
            ``SECTION.KEY=VALUE``.
    """
    labels = [b.strip() for b in text.split(",") if b.strip()]
    if not labels:
        raise ConfigError("--backend is empty; use kvferry, mooncake or both comma-separated")
    if len(set(labels)) != len(labels):
        raise ConfigError(
            f"--backend {text!r} names an entry twice; to compare two configs of one "
            "engine, give one of them overrides (kvferry,kvferry+transfer.workers=2)"
        )
    specs = []
    for label in labels:
        name, *pairs = label.split("+")
        overrides: dict[str, str] = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or "." not in key.strip(".") or not value:
                raise ConfigError(
                    f"--backend entry {label!r}: {pair!r} is not SECTION.KEY=VALUE (e.g. "
                    "kvferry+transfer.grace_period_ns=200000)"
                )
            overrides[key] = value
        specs.append(ContenderSpec(label, name.strip(), overrides))
    return specs


@dataclass(frozen=True)
class TransferBenchOptions:
    """One sweep, with tebench's flag names and defaults (sizes in bytes, times in seconds).

    Validated on construction: a value that makes no sense raises ConfigError naming the flag.
    """

    backend: str = "kvferry"
    """Comma-separated entries, each ``NAME`` or ``NAME+SECTION.KEY=VALUE[+...]`` (see
    :func:`parse_contenders`); every entry gets a target of its own and the cases alternate
    between them."""
    seg_type: str = "DRAM"
    """Where the buffers live: DRAM, or VRAM (the first CUDA device)."""
    total_buffer_size: int = 1 << 30
    """Bytes of buffer per side."""
    start_block_size: int = 4096
    max_block_size: int = 1 << 26
    start_batch_size: int = 1
    max_batch_size: int = 1
    max_threads: int = 1
    duration: float = 5.0
    """Seconds measured per case (and round)."""
    warmup: float = 1.0
    """Seconds run before measuring, per case."""
    op: str = "read"
    """read (target -> local), write (local -> target) or mix (alternating)."""
    check_consistency: bool = False
    """After each case write a pattern, read it back and compare every byte."""
    transport: str = "auto"
    pin_threads: bool = True
    """Bind bench thread t to the CPUs of NUMA node t mod nodes."""
    rounds: int = 1
    """Run each case this many times, alternating the contenders round by round."""
    target_seg: str | None = None
    """HOST:PORT of a running target (``--target-seg``); None: start one on loopback per
    contender (``--local``)."""
    reference: bool = False
    """Also measure a plain socket stream and memcpy in the same run."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raises ConfigError naming the flag when a value makes no sense."""
        checks = [
            (self.total_buffer_size > 0, "--total-buffer-size", self.total_buffer_size, "> 0"),
            (self.start_block_size > 0, "--start-block-size", self.start_block_size, "> 0"),
            (
                self.max_block_size >= self.start_block_size,
                "--max-block-size",
                self.max_block_size,
                f">= --start-block-size ({self.start_block_size})",
            ),
            (self.start_batch_size >= 1, "--start-batch-size", self.start_batch_size, ">= 1"),
            (
                self.max_batch_size >= self.start_batch_size,
                "--max-batch-size",
                self.max_batch_size,
                f">= --start-batch-size ({self.start_batch_size})",
            ),
            (1 <= self.max_threads <= 256, "--max-threads", self.max_threads, "1..256"),
            (self.duration > 0, "--duration", self.duration, "> 0 seconds"),
            (self.warmup >= 0, "--warmup", self.warmup, ">= 0 seconds"),
            (1 <= self.rounds <= 1000, "--rounds", self.rounds, "1..1000"),
            (self.op in ("read", "write", "mix"), "--op", self.op, "read, write or mix"),
            (self.seg_type in ("DRAM", "VRAM"), "--seg-type", self.seg_type, "DRAM or VRAM"),
            (
                self.target_seg is None or bool(self.target_seg.strip()),
                "--target-seg",
                self.target_seg,
                "HOST:PORT of a running target",
            ),
        ]
        for ok, flag, value, valid in checks:
            if not ok:
                raise ConfigError(f"{flag} {value!r} is invalid: must be {valid}")
        self.contenders()

    def contenders(self) -> list[ContenderSpec]:
        """The ``backend`` entries, parsed (see :func:`parse_contenders`)."""
        return parse_contenders(self.backend)
