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


def _bind_address(value: str) -> str:
    """An IP address to bind; "localhost" and "*" are accepted as 127.0.0.1 and 0.0.0.0."""
    if value in ("localhost", "*"):
        return "127.0.0.1" if value == "localhost" else "0.0.0.0"
    try:
        ipaddress.ip_address(value)
    except ValueError as e:
        raise ValueError(
            f"must be an IP address such as 127.0.0.1 or 0.0.0.0, got {value!r}"
        ) from e
    return value


def _blank_is_none(value: SecretStr | None) -> SecretStr | None:
    """An empty or blank token means no token."""
    if value is not None and not value.get_secret_value().strip():
        return None
    return value


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
        return _bind_address(value)

    @field_validator("auth_token")
    @classmethod
    def _token_not_blank(cls, value: SecretStr | None) -> SecretStr | None:
        return _blank_is_none(value)


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


TierName = str
"""A tier name from ``kvferry.backends.TIERS`` (cpu, disk, redis, server, mooncake) or a
"module:Class" path."""


class StoreConfig(_Model):
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
        0, ge=0, le=65535, description="In-process Prometheus /metrics port; 0 = no exporter."
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


class CpuTierConfig(_Model):
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


class DiskTierConfig(_Model):
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
    io_threads: int = Field(4, ge=1, le=256, description="Threads doing disk reads and writes.")
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


class RedisTierConfig(_Model):
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


class ServerTierConfig(_Model):
    """Client side of kvferry store servers (``kvferry serve store``)."""

    addresses: list[str] = Field(
        default_factory=list,
        description="host:port of store servers; blocks are spread by consistent hashing.",
    )
    membership_url: str = Field(
        "", description="Redis URL where servers register themselves; empty = use addresses."
    )
    membership_key: str = Field(
        "kvferry:store-servers", min_length=1, description="Redis key of the server membership."
    )
    virtual_nodes: int = Field(
        64, ge=1, le=4096, description="Points per server on the consistent-hash ring."
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


class MooncakeTierConfig(_Model):
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


DEFAULT_MOCK_MODEL_LEN = 32768
"""``mock.max_model_len`` 0 means the KV capacity, capped at this many tokens."""


class HttpFrontConfig(_Model):
    """What a kvferry HTTP server (``serve mock``, ``serve router``) allows its clients, so that
    slow, huge or hostile requests cannot hold its connections or stall its event loop."""

    header_timeout: Seconds = Field(
        5.0,
        gt=0,
        le=3600,
        description="Seconds a client has to send a request's headers, counted from connecting "
        "(or from the first byte of a later request on a kept-alive connection); slower "
        "connections are closed.",
    )
    idle_timeout: Seconds = Field(
        75.0,
        gt=0,
        le=86400,
        description="Seconds a kept-alive connection may sit idle between requests (a new one "
        "before its first) before it is closed; keep it above the clients' own keep-alive "
        "(15 s for aiohttp).",
    )
    body_timeout: Seconds = Field(
        60.0,
        gt=0,
        le=86400,
        description="Seconds to receive a request's body once its headers are in; slower "
        "bodies get 408.",
    )
    max_pending_connections: int = Field(
        256,
        ge=1,
        le=1_000_000,
        description="Connections that may wait for their request's headers at once; past it "
        "the one waiting longest (1 s or more) is closed, so a newcomer always gets in.",
    )
    max_pending_per_address: int = Field(
        64,
        ge=1,
        le=1_000_000,
        description="The same bound per client IP address.",
    )
    max_body_size: ByteSize = Field(
        16 << 20,
        ge=1024,
        le=1 << 40,
        description="Largest request body in bytes (or '16MiB'); larger ones get 413.",
    )
    max_prompt_chars: int = Field(
        4_000_000,
        ge=1,
        le=1 << 40,
        description="Most characters of a prompt's text (prompt, or all messages' text "
        "together); longer prompts get 400 before they are tokenized.",
    )


class MockConfig(HttpFrontConfig):
    """The simulated OpenAI-compatible engine (``kvferry serve mock``): KV blocks, batching,
    timing. The timing defaults model an 8B model in bf16 on one H100-class GPU
    (``kvferry.serving.mock.timing``)."""

    model: str = Field(
        "kvferry-mock",
        min_length=1,
        description="Served model name (/v1/models, responses) and salt of the block hashes.",
    )
    bind_address: str = Field(
        "127.0.0.1", description="Address the HTTP server binds; 127.0.0.1 unless told otherwise."
    )
    port: int = Field(8000, ge=0, le=65535, description="HTTP port; 0 picks a free port.")
    auth_token: SecretStr | None = Field(
        None,
        description="Bearer token every endpoint but /health requires; none = no auth.",
    )
    block_size: int = Field(
        16, ge=1, le=65536, description="Tokens per KV block (vLLM block_size; the hash unit)."
    )
    num_blocks: int = Field(
        16384,
        ge=1,
        le=1 << 24,
        description="KV blocks in the simulated GPU cache (16384 x 16 tokens = 262144 tokens).",
    )
    max_num_seqs: int = Field(
        256, ge=1, le=65536, description="Requests running at once (continuous batch size)."
    )
    max_num_batched_tokens: int = Field(
        8192,
        ge=1,
        le=1 << 24,
        description="Tokens one step may compute (decode tokens + prefill chunks); longer "
        "prompts are prefilled in chunks over several steps.",
    )
    max_model_len: int = Field(
        0,
        ge=0,
        le=1 << 24,
        description="Most tokens (prompt + max_tokens) a request may have, longer ones get 400; "
        "0 = the KV capacity (num_blocks x block_size), at most 32768.",
    )
    vocab_size: int = Field(
        128256,
        ge=256,
        le=1 << 31,
        description="Token ids are below this (the word tokenizer hashes words into it).",
    )
    tokenizer: str = Field(
        "",
        description="Local Hugging Face tokenizer.json or its directory; empty = word "
        "tokenizer (one token per whitespace-separated word).",
    )
    speedup_ratio: float = Field(
        1.0, gt=0, le=1e9, description="Every modelled time is divided by this (10 = 10x faster)."
    )
    prefill_base_ms: float = Field(
        5.0, ge=0, description="Milliseconds of a prefill step besides its tokens (a)."
    )
    prefill_per_token_ms: float = Field(
        0.07, ge=0, description="Milliseconds per uncached prompt token prefilled (b)."
    )
    prefill_quadratic_ms: float = Field(
        6e-7,
        ge=0,
        description="Milliseconds per new token x context token (attention, c); c x n^2 "
        "for n uncached tokens and no cached prefix.",
    )
    decode_base_ms: float = Field(
        7.0, ge=0, description="Milliseconds of a decode step besides its batch (d)."
    )
    decode_per_seq_ms: float = Field(
        0.04, ge=0, description="Milliseconds per sequence in the decode batch (e)."
    )
    decode_per_context_token_ms: float = Field(
        5e-5,
        ge=0,
        description="Milliseconds per context token of the decode batch (KV reads, f).",
    )
    profile: str = Field(
        "",
        description="JSON profile of a real engine (prefill/decode samples); the timing "
        "coefficients of each kind it holds are fitted from it, replacing a..f.",
    )
    event_history: int = Field(
        10000,
        ge=0,
        le=10_000_000,
        description="KV events kept for /kv/events?since=ID to replay to a reconnecting "
        "subscriber.",
    )

    @field_validator("bind_address")
    @classmethod
    def _valid_address(cls, value: str) -> str:
        return _bind_address(value)

    @field_validator("auth_token")
    @classmethod
    def _token_not_blank(cls, value: SecretStr | None) -> SecretStr | None:
        return _blank_is_none(value)

    @model_validator(mode="after")
    def _longest_request_fits(self) -> MockConfig:
        capacity = self.num_blocks * self.block_size
        if self.max_model_len == 1:
            raise ValueError(
                "max_model_len 1 leaves no room for an output token; give at least 2 "
                "(or 0 for the KV capacity)"
            )
        if self.max_model_len > capacity:
            raise ValueError(
                f"max_model_len {self.max_model_len} exceeds the KV capacity of num_blocks "
                f"{self.num_blocks} x block_size {self.block_size} = {capacity} tokens, so a "
                "long request could never be admitted; raise num_blocks or lower max_model_len"
            )
        if self.model_len < 2:
            raise ValueError(
                f"the KV capacity of num_blocks {self.num_blocks} x block_size "
                f"{self.block_size} = {capacity} tokens leaves no room for a prompt and an "
                "output token; raise num_blocks"
            )
        return self

    @property
    def model_len(self) -> int:
        """The effective max_model_len (0 resolved to the KV capacity, at most 32768)."""
        if self.max_model_len:
            return self.max_model_len
        return min(DEFAULT_MOCK_MODEL_LEN, self.num_blocks * self.block_size)


RouterMode = Literal["kv", "round-robin", "random"]


def _worker_url(value: str) -> str:
    """A worker's base URL: ``http(s)://host:port`` (a bare ``host:port`` gets ``http://``),
    without a trailing slash."""
    url = value.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    scheme, _, rest = url.partition("://")
    host, _, port = rest.partition("/")[0].rpartition(":")
    if scheme not in ("http", "https") or not host or not port.isdigit():
        raise ValueError(
            f"a worker must be a URL like http://127.0.0.1:8000 (scheme http or https, a host "
            f"and a port), got {value!r}"
        )
    return url


def _zmq_endpoint(value: str, what: str) -> str:
    """A ZeroMQ endpoint the router connects to: ``tcp://host:port`` or ``ipc://path``."""
    scheme, sep, rest = value.partition("://")
    if sep and scheme == "ipc" and rest:
        return value
    host, _, port = rest.rpartition(":")
    if not sep or scheme != "tcp" or not host or "*" in host or not port.isdigit():
        raise ValueError(
            f"{what} must be a ZeroMQ endpoint to connect to, tcp://HOST:PORT or ipc://PATH, "
            f"got {value!r}"
        )
    return value


def parse_vllm_events(value: str) -> tuple[str, str, str | None]:
    """``WORKER_URL=PUB_ENDPOINT[,REPLAY_ENDPOINT]`` (an entry of ``router.vllm_events``) as
    ``(worker url, pub endpoint, replay endpoint or None)``.

    Raises:
        ValueError: not of that form (the message says what would be right).
    """
    url, sep, endpoints = value.partition("=")
    if not sep:
        raise ValueError(
            "a vLLM event source must be WORKER_URL=tcp://HOST:PORT[,tcp://HOST:REPLAY_PORT] "
            f"(the worker's --kv-events-config endpoint and replay_endpoint), got {value!r}"
        )
    pub, _, replay = endpoints.partition(",")
    return (
        _worker_url(url),
        _zmq_endpoint(pub.strip(), "the event endpoint"),
        _zmq_endpoint(replay.strip(), "the replay endpoint") if replay.strip() else None,
    )


class RouterConfig(HttpFrontConfig):
    """The KV-aware router (``kvferry serve router``): an OpenAI-compatible front that sends
    each request to one of its workers (vLLM or ``kvferry serve mock``)."""

    workers: list[str] = Field(
        default_factory=list,
        description="Base URLs of the workers (http://host:port); --worker, repeatable.",
    )
    bind_address: str = Field(
        "127.0.0.1", description="Address the router binds; 127.0.0.1 unless told otherwise."
    )
    port: int = Field(8080, ge=0, le=65535, description="HTTP port; 0 picks a free port.")
    auth_token: SecretStr | None = Field(
        None, description="Bearer token every endpoint but /health requires; none = no auth."
    )
    worker_auth_token: SecretStr | None = Field(
        None, description="Bearer token the router sends to the workers; none = none sent."
    )
    mode: RouterMode = Field(
        "kv",
        description="kv: lowest cost (uncached prompt blocks x prefill_weight + decode "
        "blocks); round-robin; random.",
    )
    temperature: float = Field(
        0.0,
        ge=0,
        le=1e9,
        description="kv mode: 0 = lowest cost (random tie-break); > 0 = sample by softmax of "
        "-cost/temperature (cost in blocks).",
    )
    prefill_weight: float = Field(
        1.0,
        ge=0,
        le=1e9,
        description="kv mode: weight of the uncached prompt blocks against the decode blocks "
        "(Dynamo's overlap_score_weight; 0 = load only).",
    )
    block_size: int = Field(
        16,
        ge=1,
        le=65536,
        description="Tokens per KV block; must equal the workers' (checked on /kv/stats).",
    )
    model: str = Field(
        "",
        description="Model name salting the block hashes; empty = the workers' (/kv/stats or "
        "/v1/models).",
    )
    tokenizer: str = Field(
        "",
        description="Local Hugging Face tokenizer.json or its directory, as the mock workers' "
        "mock.tokenizer; empty = word tokenizer.",
    )
    vocab_size: int = Field(
        128256,
        ge=256,
        le=1 << 31,
        description="Word tokenizer ids are below this; must equal the mock workers' "
        "mock.vocab_size.",
    )
    kv_events: bool = Field(
        True,
        description="Mirror each worker's /kv/events; false (--no-kv-events) = approximate: "
        "remember the router's own decisions for approx_ttl.",
    )
    vllm_events: list[str] = Field(
        default_factory=list,
        description="vLLM workers' ZeroMQ KV event publishers, WORKER_URL=tcp://HOST:PORT"
        "[,tcp://HOST:REPLAY_PORT] (vLLM --kv-events-config endpoint, replay_endpoint); "
        "--vllm-events, repeatable. Without it a vLLM worker's publisher is found through its "
        "/kv_event_sources. Needs pyzmq and msgspec (installed with vLLM).",
    )
    approx_ttl: Seconds = Field(
        120.0,
        gt=0,
        description="Seconds a routed prompt's blocks count as cached on a worker without KV "
        "events.",
    )
    health_interval: Seconds = Field(
        1.0, gt=0, description="Seconds between /health probes of a worker marked down."
    )
    connect_timeout: Seconds = Field(
        5.0, gt=0, description="Seconds to connect to a worker before it counts as down."
    )

    @field_validator("workers")
    @classmethod
    def _valid_workers(cls, value: list[str]) -> list[str]:
        urls = [_worker_url(v) for v in value]
        seen: set[str] = set()
        for url in urls:
            if url in seen:
                raise ValueError(f"worker {url} appears twice; list each worker once")
            seen.add(url)
        return urls

    @field_validator("bind_address")
    @classmethod
    def _valid_address(cls, value: str) -> str:
        return _bind_address(value)

    @field_validator("vllm_events")
    @classmethod
    def _valid_vllm_events(cls, value: list[str]) -> list[str]:
        seen: set[str] = set()
        out = []
        for entry in value:
            url, pub, replay = parse_vllm_events(entry)
            if url in seen:
                raise ValueError(f"worker {url} has two vLLM event sources; give one")
            seen.add(url)
            out.append(f"{url}={pub}" + (f",{replay}" if replay else ""))
        return out

    @model_validator(mode="after")
    def _events_of_known_workers(self) -> RouterConfig:
        if self.vllm_events and not self.kv_events:
            raise ValueError(
                "router.vllm_events with router.kv_events false: approximate mode reads no "
                "events; drop --no-kv-events or the --vllm-events sources"
            )
        workers = set(self.workers)
        for entry in self.vllm_events:
            url = parse_vllm_events(entry)[0]
            if url not in workers:
                raise ValueError(
                    f"router.vllm_events names {url}, which is not a worker "
                    f"({', '.join(self.workers) or 'none given'}); give it with --worker too"
                )
        return self

    @field_validator("auth_token", "worker_auth_token")
    @classmethod
    def _token_not_blank(cls, value: SecretStr | None) -> SecretStr | None:
        return _blank_is_none(value)


class KvferryConfig(_Model):
    """All of kvferry's configuration, one section per component."""

    transfer: TransferConfig = Field(default_factory=TransferConfig)
    listen: ListenConfig = Field(default_factory=ListenConfig)
    metadata: MetadataConfig = Field(default_factory=MetadataConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    cpu: CpuTierConfig = Field(default_factory=CpuTierConfig)
    disk: DiskTierConfig = Field(default_factory=DiskTierConfig)
    redis: RedisTierConfig = Field(default_factory=RedisTierConfig)
    server: ServerTierConfig = Field(default_factory=ServerTierConfig)
    mooncake: MooncakeTierConfig = Field(default_factory=MooncakeTierConfig)
    mock: MockConfig = Field(default_factory=MockConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)


SECTIONS: dict[str, type[_Model]] = {
    "transfer": TransferConfig,
    "listen": ListenConfig,
    "metadata": MetadataConfig,
    "store": StoreConfig,
    "cpu": CpuTierConfig,
    "disk": DiskTierConfig,
    "redis": RedisTierConfig,
    "server": ServerTierConfig,
    "mooncake": MooncakeTierConfig,
    "mock": MockConfig,
    "router": RouterConfig,
}
"""Section name -> model; the loader derives env names (KVFERRY_<SECTION>_<KEY>) from these."""
