"""The doctor's host checks: memory, limits and network, one function each.

Each reads the machine through a :class:`~kvferry.bench.doctor.system.SystemView` and the
effective config and returns one :class:`~kvferry.bench.doctor.base.CheckResult`: OK, WARN,
FAIL or SKIP (not applicable here, or the file it reads is absent: "could not read PATH", never
an exception), with the measured value and its unit, the threshold, why it matters for kvferry
and the fix. The thresholds are the named constants below, each with where it comes from:
kvferry's own code (the 4 MiB receive buffer its store client asks for, its listener's backlog)
or the peers' production checklists (``reference/notes-tuning-rules.md``). Nothing here writes
to the system; nothing needs root.
"""

from __future__ import annotations

import re
import resource

from kvferry.bench.doctor.base import (
    CheckResult,
    DoctorContext,
    Status,
    check,
    count_limit,
    is_loopback,
    limit,
    pool_bytes,
    size,
    unreadable,
    url_host,
)
from kvferry.bench.doctor.system import SystemView
from kvferry.config.models import KvferryConfig

__all__ = [
    "JUMBO_MTU",
    "LOOPBACK_MTU",
    "MAX_MAP_COUNT_MIN",
    "MIN_SHM_BYTES",
    "NOFILE_MIN",
    "SHM_USED_MAX",
    "SOMAXCONN_REDIS",
    "TCP_BUFFER_MIN",
    "listener_backlog",
    "numa_nodes",
    "parse_cpulist",
    "time_wait",
]

NOFILE_MIN = 65536
"""Open files a kvferry process should be allowed: the peers' production checklists ask for
65536, enough for a full listener, the shm mappings and the disk slot files with room left."""
MAX_MAP_COUNT_MIN = 65530
"""The kernel's default vm.max_map_count: kvferry maps a handful of regions per segment and
peer, so only a limit lowered below the default is a problem."""
MIN_SHM_BYTES = 1 << 30
"""/dev/shm size below which engines beside kvferry fail (a container's default is 64 MiB)."""
SHM_USED_MAX = 0.8
TCP_BUFFER_MIN = 4 << 20
"""4 MiB: the receive buffer kvferry's store client asks for (SO_RCVBUF, capped by
net.core.rmem_max), and the bandwidth-delay product of a 32 Gb/s path at 1 ms."""
SOMAXCONN_REDIS = 511
"""Redis' default tcp-backlog: the least a host running a Redis tier should allow."""
JUMBO_MTU = 9000
LOOPBACK_MTU = 65536
"""The loopback MTU Linux sets by default; kvferry's benches on loopback assume it."""


# -- memory ----------------------------------------------------------------------------------
WHY_MEMLOCK = (
    "RDMA registration (Mooncake's rdma protocol) and page-locking the cpu pool (cpu.pinned) "
    "lock memory counted against RLIMIT_MEMLOCK: below what they need, registration fails or "
    "the pool stays pageable and every GPU load goes through a bounce buffer."
)


@check("memlock")
def memlock(ctx: DoctorContext) -> CheckResult:
    """RLIMIT_MEMLOCK (soft) against the cpu pool when cpu.pinned and Mooncake's rdma buffers."""
    cfg = ctx.config
    soft, hard = ctx.view.getrlimit(resource.RLIMIT_MEMLOCK)
    value = f"{limit(soft)} (hard {limit(hard)})"
    rdma = (
        cfg.mooncake.global_segment_size + cfg.mooncake.local_buffer_size
        if "mooncake" in cfg.store.tiers and cfg.mooncake.protocol == "rdma"
        else 0
    )
    pinned = pool_bytes(cfg) if cfg.cpu.pinned and "cpu" in cfg.store.tiers else 0
    need = rdma + pinned
    fix = (
        "ulimit -l unlimited before starting kvferry (systemd: LimitMEMLOCK=infinity; docker: "
        "--ulimit memlock=-1; /etc/security/limits.conf: '* - memlock unlimited')"
    )
    if need == 0:
        return CheckResult(
            "memlock", "SKIP", value, "no locked memory asked (cpu.pinned off, no rdma tier)",
            WHY_MEMLOCK, "",
        )  # fmt: skip
    asked = " + ".join(
        w for w in (f"{size(pinned)} cpu pool" if pinned else "",
                    f"{size(rdma)} mooncake rdma" if rdma else "") if w
    )  # fmt: skip
    threshold = f">= {size(need)} ({asked})"
    if soft == resource.RLIM_INFINITY or soft >= need:
        return CheckResult("memlock", "OK", value, threshold, WHY_MEMLOCK, "")
    status: Status = "FAIL" if rdma and soft < rdma else "WARN"
    return CheckResult("memlock", status, value, threshold, WHY_MEMLOCK, fix)


WHY_HUGEPAGES = (
    "kvferry's pools are ordinary memfd pages (with transparent huge pages where "
    "use_hugepages asks), so hugetlb pages reserved here are memory its pools cannot use."
)


@check("hugepages")
def hugepages(ctx: DoctorContext) -> CheckResult:
    """/proc/meminfo: hugetlb pages reserved and still free (WARN when all are unused)."""
    info = ctx.view.meminfo()
    if "HugePages_Total" not in info:
        return unreadable("hugepages", f"{ctx.view.proc}/meminfo (HugePages_Total)", WHY_HUGEPAGES)
    total, free = info["HugePages_Total"], info.get("HugePages_Free", 0)
    page = info.get("Hugepagesize", 2048) * 1024
    value = f"{total} x {size(page)} reserved, {free} free"
    threshold = "none reserved, or in use"
    if total and free == total:
        return CheckResult(
            "hugepages", "WARN", value, threshold, WHY_HUGEPAGES,
            "sysctl -w vm.nr_hugepages=0 if nothing on this host uses them",
        )  # fmt: skip
    return CheckResult("hugepages", "OK", value, threshold, WHY_HUGEPAGES, "")


WHY_THP = (
    "With madvise, kvferry's pools get huge pages exactly where cpu.use_hugepages / "
    "transfer.use_hugepages ask (fewer TLB misses on large copies); never ignores that advice, "
    "and always makes a Redis tier on this host stall on fork and grow its memory."
)


@check("thp")
def thp(ctx: DoctorContext) -> CheckResult:
    """The transparent huge page mode against *.use_hugepages and a Redis tier on this host."""
    rel = "kernel/mm/transparent_hugepage/enabled"
    text = ctx.view.sys_text(rel)
    found = re.search(r"\[(\w+)\]", text or "")
    if found is None:
        return unreadable("thp", f"{ctx.view.sys}/{rel}", WHY_THP)
    mode = found.group(1)
    cfg = ctx.config
    wanted = cfg.cpu.use_hugepages or cfg.transfer.use_hugepages
    redis_here = "redis" in cfg.store.tiers and is_loopback(url_host(cfg.redis.url))
    threshold = "madvise"
    fix = f"echo madvise > {ctx.view.sys}/{rel} (root)"
    if mode == "never" and wanted:
        return CheckResult(
            "thp", "WARN", f"{mode} (use_hugepages is set)", threshold, WHY_THP,
            f"{fix}, or leave cpu.use_hugepages / transfer.use_hugepages off",
        )  # fmt: skip
    if mode == "always" and redis_here:
        return CheckResult("thp", "WARN", f"{mode} (redis tier on this host)", threshold,
                           WHY_THP, fix)  # fmt: skip
    return CheckResult("thp", "OK", mode, threshold, WHY_THP, "")


def parse_cpulist(text: str) -> set[int]:
    """``0-3,8,10-11`` -> {0, 1, 2, 3, 8, 10, 11}; malformed parts are skipped."""
    cpus: set[int] = set()
    for part in text.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            cpus.update(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            continue
    return cpus


def numa_nodes(view: SystemView) -> dict[int, set[int]] | None:
    """NUMA node -> its CPUs; None when the kernel exposes no node directory."""
    root = view.sys / "devices/system/node"
    names = [n for n in view.listdir(root) if re.fullmatch(r"node\d+", n)]
    if not names:
        return None
    return {
        int(n[4:]): parse_cpulist(view.read(root / n / "cpulist") or "")
        for n in sorted(names, key=lambda n: int(n[4:]))
    }


WHY_NUMA = (
    "kvferry's pools are placed by first touch from the thread that allocates them: threads "
    "and buffers on a node other than the NIC's or GPU's cross the socket interconnect on "
    "every copy."
)


@check("numa")
def numa(ctx: DoctorContext) -> CheckResult:
    """NUMA nodes, the nodes this process may run on, and the NICs' nodes."""
    nodes = numa_nodes(ctx.view)
    if nodes is None:
        return unreadable("numa", f"{ctx.view.sys}/devices/system/node", WHY_NUMA)
    devices = []
    net = ctx.view.sys / "class/net"
    for name in ctx.view.listdir(net):
        node = ctx.view.sys_int(f"class/net/{name}/device/numa_node")
        if node is not None and node >= 0:
            devices.append(f"{name} on node {node}")
    where = f"; {', '.join(devices)}" if devices else ""
    threshold = "1 node, or this process on 1 node"
    if len(nodes) == 1:
        return CheckResult("numa", "OK", f"1 node{where}", threshold, WHY_NUMA, "")
    allowed = ctx.view.affinity()
    used = sorted(n for n, cpus in nodes.items() if cpus & allowed)
    value = f"{len(nodes)} nodes; this process may run on node(s) {used}{where}"
    if len(used) <= 1:
        return CheckResult("numa", "OK", value, threshold, WHY_NUMA, "")
    return CheckResult(
        "numa", "WARN", value, threshold, WHY_NUMA,
        "numactl --cpunodebind=N --membind=N kvferry ... (N: the node of the NIC or GPU, "
        "/sys/class/net/IF/device/numa_node)",
    )  # fmt: skip


WHY_NUMA_BALANCING = (
    "Automatic NUMA balancing unmaps pages to sample accesses and migrates them: with "
    "kvferry's threads and pools pinned to a node it only adds page faults in the middle of "
    "transfers."
)


@check("numa_balancing")
def numa_balancing(ctx: DoctorContext) -> CheckResult:
    """kernel.numa_balancing, which matters only with more than one node."""
    rel = "sys/kernel/numa_balancing"
    value = ctx.view.proc_int(rel)
    if value is None:
        return unreadable("numa_balancing", f"{ctx.view.proc}/{rel}", WHY_NUMA_BALANCING)
    nodes = numa_nodes(ctx.view) or {}
    threshold = "0 where kvferry is pinned to 1 of >1 nodes"
    if value == 0:
        return CheckResult("numa_balancing", "OK", "0", threshold, WHY_NUMA_BALANCING, "")
    if len(nodes) <= 1:
        return CheckResult("numa_balancing", "OK", f"{value} (one node: no effect)", threshold,
                           WHY_NUMA_BALANCING, "")  # fmt: skip
    return CheckResult(
        "numa_balancing", "WARN", f"{value} ({len(nodes)} nodes)", threshold, WHY_NUMA_BALANCING,
        "sysctl -w kernel.numa_balancing=0 (root), with kvferry pinned by numactl",
    )  # fmt: skip


# -- limits ----------------------------------------------------------------------------------
WHY_NOFILE = (
    "Every kvferry connection, shm mapping and disk slot file holds a descriptor: at the limit "
    "accept() and open() fail with EMFILE and the listener turns peers away."
)


@check("nofile")
def nofile(ctx: DoctorContext) -> CheckResult:
    """RLIMIT_NOFILE (soft): WARN under 65536, FAIL under what a full listener holds."""
    soft, hard = ctx.view.getrlimit(resource.RLIMIT_NOFILE)
    listen = ctx.config.listen
    floor = listen.max_connections + listen.max_pending + 64
    value = f"{count_limit(soft)} (hard {count_limit(hard)})"
    threshold = f">= {NOFILE_MIN}; FAIL < {floor} (a full listener)"
    infinite = soft == resource.RLIM_INFINITY
    raise_hard = "" if hard == resource.RLIM_INFINITY or hard >= NOFILE_MIN else (
        ", after the hard limit (limits.conf: '* - nofile 65536')"
    )  # fmt: skip
    fix = (
        f"ulimit -n {NOFILE_MIN}{raise_hard}; systemd LimitNOFILE={NOFILE_MIN}; docker "
        f"--ulimit nofile={NOFILE_MIN}"
    )
    if infinite or soft >= NOFILE_MIN:
        return CheckResult("nofile", "OK", value, threshold, WHY_NOFILE, "")
    status: Status = "FAIL" if soft < floor else "WARN"
    return CheckResult("nofile", status, value, threshold, WHY_NOFILE, fix)


WHY_MAX_MAP = (
    "Each kvferry memory region and each peer's mapped segment is a mapping: past the limit "
    "mmap fails with ENOMEM while memory is still free."
)


@check("max_map_count")
def max_map_count(ctx: DoctorContext) -> CheckResult:
    """vm.max_map_count against the kernel's default."""
    rel = "sys/vm/max_map_count"
    value = ctx.view.proc_int(rel)
    if value is None:
        return unreadable("max_map_count", f"{ctx.view.proc}/{rel}", WHY_MAX_MAP)
    threshold = f">= {MAX_MAP_COUNT_MIN} (the kernel's default)"
    if value >= MAX_MAP_COUNT_MIN:
        return CheckResult("max_map_count", "OK", str(value), threshold, WHY_MAX_MAP, "")
    return CheckResult("max_map_count", "WARN", str(value), threshold, WHY_MAX_MAP,
                       f"sysctl -w vm.max_map_count={MAX_MAP_COUNT_MIN * 4} (root)")  # fmt: skip


WHY_SHM = (
    "kvferry's own segments are memfd and not bounded by this mount, but the engines beside it "
    "(vLLM and NCCL, torch workers, Mooncake's shm transport) put theirs here, and a small "
    "/dev/shm makes them die with SIGBUS."
)


@check("dev_shm")
def dev_shm(ctx: DoctorContext) -> CheckResult:
    """The size and use of /dev/shm (statvfs) and how many files are in it."""
    path = str(ctx.view.dev_shm)
    try:
        st = ctx.view.statvfs(path)
    except OSError:
        return unreadable("dev_shm", path, WHY_SHM)
    total = st.f_blocks * st.f_frsize
    free = st.f_bavail * st.f_frsize
    used = 1 - free / total if total else 1.0
    segments = len(ctx.view.listdir(ctx.view.dev_shm))
    value = f"{size(total)}, {used:.0%} used, {segments} file(s)"
    threshold = f">= {size(MIN_SHM_BYTES)} and < {SHM_USED_MAX:.0%} used"
    fix = (
        "docker run --shm-size=16g, or mount -o remount,size=16G /dev/shm (root); remove "
        "stale segments of dead processes"
    )
    if total < MIN_SHM_BYTES or used > SHM_USED_MAX:
        return CheckResult("dev_shm", "WARN", value, threshold, WHY_SHM, fix)
    return CheckResult("dev_shm", "OK", value, threshold, WHY_SHM, "")


# -- network ---------------------------------------------------------------------------------
WHY_TCP = (
    "A TCP stream moves at most one window per round trip, so buffers under the "
    "bandwidth-delay product cap kvferry's tcp transport below the link, and rmem_max silently "
    "cuts the 4 MiB receive buffer kvferry's store client asks for."
)


@check("tcp_buffers")
def tcp_buffers(ctx: DoctorContext) -> CheckResult:
    """net.core.rmem_max/wmem_max and the tcp_rmem/tcp_wmem maxima against 4 MiB."""
    v = ctx.view
    rmem, wmem = v.proc_int("sys/net/core/rmem_max"), v.proc_int("sys/net/core/wmem_max")
    tcp_rmem, tcp_wmem = v.proc_ints("sys/net/ipv4/tcp_rmem"), v.proc_ints("sys/net/ipv4/tcp_wmem")
    if rmem is None or wmem is None:
        return unreadable("tcp_buffers", f"{v.proc}/sys/net/core/rmem_max, wmem_max", WHY_TCP)
    parts = [f"rmem_max {size(rmem)}", f"wmem_max {size(wmem)}"]  # net.core
    low = [] if rmem >= TCP_BUFFER_MIN else ["net.core.rmem_max"]
    for name, triple in (("tcp_rmem", tcp_rmem), ("tcp_wmem", tcp_wmem)):
        if triple and len(triple) == 3:
            parts.append(f"{name} {size(triple[2])}")
            if triple[2] < TCP_BUFFER_MIN:
                low.append(f"net.ipv4.{name}")
    threshold = f"rmem_max, tcp_rmem, tcp_wmem (max) >= {size(TCP_BUFFER_MIN)}"
    value = ", ".join(parts)
    if not low:
        return CheckResult("tcp_buffers", "OK", value, threshold, WHY_TCP, "")
    return CheckResult(
        "tcp_buffers", "WARN", value, threshold, WHY_TCP,
        "sysctl -w net.core.rmem_max=16777216 net.core.wmem_max=16777216 "
        "net.ipv4.tcp_rmem='4096 131072 16777216' net.ipv4.tcp_wmem='4096 16384 16777216' "
        f"(root; low: {', '.join(low)})",
    )  # fmt: skip


WHY_PORTS = (
    "Every outgoing connection to one peer address takes an ephemeral port, and a closed one "
    "holds it in TIME_WAIT for 60 s: reconnect storms run out of ports and connect fails with "
    "EADDRNOTAVAIL."
)


def time_wait(view: SystemView) -> int | None:
    """Sockets in TIME_WAIT (state 06 in /proc/net/tcp and tcp6); None if neither reads."""
    count, read = 0, False
    for name in ("net/tcp", "net/tcp6"):
        text = view.proc_text(name)
        if text is None:
            continue
        read = True
        for line in text.splitlines()[1:]:
            fields = line.split()
            if len(fields) > 3 and fields[3] == "06":
                count += 1
    return count if read else None


@check("port_range")
def port_range(ctx: DoctorContext) -> CheckResult:
    """The ephemeral port range against listen.max_connections, and TIME_WAIT sockets."""
    rel = "sys/net/ipv4/ip_local_port_range"
    bounds = ctx.view.proc_ints(rel)
    if not bounds or len(bounds) != 2:
        return unreadable("port_range", f"{ctx.view.proc}/{rel}", WHY_PORTS)
    ports = bounds[1] - bounds[0] + 1
    waiting = time_wait(ctx.view)
    need = ctx.config.listen.max_connections
    value = f"{bounds[0]}-{bounds[1]} ({ports} ports)"
    if waiting is not None:
        value += f", {waiting} in TIME_WAIT"
    threshold = f">= {need} ports (listen.max_connections); TIME_WAIT < half"
    if ports >= need and (waiting or 0) < ports // 2:
        return CheckResult("port_range", "OK", value, threshold, WHY_PORTS, "")
    return CheckResult(
        "port_range", "WARN", value, threshold, WHY_PORTS,
        "sysctl -w net.ipv4.ip_local_port_range='10240 65535' net.ipv4.tcp_tw_reuse=1 (root); "
        "keep kvferry's connections open (transfer.workers per peer are reused)",
    )  # fmt: skip


WHY_SOMAXCONN = (
    "listen() backlogs are silently cut to somaxconn: when many peers connect at once (a fleet "
    "restart) the overflow's SYNs are dropped and they wait 1-3 s to retry."
)


def listener_backlog(config: KvferryConfig) -> int:
    """The backlog kvferry's transfer listener asks for (:mod:`kvferry.transfer.server`)."""
    listen = config.listen
    return min(4096, max(128, listen.max_connections + listen.max_pending))


@check("somaxconn")
def somaxconn(ctx: DoctorContext) -> CheckResult:
    """net.core.somaxconn against the backlog kvferry's listener asks for."""
    rel = "sys/net/core/somaxconn"
    value = ctx.view.proc_int(rel)
    if value is None:
        return unreadable("somaxconn", f"{ctx.view.proc}/{rel}", WHY_SOMAXCONN)
    need = max(listener_backlog(ctx.config), SOMAXCONN_REDIS)
    threshold = f">= {need} (the backlog kvferry's listener asks)"
    if value >= need:
        return CheckResult("somaxconn", "OK", str(value), threshold, WHY_SOMAXCONN, "")
    return CheckResult("somaxconn", "WARN", str(value), threshold, WHY_SOMAXCONN,
                       f"sysctl -w net.core.somaxconn={max(4096, need)} (root)")  # fmt: skip


WHY_MTU = (
    "kvferry's tcp transport pays a fixed cost per packet: the 64 KiB loopback MTU moves a "
    "slice in a few packets, and jumbo frames (9000) cut a NIC's packet count six-fold where "
    "every hop supports them."
)


@check("mtu")
def mtu(ctx: DoctorContext) -> CheckResult:
    """Loopback's MTU when kvferry binds loopback, else the up interfaces' (jumbo frames)."""
    net = ctx.view.sys / "class/net"
    names = ctx.view.listdir(net)
    if not names:
        return unreadable("mtu", str(net), WHY_MTU)
    mtus: dict[str, int] = {}
    up: dict[str, bool] = {}
    for name in names:
        m = ctx.view.sys_int(f"class/net/{name}/mtu")
        if m is not None:
            mtus[name] = m
            up[name] = ctx.view.sys_text(f"class/net/{name}/operstate") in ("up", "unknown")
    loop = [n for n in mtus if n == "lo"]
    others = {n: m for n, m in mtus.items() if n != "lo" and up[n]}
    value = "; ".join(f"{n} {m}" for n, m in ([(n, mtus[n]) for n in loop] + list(others.items())))
    if ctx.config.listen.bind_address and is_loopback(ctx.config.listen.bind_address):
        threshold = f"lo >= {LOOPBACK_MTU} (bind address is loopback)"
        if loop and mtus["lo"] >= LOOPBACK_MTU:
            return CheckResult("mtu", "OK", value, threshold, WHY_MTU, "")
        return CheckResult("mtu", "WARN", value or "no lo", threshold, WHY_MTU,
                           f"ip link set dev lo mtu {LOOPBACK_MTU} (root)")  # fmt: skip
    threshold = f"an interface that is up with MTU >= {JUMBO_MTU}"
    if any(m >= JUMBO_MTU for m in others.values()):
        return CheckResult("mtu", "OK", value, threshold, WHY_MTU, "")
    return CheckResult(
        "mtu", "WARN", value or "no interface up", threshold, WHY_MTU,
        f"ip link set dev IF mtu {JUMBO_MTU} (root), only where the switches and every peer "
        "carry jumbo frames",
    )  # fmt: skip
