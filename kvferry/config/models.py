"""Typed, validated config models, one per component.

Each field has a one-line doc with its unit and the tuning-guide knob it mirrors (``MC_*`` for
Mooncake's Transfer Engine, ``TENT:`` for its TENT JSON). The models validate values; the loader
(``kvferry.config.loader``) decides where values come from and is the only module that reads the
environment.
"""

from __future__ import annotations

import ipaddress
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from kvferry.config.units import ByteSize, Seconds

TransportName = Literal["auto", "tcp", "shm", "local"]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class TransferConfig(_Model):
    """Data-plane knobs of the transfer engine (initiator side)."""

    transport: TransportName = Field(
        "auto",
        description="Transport: auto picks local (same process), shm (same host), else tcp.",
    )
    slice_size: ByteSize = Field(
        65536,
        description="Bytes per slice; requests are cut into slices of this size (MC_SLICE_SIZE).",
    )
    fragment_ratio: int = Field(
        4,
        ge=1,
        le=1024,
        description="A tail under slice_size/fragment_ratio bytes joins the previous slice "
        "(MC_FRAGMENT_RATIO).",
    )
    # Default 1, not Mooncake's 2: a target serves each connection from its own thread, and
    # on a 2-core host two busy connection threads contend for the target's GIL (1 MiB x 16
    # reads: 3.78 GB/s with 1 connection, 2.98 with 2; benchmarks/BENCHMARKS.md).
    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="Connections per peer that slices are spread over (MC_WORKERS_PER_CTX).",
    )
    max_inflight: int = Field(
        256,
        ge=1,
        le=65536,
        description="Slices in flight per connection before waiting for replies (MC_MAX_WR).",
    )
    retry_count: int = Field(
        9,
        ge=0,
        le=100,
        description="Retries of a slice on a fresh connection before it fails (MC_RETRY_CNT).",
    )
    transfer_timeout: Seconds = Field(
        5.0,
        gt=0,
        description="Seconds without progress after which in-flight slices fail or retry "
        "(TENT: max_timeout_ns).",
    )
    connect_timeout: Seconds = Field(
        5.0, gt=0, description="Seconds to connect and finish the handshake with a peer."
    )
    grace_period_ns: int = Field(
        50_000,
        ge=0,
        le=1_000_000_000,
        description="Nanoseconds to busy-poll for a reply before blocking; trades CPU for latency "
        "(TENT: workers/grace_period_ns).",
    )
    use_hugepages: bool = Field(
        False,
        description="Advise transparent huge pages for allocated segments (MC_STORE_USE_HUGEPAGE).",
    )
    max_frame_size: ByteSize = Field(
        64 * 1024 * 1024,
        ge=4096,
        description="Largest payload bytes one frame may carry; bigger frames are rejected.",
    )

    @field_validator("slice_size")
    @classmethod
    def _slice_size_range(cls, value: int) -> int:
        if not 512 <= value <= 1 << 30:
            raise ValueError(f"must be between 512 bytes and 1GiB, got {value}")
        return value

    @model_validator(mode="after")
    def _slice_fits_frame(self) -> TransferConfig:
        largest = self.slice_size + self.slice_size // self.fragment_ratio
        if largest > self.max_frame_size:
            raise ValueError(
                f"slice_size {self.slice_size} plus its merged tail ({largest} bytes) exceeds "
                f"max_frame_size {self.max_frame_size}; raise max_frame_size or lower slice_size"
            )
        return self

    @property
    def fragment_limit(self) -> int:
        """Tails shorter than this many bytes are merged into the previous slice."""
        return max(1, self.slice_size // self.fragment_ratio)


class ListenConfig(_Model):
    """Where and how kvferry's listeners accept connections (transfer target, store server)."""

    bind_address: str = Field(
        "127.0.0.1",
        description="Address listeners bind; 127.0.0.1 unless told otherwise "
        "(MC_TCP_BIND_ADDRESS).",
    )
    port: int = Field(
        15428, ge=0, le=65535, description="TCP port of the transfer target; 0 picks a free port."
    )
    auth_token: SecretStr | None = Field(
        None, description="Shared token every peer must present in its handshake; none = no auth."
    )
    max_connections: int = Field(
        1024, ge=1, le=1_000_000, description="Connections a listener serves at once."
    )

    @field_validator("bind_address")
    @classmethod
    def _valid_address(cls, value: str) -> str:
        if value in ("localhost", "*"):
            return "127.0.0.1" if value == "localhost" else "0.0.0.0"
        try:
            ipaddress.ip_address(value)
        except ValueError as e:
            raise ValueError(
                f"must be an IP address such as 127.0.0.1 or 0.0.0.0, got {value!r}"
            ) from e
        return value

    @field_validator("auth_token")
    @classmethod
    def _token_not_blank(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().strip():
            return None
        return value


class MetadataConfig(_Model):
    """How initiators find targets: a p2p handshake (default) or a Redis registry."""

    backend: Literal["p2p", "redis"] = Field(
        "p2p", description="p2p: segment name is host:port; redis: names resolved through Redis."
    )
    url: str = Field(
        "redis://127.0.0.1:6379/0", description="Redis URL of the metadata service (redis only)."
    )
    key_prefix: str = Field(
        "kvferry", min_length=1, description="Prefix of the metadata keys in Redis."
    )
    ttl: Seconds = Field(
        0.0, ge=0, description="Seconds a published segment stays without refresh; 0 = forever."
    )


class KvferryConfig(_Model):
    """All of kvferry's configuration, one section per component."""

    transfer: TransferConfig = Field(default_factory=TransferConfig)
    listen: ListenConfig = Field(default_factory=ListenConfig)
    metadata: MetadataConfig = Field(default_factory=MetadataConfig)


SECTIONS: dict[str, type[_Model]] = {
    "transfer": TransferConfig,
    "listen": ListenConfig,
    "metadata": MetadataConfig,
}
"""Section name -> model; the loader derives env names (KVFERRY_<SECTION>_<KEY>) from these."""
