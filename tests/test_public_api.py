"""The curated public API of kvferry/__init__.py, and that importing it has no side effects."""

from __future__ import annotations

import importlib
import subprocess
import sys

import kvferry

EXPECTED_ALL = [
    "AuthError",
    "Batch",
    "BatchStatus",
    "BlockHasher",
    "ConfigError",
    "DeviceRegion",
    "KvferryConfig",
    "KvferryError",
    "LeaseExpired",
    "LoadHandle",
    "LoadedConfig",
    "MemoryRegion",
    "MissingDependency",
    "OpCode",
    "PeerClosed",
    "ProtocolError",
    "PutStatus",
    "RemoteError",
    "RequestStatus",
    "SegmentError",
    "SegmentHandle",
    "StorageError",
    "StoreHandle",
    "StoreStats",
    "TieredStore",
    "TransferEngine",
    "TransferError",
    "TransferRequest",
    "TransferState",
    "TransferTimeout",
    "__version__",
    "load_config",
]


def test_all_is_pinned_and_sorted() -> None:
    assert kvferry.__all__ == EXPECTED_ALL
    assert sorted(kvferry.__all__) == kvferry.__all__


def test_every_name_is_importable() -> None:
    module = importlib.import_module("kvferry")
    for name in EXPECTED_ALL:
        assert getattr(module, name) is not None, name
    namespace: dict[str, object] = {}
    exec("from kvferry import *", namespace)
    assert set(EXPECTED_ALL) <= set(namespace)


def test_errors_form_one_hierarchy() -> None:
    for name in EXPECTED_ALL:
        obj = getattr(kvferry, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, kvferry.KvferryError), name
    assert issubclass(kvferry.AuthError, kvferry.ProtocolError)
    assert issubclass(kvferry.TransferTimeout, kvferry.TransferError)


HEAVY = [
    # optional or heavy dependencies: imported where they are used, never by ``import kvferry``
    "aiohttp",
    "matplotlib",
    "mooncake",
    "msgspec",
    "prometheus_client",
    "redis",
    "tokenizers",
    "torch",
    "transformers",
    "uvloop",
    "vllm",
    "zmq",
    # the layers above the core: the facade needs none of them
    "kvferry.bench",
    "kvferry.cli",
    "kvferry.serving",
    "kvferry.telemetry",
    "kvferry.testing",
]


def test_import_has_no_side_effects() -> None:
    code = (
        "import sys, threading, os\n"
        "before = set(os.environ)\n"
        "import kvferry\n"
        "assert threading.active_count() == 1, threading.enumerate()\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert set(os.environ) == before\n"
        "print('clean')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "clean"
