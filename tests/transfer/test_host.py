"""This host's boot id (kvferry/transfer/host.py) and how an unknown one is treated."""

from __future__ import annotations

import dataclasses
import os
import uuid
from collections.abc import Callable
from pathlib import Path

from kvferry import KvferryConfig, TransferEngine
from kvferry.config.models import ListenConfig, TransferConfig
from kvferry.observe.counters import TransportCounters
from kvferry.testing import TargetProcess
from kvferry.transfer.host import BOOT_ID_PATH, boot_id, same_host
from kvferry.transfer.transports.base import TransportContext
from kvferry.transfer.transports.shm import ShmTransport

StartTarget = Callable[..., TargetProcess]


def test_boot_id_is_the_kernels() -> None:
    got = boot_id()
    assert got == Path(BOOT_ID_PATH).read_text().strip()
    uuid.UUID(got)  # raises if the kernel's id were mangled


def test_an_unreadable_boot_id_is_unknown(tmp_path: Path) -> None:
    assert boot_id(str(tmp_path / "no-such-file")) == ""
    assert boot_id(str(tmp_path)) == ""  # a directory: unreadable as a file


def test_unknown_is_never_the_same_host() -> None:
    known = boot_id()
    assert same_host(known, known)
    assert not same_host("", "")
    assert not same_host("", known)
    assert not same_host(known, "")
    assert not same_host(known, str(uuid.uuid4()))


def _shm(local_boot_id: str) -> ShmTransport:
    ctx = TransportContext(
        instance="test",
        boot_id=local_boot_id,
        pid=os.getpid(),
        listen=ListenConfig(),
        counters={"shm": TransportCounters()},
        local_regions={},
    )
    return ShmTransport(TransferConfig(), ctx)


def test_shm_reaches_a_same_host_target_only_with_a_known_boot_id(
    target_process: StartTarget,
) -> None:
    """A target whose boot id is unknown (as one on a kernel that does not tell it would
    announce) is not shm-reachable even from an initiator whose id is unknown too: both would
    be "" and the old hostname fallback made them equal."""
    target = target_process()
    with TransferEngine(KvferryConfig(transfer={"transport": "tcp"})) as ini:
        peer = ini.open_segment(target.name).peer
    assert peer.boot_id == boot_id()  # what the target announced
    assert _shm(boot_id()).reachable(peer)
    unknown = dataclasses.replace(peer, boot_id="")
    assert not _shm("").reachable(unknown)
    assert not _shm(boot_id()).reachable(unknown)
    assert not _shm("").reachable(peer)
