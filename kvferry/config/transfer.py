"""Config sections of the transfer engine: ``transfer`` (initiator data plane), ``listen`` (every
kvferry listener) and ``metadata`` (how segment names resolve).

Each field has a one-line doc with its unit and the tuning-guide knob it mirrors (``MC_*`` for
Mooncake's Transfer Engine, ``TENT:`` for its TENT JSON).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from kvferry.config.common import ConfigModel, bind_address, blank_is_none
from kvferry.config.units import ByteSize, Seconds

__all__ = ["ListenConfig", "MetadataConfig", "TransferConfig", "TransportName"]

TransportName = Literal["auto", "tcp", "shm", "local"]


class TransferConfig(ConfigModel):
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
    device_slice_size: ByteSize = Field(
        1024 * 1024,
        description="Smallest slice to a GPU region of a tcp peer: each slice there costs the "
        "target a device copy (~10-20 us fixed), so slices to GPU memory are at least this big.",
    )
    vectored_io: bool = Field(
        True,
        description="Send a run of small READs or WRITEs (<= 16KiB each, up to 64) as one "
        "READV/WRITEV frame when the target serves them: one header and one reply instead of "
        "one per block.",
    )

    @field_validator("slice_size")
    @classmethod
    def _slice_size_range(cls, value: int) -> int:
        if not 512 <= value <= 1 << 30:
            raise ValueError(f"must be between 512 bytes and 1GiB, got {value}")
        return value

    @field_validator("device_slice_size")
    @classmethod
    def _device_slice_size_range(cls, value: int) -> int:
        if not 4096 <= value <= 1 << 30:
            raise ValueError(f"must be between 4KiB and 1GiB, got {value}")
        return value

    @model_validator(mode="after")
    def _slice_fits_frame(self) -> TransferConfig:
        for key in ("slice_size", "device_slice_size"):
            size = getattr(self, key)
            if key == "device_slice_size":
                size = max(size, self.slice_size)
            largest = size + size // self.fragment_ratio
            if largest > self.max_frame_size:
                raise ValueError(
                    f"{key} {size} plus its merged tail ({largest} bytes) exceeds "
                    f"max_frame_size {self.max_frame_size}; raise max_frame_size or lower {key}"
                )
        return self

    @property
    def fragment_limit(self) -> int:
        """Tails shorter than this many bytes are merged into the previous slice."""
        return max(1, self.slice_size // self.fragment_ratio)


class ListenConfig(ConfigModel):
    """Where and how kvferry's listeners accept connections (transfer target, store server)."""

    bind_address: str = Field(
        "127.0.0.1",
        description="Address listeners bind; 127.0.0.1 unless told otherwise "
        "(MC_TCP_BIND_ADDRESS).",
    )
    port: int = Field(
        15428, ge=0, le=65535, description="TCP port of the transfer target; 0 picks a free port."
    )
    advertise_address: str = Field(
        "",
        pattern=r"^[A-Za-z0-9.\-_\[\]:]*$",
        description="Host other machines dial to reach this listener, as a store server "
        "registers it in the membership (server.membership_url); empty = the bind address, or "
        "this machine's hostname when bound to all interfaces (0.0.0.0, ::).",
    )
    auth_token: SecretStr | None = Field(
        None, description="Shared token every peer must present in its handshake; none = no auth."
    )
    max_connections: int = Field(
        1024,
        ge=1,
        le=1_000_000,
        description="Authenticated connections a listener serves at once (past the handshake).",
    )
    handshake_timeout: Seconds = Field(
        5.0,
        gt=0,
        le=3600,
        description="Seconds from accept to a completed handshake, in total (not per read): a "
        "peer that trickles its HELLO is closed when they run out.",
    )
    max_pending: int = Field(
        64,
        ge=1,
        le=100_000,
        description="Connections still in their handshake at once; past it, the oldest that "
        "has waited 1 s is closed for the newcomer (at 4x, the oldest whatever its age), so a "
        "client that completes its handshake promptly gets in while others trickle.",
    )
    max_pending_per_host: int = Field(
        8,
        ge=1,
        le=100_000,
        description="Connections still in their handshake from one source address; past it, "
        "that address's oldest that has waited 1 s is closed.",
    )
    idle_timeout: Seconds = Field(
        300.0,
        ge=0,
        le=86400 * 365,
        description="Seconds an authenticated connection may wait between requests before it "
        "is closed (clients reconnect by themselves); 0 = never.",
    )
    stall_timeout: Seconds = Field(
        30.0,
        gt=0,
        le=86400,
        description="Seconds without a byte of progress in the middle of a frame (receiving a "
        "payload or sending a reply) before the connection is closed and its memory freed.",
    )

    @field_validator("bind_address")
    @classmethod
    def _valid_address(cls, value: str) -> str:
        return bind_address(value)

    @field_validator("auth_token")
    @classmethod
    def _token_not_blank(cls, value: SecretStr | None) -> SecretStr | None:
        return blank_is_none(value)


class MetadataConfig(ConfigModel):
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
