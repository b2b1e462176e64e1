"""Config sections of the KV-cache store: ``store`` (keys, tier pipeline, eviction, leases) and
one section per built-in tier (``cpu``, ``disk``, ``redis``, ``server``, ``mooncake``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from kvferry.config.common import ConfigModel
from kvferry.config.units import ByteSize, Seconds

__all__ = [
    "CpuTierConfig",
    "DiskTierConfig",
    "MooncakeTierConfig",
    "RedisTierConfig",
    "ServerTierConfig",
    "StoreConfig",
    "TierName",
]


TierName = str
"""A tier name from ``kvferry.backends.TIERS`` (cpu, disk, redis, server, mooncake) or a
"module:Class" path."""


class StoreConfig(ConfigModel):
    """The tiered KV-cache store: keys, tier pipeline, placement, eviction, leases, tracing."""

    # cpu only by default: a disk tier preallocates its whole capacity, which no one should
    # get without asking (--tiers cpu,disk).
    tiers: list[TierName] = Field(
        default_factory=lambda: ["cpu"],
        min_length=1,
        description="Tier pipeline, fastest first (UCM store_pipeline), e.g. [cpu, disk, redis].",
    )
    tokens_per_block: int = Field(
        16, ge=1, le=65536, description="Tokens per KV block (vLLM block_size; 256/512 common)."
    )
    slot_size: ByteSize = Field(
        65536,
        ge=64,
        description="Bytes of the largest block a cpu/disk slot holds (one block's KV bytes).",
    )
    key_hash: Literal["xxh3-128", "blake2b-128"] = Field(
        "xxh3-128",
        description="Hash of the 16-byte block keys: xxh3-128 (fast; not collision-resistant "
        "against someone crafting prompts) or blake2b-128 (cryptographic; for tenants that "
        "must not reach each other's blocks).",
    )
    write_policy: Literal["write_back", "write_through"] = Field(
        "write_back",
        description="write_back: lower tiers get a block when it is demoted; write_through: "
        "every put also goes to every lower tier.",
    )
    promote_on_hit: bool = Field(
        True, description="Copy a block found in a lower tier into the first tier on get/load."
    )
    prefetch_depth: int = Field(
        0,
        ge=0,
        le=4096,
        description="Blocks after a looked-up prefix to promote into the first tier ahead of use.",
    )
    eviction_policy: str = Field(
        "lru",
        min_length=1,
        description="Eviction policy per tier: lru, lfu, fifo, length-aware or module:Class.",
    )
    evict_start_threshold: float = Field(
        0.9,
        gt=0,
        le=1,
        description="Fraction of a tier's capacity in use that starts an eviction round.",
    )
    evict_ratio: float = Field(
        0.05,
        ge=0,
        le=1,
        description="Fraction of a tier's capacity one eviction round frees (0: only the blocks "
        "a put needs, which is what the hit-rate simulator uses).",
    )
    lease_seconds: Seconds = Field(
        10.0,
        gt=0,
        le=86400,
        description="A pin (prepare_store/prepare_load) expires after this many seconds (at "
        "most a day), so a lost caller never pins a block forever.",
    )
    shutdown_flush_seconds: Seconds = Field(
        30.0,
        ge=0,
        description="Seconds a store server's graceful shutdown may spend writing the blocks "
        "only its memory tier holds to its persistent tier (disk), so a restart finds them; "
        "0 = drop them.",
    )
    trace_file: str = Field(
        "", description="Write get/put/transfer/eviction events as Chrome trace JSON here."
    )
    metrics_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="Prometheus /metrics port, served by whoever runs the store (kvferry serve "
        "store, the vLLM connector, or telemetry.prometheus.export_store); 0 = no exporter.",
    )
    breaker_failures: int = Field(
        3,
        ge=1,
        le=1000,
        description="Failed calls in a row (errors or timeouts) that open a shared tier's "
        "circuit breaker: its calls are then skipped (a miss, or NO_SPACE) instead of waiting.",
    )
    breaker_open_seconds: Seconds = Field(
        1.0,
        gt=0,
        description="Seconds an open breaker skips its tier before one probe call goes through.",
    )
    breaker_max_open_seconds: Seconds = Field(
        30.0,
        gt=0,
        description="Most seconds between probes: each failed probe doubles the wait up to this.",
    )

    @model_validator(mode="after")
    def _breaker_intervals(self) -> StoreConfig:
        if self.breaker_max_open_seconds < self.breaker_open_seconds:
            raise ValueError(
                f"breaker_max_open_seconds {self.breaker_max_open_seconds} is below "
                f"breaker_open_seconds {self.breaker_open_seconds}; give a cap at least as long"
            )
        return self

    @field_validator("tiers")
    @classmethod
    def _unique_tiers(cls, value: list[str]) -> list[str]:
        seen = set()
        for name in value:
            if name in seen:
                raise ValueError(f"tier {name!r} appears twice; each tier may appear once")
            seen.add(name)
        return value


class CpuTierConfig(ConfigModel):
    """The DRAM tier: a preallocated pool of fixed-size slots."""

    capacity: ByteSize = Field(
        1 << 30, ge=0, description="Bytes of the slot pool (used when buffer_number is 0)."
    )
    buffer_number: int = Field(
        0,
        ge=0,
        description="Slots in the pool (UCM buffer_number); 0 = capacity / store.slot_size.",
    )
    pinned: bool = Field(
        False, description="Page-lock the pool through torch when CUDA is present (faster H2D)."
    )
    use_hugepages: bool = Field(False, description="Advise transparent huge pages for the pool.")
    checksum: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Which slots keep an xxh3-64 checksum per block, declared by the writer at "
        "commit and checked by every reader: auto = slots whose reservation was abandoned (a "
        "stalled writer may still write there; nothing else can), on = every slot, off = none.",
    )
    max_memory_fraction: float = Field(
        0.9,
        gt=0,
        le=1,
        description="Largest pool, as a fraction of the memory available at start "
        "(MemAvailable); a larger one is refused unless force_capacity.",
    )
    force_capacity: bool = Field(
        False,
        description="Allocate the pool even above max_memory_fraction of the available memory "
        "(--force-capacity); the kernel may then kill the process.",
    )


class DiskTierConfig(ConfigModel):
    """The SSD tier: preallocated files of fixed-size slots with per-slot headers."""

    path: str = Field(
        "",
        description="Directory of the slot files; empty = one of kvferry's own under "
        "~/.cache/kvferry/disk: store-<port> for a store server on a fixed port (a restart "
        "finds its blocks), else unnamed files of this process, freed when it exits.",
    )
    capacity: ByteSize = Field(
        4 << 30, ge=0, description="Bytes of slot space on disk, preallocated at open."
    )
    direct_io: bool = Field(
        True, description="O_DIRECT with aligned buffers where the filesystem supports it."
    )
    io_threads: int = Field(
        4,
        ge=1,
        le=256,
        description="Threads doing disk reads and writes, at most one I/O in flight each (the "
        "calling thread checksums the blocks meanwhile).",
    )
    files: int = Field(1, ge=1, le=1024, description="Slot files the capacity is spread over.")
    force_capacity: bool = Field(
        False,
        description="Preallocate the capacity even when its filesystem has fewer bytes free "
        "(--force-capacity).",
    )
    wipe_other_layout: bool = Field(
        False,
        description="Empty a disk.path that holds slot files of another layout (slot size, "
        "capacity, files) and start there afresh, instead of refusing it (--wipe-disk); the "
        "blocks in it are lost.",
    )


class RedisTierConfig(ConfigModel):
    """Redis/Valkey as the shared remote tier."""

    url: str = Field("redis://127.0.0.1:6379/0", description="Redis URL (redis:// or rediss://).")
    cluster: bool = Field(
        False,
        description="Talk to a Redis Cluster (scale-out) at url; a cluster node at url is also "
        "found out at open or by its first MOVED reply, with a warning naming this key.",
    )
    key_prefix: str = Field("kvferry:kv:", min_length=1, description="Namespace of block keys.")
    ttl: Seconds = Field(0.0, ge=0, description="Seconds a stored block lives; 0 = no expiry.")
    pool_size: int = Field(16, ge=1, le=4096, description="Connections in the client pool.")
    socket_timeout: Seconds = Field(
        2.0, gt=0, description="Seconds before a Redis call counts as failed."
    )


class ServerTierConfig(ConfigModel):
    """Client side of kvferry store servers (``kvferry serve store``)."""

    addresses: list[str] = Field(
        default_factory=list,
        description="host:port of store servers; blocks are spread by consistent hashing.",
    )
    membership_url: str = Field(
        "", description="Redis URL where servers register themselves; empty = use addresses."
    )
    membership_key: str = Field(
        "kvferry:store-servers",
        min_length=1,
        description="Prefix of the membership keys in Redis: the set <prefix>:members and one "
        "lease key <prefix>:member:<host:port> per live server.",
    )
    membership_ttl: Seconds = Field(
        3.0,
        ge=0.3,
        le=3600,
        description="Seconds a server's lease key lives unless refreshed (the server refreshes "
        "it every third of that): how long a killed server stays listed.",
    )
    membership_poll: Seconds = Field(
        1.0,
        gt=0,
        le=600,
        description="Seconds between a client's reads of the membership and its probes of the "
        "servers it marked down after a failed call.",
    )
    virtual_nodes: int = Field(
        64, ge=1, le=4096, description="Points per server on the consistent-hash ring."
    )
    chunk_blocks: int = Field(
        64,
        ge=1,
        le=1 << 16,
        description="Consecutive blocks of a prefix kept on one server (a chunk, placed by its "
        "first block's key): losing a server cuts a prefix at its first chunk there, not at its "
        "first block. 1 = place each block by its own key. Every client of the same servers "
        "must use the same value.",
    )
    replicas: int = Field(
        1,
        ge=1,
        le=16,
        description="Servers each block is written to (the next ones on the ring); reads ask "
        "them in order. 2 = losing one server loses no block.",
    )
    fanout: int = Field(
        8,
        ge=1,
        le=256,
        description="Servers one call asks at once: a batch whose blocks live on several "
        "servers asks them in parallel (its own thread does one share, a pool of fanout - 1 "
        "threads the others), so it takes as long as the slowest share, not their sum. "
        "1 = one after another.",
    )
    transport: Literal["auto", "tcp"] = Field(
        "auto",
        description="auto: copy block bytes through shared memory when the server is on this "
        "host, else inline over tcp; tcp: always inline over tcp.",
    )
    auth_token: SecretStr | None = Field(
        None, description="Shared token the store servers require (their listen.auth_token)."
    )
    timeout: Seconds = Field(5.0, gt=0, description="Seconds to connect or to wait for a reply.")

    @model_validator(mode="after")
    def _replicas_fit(self) -> ServerTierConfig:
        if not self.membership_url and self.addresses and self.replicas > len(self.addresses):
            raise ValueError(
                f"server.replicas={self.replicas} but server.addresses lists "
                f"{len(self.addresses)} server(s): each block needs that many distinct servers; "
                f"set server.replicas to at most {len(self.addresses)} or add servers"
            )
        return self


class MooncakeTierConfig(ConfigModel):
    """Mooncake Store as a remote tier (needs the mooncake extra)."""

    master_address: str = Field("127.0.0.1:50051", description="mooncake_master host:port.")
    metadata_server: str = Field(
        "P2PHANDSHAKE", description="Mooncake metadata server (P2PHANDSHAKE, http://, etcd://)."
    )
    local_hostname: str = Field("127.0.0.1", description="This client's address in Mooncake.")
    protocol: Literal["tcp", "rdma"] = Field("tcp", description="Mooncake transfer protocol.")
    device_name: str = Field("", description="RDMA device names (rdma only).")
    global_segment_size: ByteSize = Field(
        512 << 20, ge=0, description="Bytes this client contributes to the Mooncake pool."
    )
    local_buffer_size: ByteSize = Field(
        256 << 20, ge=0, description="Bytes of this client's local transfer buffer."
    )
    key_prefix: str = Field(
        "kvferry:", min_length=1, description="Namespace of kvferry's objects in Mooncake."
    )
    rpc_timeout: Seconds = Field(
        5.0,
        gt=0,
        description="Seconds a call waits for the master's answer (MC_RPC_TIMEOUT_MS, whose "
        "own default is 30 s): what a hung master costs a call.",
    )
