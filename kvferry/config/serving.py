"""Config sections of kvferry's HTTP servers: what every one allows its clients
(:class:`HttpFrontConfig`), the simulated engine (``mock``) and the KV-aware router (``router``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from kvferry.config.common import ConfigModel, bind_address, blank_is_none
from kvferry.config.units import ByteSize, Seconds

__all__ = [
    "DEFAULT_MOCK_MODEL_LEN",
    "HttpFrontConfig",
    "MockConfig",
    "RouterConfig",
    "RouterMode",
    "parse_vllm_events",
]


DEFAULT_MOCK_MODEL_LEN = 32768
"""``mock.max_model_len`` 0 means the KV capacity, capped at this many tokens."""


class HttpFrontConfig(ConfigModel):
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
        return bind_address(value)

    @field_validator("auth_token")
    @classmethod
    def _token_not_blank(cls, value: SecretStr | None) -> SecretStr | None:
        return blank_is_none(value)

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
    pd: bool = Field(
        False,
        description="Disaggregated prefill/decode (--pd): each request is prefilled on one of "
        "router.prefill_workers (max_tokens 1, asking for remote decode) and decoded on one of "
        "router.decode_workers with the KV hand-off parameters the prefill returned.",
    )
    prefill_workers: list[str] = Field(
        default_factory=list,
        description="P/D: base URLs of the prefill instances (--prefill, repeatable); chosen "
        "by KV overlap and load (router.mode).",
    )
    decode_workers: list[str] = Field(
        default_factory=list,
        description="P/D: base URLs of the decode instances (--decode, repeatable); chosen by "
        "load.",
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

    @property
    def all_workers(self) -> list[str]:
        """Every worker the router talks to: ``workers``, or the prefill then the decode ones."""
        return [*self.workers, *self.prefill_workers, *self.decode_workers]

    @field_validator("workers", "prefill_workers", "decode_workers")
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
        return bind_address(value)

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
        if self.pd:
            if self.workers:
                raise ValueError(
                    "router.pd with router.workers: a P/D router sends every request to a "
                    "prefill and a decode instance; give them with --prefill and --decode "
                    "instead of --worker"
                )
            if not self.prefill_workers or not self.decode_workers:
                raise ValueError(
                    "router.pd needs at least one prefill and one decode instance: "
                    "--prefill URL --decode URL (each repeatable)"
                )
            both = set(self.prefill_workers) & set(self.decode_workers)
            if both:
                raise ValueError(
                    f"{', '.join(sorted(both))} is both a prefill and a decode instance; an "
                    "instance has one role in a P/D fleet"
                )
        elif self.prefill_workers or self.decode_workers:
            raise ValueError(
                "router.prefill_workers / router.decode_workers without router.pd: add --pd "
                "to serve disaggregated, or give the instances with --worker"
            )
        workers = set(self.all_workers)
        for entry in self.vllm_events:
            url = parse_vllm_events(entry)[0]
            if url not in workers:
                raise ValueError(
                    f"router.vllm_events names {url}, which is not a worker "
                    f"({', '.join(self.all_workers) or 'none given'}); give it with --worker too"
                )
        return self

    @field_validator("auth_token", "worker_auth_token")
    @classmethod
    def _token_not_blank(cls, value: SecretStr | None) -> SecretStr | None:
        return blank_is_none(value)
