"""Several "hosts" on one machine: Linux network namespaces joined by a bridge, for tests.

A :class:`NetLab` makes one Linux bridge in the root namespace (the test process's own) with the
address ``host_ip``, and :meth:`NetLab.add` makes a network namespace per "host", joined to the
bridge by a veth pair: one end inside the namespace with the namespace's ``ip`` (and ``lo`` up),
the other end on the bridge. So the test process and every namespace reach each other by tcp over
real interfaces (a veth, a bridge, the kernel's whole IP stack), not over loopback, and a server
in a namespace that is killed, delayed (``tc netem``), held to a line rate (``tc tbf``) or cut off
behaves as a remote one would::

    with NetLab() as lab:
        a = lab.add("a")
        server = a.popen([sys.executable, "-m", "kvferry", "serve", "store", "--bind", a.ip])
        ...  # dial f"{a.ip}:{port}" from the test process

Needs root and iproute2 (``ip``; ``tc`` and the kernel's netem qdisc for delay and loss):
:func:`netns_unavailable` and :func:`netem_unavailable` say why not, in a sentence fit for
``pytest.skip``. Every name the lab makes carries the process id and a random tag, so labs of
parallel test processes never collide, and :meth:`NetLab.close` removes everything it made (also
after a failure half-way through :meth:`NetLab.add`).

Must not: touch an interface, namespace or qdisc it did not make, or end a process it did not
start (:meth:`NetLab.close` kills only what :meth:`Netns.popen` started and is still running,
since a process alive in a namespace keeps that namespace alive after ``ip netns del``).

Note: processes in a namespace share the machine's shared memory and boot id, so a kvferry
client with ``server.transport: auto`` would still map a namespaced server's pool (shm); set
``transport: tcp`` for traffic that crosses the namespaces as it would cross machines.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import secrets
import shutil
import subprocess
from collections.abc import Sequence
from typing import Any

__all__ = ["NetLab", "Netns", "netem_unavailable", "netns_unavailable"]

_TIMEOUT = 20.0
"""Seconds any one ``ip``/``tc`` command may take (they take milliseconds; a hang guard)."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``ip ARGS``; raises RuntimeError naming the command and its stderr on failure."""
    return _cmd(["ip", *args], check=check)


def _cmd(argv: list[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=_TIMEOUT)
    if check and done.returncode != 0:
        raise RuntimeError(
            f"`{' '.join(argv)}` failed (exit {done.returncode}): "
            f"{(done.stderr or done.stdout).strip()}"
        )
    return done


def _tag() -> str:
    return secrets.token_hex(3)


@functools.cache
def netns_unavailable() -> str | None:
    """None when network namespaces can be made here; else why not, as one sentence.

    Tries the real thing once per process: ``ip netns add`` of a scratch namespace (deleted at
    once), since being root is not enough inside some containers.
    """
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add); run the test as root, as CI does"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed; apt-get install iproute2"
    name = f"kvferry-probe-{os.getpid()}-{_tag()}"
    try:
        _ip("netns", "add", name)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        return f"cannot make a network namespace here: {e}"
    _ip("netns", "del", name, check=False)
    return None


@functools.cache
def netem_unavailable() -> str | None:
    """None when ``tc qdisc ... netem`` (delay, loss) works here; else why not, as a sentence.

    Tries it on the loopback of a scratch namespace, so no interface of the machine is touched.
    """
    why = netns_unavailable()
    if why is not None:
        return why
    if shutil.which("tc") is None:
        return "the `tc` command (iproute2) is not installed; apt-get install iproute2"
    name = f"kvferry-probe-{os.getpid()}-{_tag()}"
    try:
        _ip("netns", "add", name)
        _ip("-n", name, "link", "set", "lo", "up")
        _cmd(["ip", "netns", "exec", name, "tc", "qdisc", "add", "dev", "lo", "root", "netem"])
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        return (
            f"tc netem is not available here ({e}); it needs the kernel's sch_netem module "
            "(modprobe sch_netem, package linux-modules-extra on Ubuntu)"
        )
    finally:
        _ip("netns", "del", name, check=False)
    return None


def _used_networks() -> list[ipaddress.IPv4Network]:
    """The IPv4 networks of this namespace's addresses and routes (to pick a subnet apart)."""
    nets: list[ipaddress.IPv4Network] = []
    for line in _ip("-o", "-4", "addr", "show").stdout.splitlines():
        parts = line.split()
        if "inet" in parts:
            nets.append(ipaddress.IPv4Interface(parts[parts.index("inet") + 1]).network)
    for line in _ip("-4", "route", "show").stdout.splitlines():
        first = line.split()[0] if line.split() else ""
        if first and first != "default":
            try:
                nets.append(ipaddress.IPv4Network(first, strict=False))
            except ValueError:
                continue
    return nets


def _free_subnet() -> ipaddress.IPv4Network:
    used = _used_networks()
    for _ in range(200):
        net = ipaddress.IPv4Network(f"10.{secrets.randbelow(256)}.{secrets.randbelow(256)}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise RuntimeError("found no free 10.x.y.0/24 subnet for a NetLab; pass subnet= yourself")


class Netns:
    """One namespace of a :class:`NetLab` (made by :meth:`NetLab.add`, not directly).

    Attributes:
        name: the real namespace name (``ip netns exec NAME ...``), unique per lab.
        ip: its address on the lab's bridge.
    """

    def __init__(self, lab: NetLab, name: str, ip: str, device: str, host_device: str) -> None:
        self.name = name
        self.ip = ip
        self._lab = lab
        self._device = device  # the veth end inside the namespace
        self._host_device = host_device  # its peer on the bridge, in the root namespace

    def __repr__(self) -> str:
        return f"Netns({self.name!r}, ip={self.ip!r})"

    def _argv(self, argv: Sequence[str]) -> list[str]:
        if isinstance(argv, str):
            raise TypeError("argv is a sequence of arguments, not one string")
        return ["ip", "netns", "exec", self.name, *argv]

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` inside this namespace (``ip netns exec NAME argv...``, which execs
        ``argv`` in place: the Popen's pid is the program's own). ``kwargs`` go to Popen. The
        lab kills it at :meth:`NetLab.close` if it is still running then."""
        proc: subprocess.Popen[Any] = subprocess.Popen(self._argv(argv), **kwargs)
        self._lab._procs.append(proc)
        return proc

    def run(self, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """Run ``argv`` inside this namespace to completion; ``kwargs`` go to subprocess.run."""
        return subprocess.run(self._argv(argv), **kwargs)

    def set_netem(self, delay_ms: float = 0.0, loss_pct: float = 0.0) -> None:
        """Delay (ms) and drop (percent) every packet leaving this namespace, with ``tc netem``
        on its veth end (so a round trip to it grows by ``delay_ms``); 0 and 0 remove it.

        Raises:
            ValueError: a negative delay, or a loss outside [0, 100].
            RuntimeError: netem is not available here (says why), or tc failed.
        """
        if delay_ms < 0 or not 0 <= loss_pct <= 100:
            raise ValueError(
                f"netem needs delay_ms >= 0 and 0 <= loss_pct <= 100, got {delay_ms}, {loss_pct}"
            )
        tc = ["ip", "netns", "exec", self.name, "tc", "qdisc"]
        if delay_ms == 0 and loss_pct == 0:
            _cmd([*tc, "del", "dev", self._device, "root"], check=False)
            return
        why = netem_unavailable()
        if why is not None:
            raise RuntimeError(f"cannot set a delay or loss on {self.name}: {why}")
        shape = ["delay", f"{delay_ms}ms", "loss", f"{loss_pct}%"]
        _cmd([*tc, "replace", "dev", self._device, "root", "netem", *shape])

    def set_rate(self, bits_per_s: int) -> None:
        """Limit this "host's" link to ``bits_per_s`` each way (a NIC's line rate), with a
        ``tc tbf`` qdisc on both ends of its veth pair (egress of the namespace's end: what it
        sends; egress of the bridge's end: what it receives); 0 removes the limit.

        A machine's namespaces share its CPUs, so without a limit a "host" is as fast as the
        whole machine's memory copies; with one, each host has its own bottleneck as separate
        machines do, and what several hosts give together is what the links give.

        Raises:
            ValueError: a negative rate, or a positive one under 1 Mbit/s.
            RuntimeError: tc failed (its message).
        """
        if bits_per_s < 0 or 0 < bits_per_s < 1_000_000:
            raise ValueError(f"a link rate is 0 (none) or at least 1 Mbit/s, got {bits_per_s}")
        ends = [
            (["ip", "netns", "exec", self.name, "tc", "qdisc"], self._device),
            (["tc", "qdisc"], self._host_device),
        ]
        # The bucket holds 4 ms of the rate and at least 256 KiB: veth sends 64 KiB GSO packets,
        # and a packet larger than the bucket would never pass.
        burst = max(bits_per_s // 8 // 250, 256 << 10)
        for tc, device in ends:
            if bits_per_s == 0:
                _cmd([*tc, "del", "dev", device, "root"], check=False)
                continue
            shape = ["tbf", "rate", f"{bits_per_s}bit", "burst", str(burst), "latency", "50ms"]
            _cmd([*tc, "replace", "dev", device, "root", *shape])


class NetLab:
    """A bridge in the root namespace and the namespaces joined to it; a context manager.

    Args:
        subnet: the lab's IPv4 /24 (or larger) network, e.g. "10.77.3.0/24"; default a random
            10.x.y.0/24 that no address or route of this machine uses. The bridge takes its first
            host address (``host_ip``), namespaces the following ones.

    Raises:
        RuntimeError: namespaces are unavailable here (:func:`netns_unavailable` says why), or
            making the bridge failed (nothing is left behind).
        ValueError: ``subnet`` is not an IPv4 network with room for hosts.
    """

    def __init__(self, subnet: str | None = None) -> None:
        why = netns_unavailable()
        if why is not None:
            raise RuntimeError(f"NetLab: {why}")
        net = ipaddress.IPv4Network(subnet, strict=True) if subnet else _free_subnet()
        if net.num_addresses < 4:
            raise ValueError(f"NetLab: subnet {subnet} has no room for a bridge and a namespace")
        self.subnet = net
        self._hosts = net.hosts()
        self.host_ip = str(next(self._hosts))
        # Interface names hold at most 15 characters: a random tag there; the namespaces' names
        # (no such limit) carry the process id too.
        self._tag = _tag()
        self._ns_prefix = f"kvferry-{os.getpid()}-{self._tag}"
        self.bridge = f"kvfb{self._tag}"
        self.namespaces: list[Netns] = []
        self._links: list[str] = [self.bridge]  # what to delete at close, in the root namespace
        self._procs: list[subprocess.Popen[Any]] = []
        self._closed = False
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.host_ip}/{net.prefixlen}", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> NetLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add(
        self, name: str, *, delay_ms: float = 0.0, loss_pct: float = 0.0, rate_bps: int = 0
    ) -> Netns:
        """A new namespace on the bridge, with the next free address of the subnet.

        Args:
            name: a short label (letters, digits, '-'); the namespace's real name adds the
                lab's tag to it.
            delay_ms, loss_pct: a ``tc netem`` delay and loss on its packets (see
                :meth:`Netns.set_netem`); 0 sets none.
            rate_bps: its link's rate each way, bits/s (see :meth:`Netns.set_rate`); 0: none.

        Raises:
            ValueError: a bad name, or the subnet is full.
            RuntimeError: an ``ip`` command failed (what it made is removed at close).
        """
        if self._closed:
            raise RuntimeError("NetLab.add after close")
        if not name or not all(c.isalnum() or c == "-" for c in name):
            raise ValueError(f"namespace label {name!r}: use letters, digits and '-'")
        try:
            ip = str(next(self._hosts))
        except StopIteration:
            raise ValueError(f"NetLab: subnet {self.subnet} is full") from None
        i = len(self.namespaces)
        ns_name = f"{self._ns_prefix}-{name}"
        host_end, ns_end = f"kvf{self._tag}h{i}", f"kvf{self._tag}n{i}"
        _ip("netns", "add", ns_name)
        ns = Netns(self, ns_name, ip, ns_end, host_end)
        self.namespaces.append(ns)  # from here on, close() removes it
        self._links.append(host_end)
        _ip("link", "add", host_end, "type", "veth", "peer", "name", ns_end, "netns", ns_name)
        _ip("link", "set", host_end, "master", self.bridge, "up")
        _ip("-n", ns_name, "addr", "add", f"{ip}/{self.subnet.prefixlen}", "dev", ns_end)
        _ip("-n", ns_name, "link", "set", ns_end, "up")
        _ip("-n", ns_name, "link", "set", "lo", "up")
        if delay_ms or loss_pct:
            ns.set_netem(delay_ms, loss_pct)
        if rate_bps:
            ns.set_rate(rate_bps)
        return ns

    def close(self) -> None:
        """Kill what :meth:`Netns.popen` started and still runs, delete every namespace, veth
        and the bridge this lab made; idempotent, and never raises for what is already gone."""
        if self._closed:
            return
        self._closed = True
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(timeout=_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
        for ns in self.namespaces:
            _ip("netns", "del", ns.name, check=False)  # takes its veth pair with it
        for link in reversed(self._links):
            if _ip("link", "show", link, check=False).returncode == 0:
                _ip("link", "del", link, check=False)
