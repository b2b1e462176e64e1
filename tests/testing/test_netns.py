"""The network-namespace harness: real namespaces, veth pairs, a bridge, a real store server.

Needs root and iproute2 (CI has both); elsewhere each test skips with the harness's reason.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvferry.backends.base import PutStatus, TierContext
from kvferry.backends.server.client import ServerTier
from kvferry.config.models import ServerTierConfig
from kvferry.testing.netns import NetLab, _free_subnet, netem_unavailable, netns_unavailable
from kvferry.testing.store_server import StoreServerProcess
from kvferry.testing.tier_kit import key, value

SLOT = 4096


def _require_netns() -> None:
    why = netns_unavailable()
    if why is not None:
        pytest.skip(why)


@pytest.fixture
def lab() -> Iterator[NetLab]:
    _require_netns()
    with NetLab() as lab:
        yield lab


def _namespaces() -> str:
    return subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def _links() -> str:
    return subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout


def _tx_bytes(device: str) -> int:
    return int(Path(f"/sys/class/net/{device}/statistics/tx_bytes").read_text())


def test_a_store_server_in_a_namespace_is_reached_over_tcp(lab: NetLab) -> None:
    ns = lab.add("store")
    server = StoreServerProcess(netns=ns, slot_size=SLOT).start()
    try:
        host, port = server.address.rsplit(":", 1)
        assert host == ns.ip  # bound to its namespace's address, not 127.0.0.1
        # Nothing in the root namespace listens there: the connection crosses the bridge.
        cfg = ServerTierConfig(addresses=[server.address], transport="tcp", timeout=5.0)
        view = ServerTier(cfg, TierContext(slot_size=SLOT))
        try:
            before = _tx_bytes(lab.bridge)
            keys = [key(i) for i in range(64)]
            vals = [value(i, SLOT) for i in range(64)]
            assert view.put(keys, vals) == [PutStatus.STORED] * 64
            # 64 blocks of 4 KiB left this namespace through the bridge, as tcp.
            assert _tx_bytes(lab.bridge) - before >= 64 * SLOT
            outs = [memoryview(bytearray(SLOT)) for _ in keys]
            assert view.get(keys, outs) == [SLOT] * 64
            assert [bytes(o) for o in outs] == vals
            assert view._wire.mapping(server.address) is None, "tcp, not the server's shm pool"
        finally:
            view.close()
        # Another namespace reaches it over the bridge too (namespace to namespace).
        other = lab.add("client")
        probe = f"import socket; socket.create_connection(({host!r}, {port}), timeout=5).close()"
        done = other.run([sys.executable, "-c", probe], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
    finally:
        server.kill()


def test_close_leaves_no_namespace_or_link_behind_also_after_a_failure() -> None:
    _require_netns()
    with pytest.raises(ZeroDivisionError), NetLab() as lab:
        a, b = lab.add("a"), lab.add("b")
        sleeper = a.popen(["sleep", "600"])
        assert a.name in _namespaces() and b.name in _namespaces()
        assert lab.bridge in _links()
        assert a.name != b.name and a.ip != b.ip != lab.host_ip
        1 / 0  # noqa: B018 (a test body failing half-way)
    assert sleeper.poll() is not None, "what popen started in a namespace is killed"
    assert a.name not in _namespaces() and b.name not in _namespaces()
    assert lab.bridge not in _links()
    assert f"kvf{lab._tag}" not in _links(), "no veth end is left on the root namespace"
    lab.close()  # idempotent


def test_bad_arguments_are_refused_clearly() -> None:
    _require_netns()
    with pytest.raises(ValueError, match="no room"):
        NetLab(subnet="10.250.250.0/31")
    # A /30 of a subnet nobody uses here: room for the bridge and one namespace.
    small = next(_free_subnet().subnets(new_prefix=30))
    with NetLab(subnet=str(small)) as lab:
        assert lab.host_ip == str(small[1])
        with pytest.raises(ValueError, match="letters, digits"):
            lab.add("no spaces")
        assert lab.add("only").ip == str(small[2])
        with pytest.raises(ValueError, match="full"):
            lab.add("more")
        with pytest.raises(ValueError, match="loss_pct"):
            lab.namespaces[0].set_netem(loss_pct=150)


def test_netem_delay_and_loss(lab: NetLab) -> None:
    ns = lab.add("slow")
    why = netem_unavailable()
    if why is not None:
        # Asking for it anyway says why it cannot be had, instead of silently not delaying.
        with pytest.raises(RuntimeError, match="netem"):
            ns.set_netem(delay_ms=20)
        pytest.skip(why)
    ns.set_netem(delay_ms=20, loss_pct=1)
    shown = ns.run(["tc", "qdisc", "show"], capture_output=True, text=True, check=True).stdout
    assert "netem" in shown and "delay 20" in shown and "loss 1%" in shown
    ns.set_netem()  # 0, 0: removed
    shown = ns.run(["tc", "qdisc", "show"], capture_output=True, text=True, check=True).stdout
    assert "netem" not in shown
    delayed = lab.add("delayed", delay_ms=5)
    shown = delayed.run(["tc", "qdisc", "show"], capture_output=True, text=True).stdout
    assert "delay 5" in shown


def _tbf_sent(shown: str) -> int:
    """Bytes the tbf qdisc in ``tc -s qdisc show`` output has sent (-1: no tbf)."""
    lines = shown.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("qdisc tbf"):
            return int(lines[i + 1].split()[1])  # " Sent N bytes M pkt ..."
    return -1


def test_a_link_rate_shapes_both_directions(lab: NetLab) -> None:
    ns = lab.add("nic", rate_bps=200_000_000)
    shown = ns.run(["tc", "qdisc", "show"], capture_output=True, text=True, check=True).stdout
    assert "tbf" in shown and "rate 200Mbit" in shown
    # 2 MB from the namespace to this process, over the shaped link: both tbf qdiscs pass it
    # (the data one way, the acks the other).
    port = 47000 + os.getpid() % 1000
    code = (
        f"import socket;s=socket.create_server(({ns.ip!r},{port}));c,_=s.accept();"
        "c.sendall(b'x'*2_000_000);c.close()"
    )
    sender = ns.popen([sys.executable, "-c", code])
    deadline = time.monotonic() + 10
    while True:
        try:
            conn = socket.create_connection((ns.ip, port), timeout=5)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    got = 0
    with conn:
        while chunk := conn.recv(1 << 16):
            got += len(chunk)
    sender.wait(timeout=10)
    assert got == 2_000_000
    inside = ns.run(
        ["tc", "-s", "qdisc", "show", "dev", ns._device], capture_output=True, text=True, check=True
    ).stdout
    outside = subprocess.run(
        ["tc", "-s", "qdisc", "show", "dev", ns._host_device],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert _tbf_sent(inside) >= 2_000_000
    assert _tbf_sent(outside) > 0
    ns.set_rate(0)
    shown = ns.run(["tc", "qdisc", "show"], capture_output=True, text=True, check=True).stdout
    assert "tbf" not in shown
    with pytest.raises(ValueError, match="1 Mbit"):
        ns.set_rate(1000)
