"""The doctor's storage, service and device checks, the wake-up probe and the config.

Same contract as :mod:`.checks`: one function per check, one
:class:`~kvferry.bench.doctor.base.CheckResult` each, SKIP where it does not apply (no disk
tier, no Redis configured, no GPU, no RDMA device) or cannot read what it needs. The disk checks
look at the disk tier's directory (``disk.path``, or the root kvferry makes private directories
under), and when the disk tier is not in ``store.tiers`` they still measure but say SKIP, so the
numbers are there for whoever adds it. The probes (``O_DIRECT``, Redis PING, a TCP connect,
H2D, wake-up) come from the system view, so a test can replace each.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from kvferry.backends.disk_format import ALIGN, SLOT_FILE_PATTERN, configured_directory
from kvferry.bench.doctor.base import (
    CheckResult,
    DoctorContext,
    Status,
    check,
    size,
    unreadable,
)
from kvferry.bench.doctor.probes import (
    connect_time,
    redis_round_trip,
    suggest_grace_period_ns,
    torch_installed,
)
from kvferry.errors import MissingDependency

__all__ = [
    "DISK_FAIL_USED",
    "DISK_WARN_USED",
    "H2D_MIN_GBPS",
    "REDIS_P99_MAX_US",
    "disk_directory",
    "redact",
]

DISK_WARN_USED = 0.8
"""Used fraction of the disk tier's filesystem past which an SSD's writes slow down (less
spare room for its flash translation layer to erase ahead) and one more tier fills it."""
DISK_FAIL_USED = 0.9
REDIS_P99_MAX_US = 1000.0
"""A Redis PING p99 above 1 ms: every batch of redis-tier lookups costs at least that."""
H2D_MIN_GBPS = 20.0
"""Pinned host-to-device copies slower than this run below a PCIe Gen4 x16 link (about 25 GB/s
in practice; Gen5 about 50): unpinned memory or a remote NUMA node."""


def disk_directory(ctx: DoctorContext) -> tuple[str, str]:
    """(the disk tier's directory, the nearest existing directory at or above it): the probes
    run in the second, so the doctor never creates a directory."""
    directory = configured_directory(ctx.config.disk)
    here = Path(directory)
    while not here.is_dir() and here != here.parent:
        here = here.parent
    return directory, str(here)


def _disk_in_use(ctx: DoctorContext) -> bool:
    return "disk" in ctx.config.store.tiers


def _not_configured(result: CheckResult) -> CheckResult:
    """A disk measurement taken without a disk tier: shown, but SKIP."""
    result.status = "SKIP"
    result.value = f"{result.value} (no disk tier)"
    result.fix = ""
    return result


WHY_DIRECT = (
    "Without O_DIRECT the disk tier goes through the page cache: its blocks are held twice "
    "(pool and page cache) and writeback stalls show up as tail latency."
)


@check("direct_io")
def direct_io(ctx: DoctorContext) -> CheckResult:
    """The disk tier's own O_DIRECT probe, in its directory or the nearest existing parent."""
    directory, probe_in = disk_directory(ctx)
    threshold = f"an aligned {size(ALIGN)} O_DIRECT write and read work"
    if not ctx.config.disk.direct_io:
        return CheckResult("direct_io", "SKIP", f"disk.direct_io is off ({directory})",
                           threshold, WHY_DIRECT, "")  # fmt: skip
    reason = ctx.view.direct_io(probe_in)
    where = directory if probe_in == directory else f"{probe_in} (for {directory})"
    if reason is None:
        result = CheckResult("direct_io", "OK", f"works in {where}", threshold, WHY_DIRECT, "")
    else:
        result = CheckResult(
            "direct_io", "WARN", f"{reason} in {where}", threshold, WHY_DIRECT,
            "set disk.path on ext4 or xfs (tmpfs refuses O_DIRECT before Linux 6.6)",
        )  # fmt: skip
    return result if _disk_in_use(ctx) else _not_configured(result)


WHY_BLOCK = (
    f"The disk tier aligns every offset, length and buffer to {ALIGN} bytes for O_DIRECT: a "
    "device whose logical block is larger refuses those writes, and a rotating disk cannot "
    "serve its random slot reads."
)


def block_queue(ctx: DoctorContext, path: str) -> tuple[Path, str] | None:
    """The ``queue`` directory of the block device behind ``path`` and its ``MAJ:MIN``; None
    when no block device backs it (tmpfs, overlay) or it cannot be stat'ed."""
    try:
        dev = ctx.view.stat(path).st_dev
    except OSError:
        return None
    major, minor = os.major(dev), os.minor(dev)
    if major == 0:
        return None
    base = ctx.view.sys / "dev/block" / f"{major}:{minor}"
    for queue in (base / "queue", base / ".." / "queue"):  # a partition's queue is its disk's
        if (queue / "logical_block_size").exists():
            return queue, f"{major}:{minor}"
    return None


@check("disk_block_size")
def disk_block_size(ctx: DoctorContext) -> CheckResult:
    """The logical block size and rotational flag of the device behind the tier's directory."""
    _, probe_in = disk_directory(ctx)
    found = block_queue(ctx, probe_in)
    threshold = f"logical block <= {ALIGN} B; not rotational"
    if found is None:
        result = CheckResult(
            "disk_block_size", "SKIP", f"no block device found behind {probe_in}", threshold,
            WHY_BLOCK, "",
        )  # fmt: skip
        return result if _disk_in_use(ctx) else _not_configured(result)
    queue, device = found
    logical = ctx.view.read(queue / "logical_block_size")
    physical = ctx.view.read(queue / "physical_block_size")
    rotational = ctx.view.read(queue / "rotational")
    try:
        lbs = int(logical or "")
    except ValueError:
        return unreadable("disk_block_size", str(queue / "logical_block_size"), WHY_BLOCK)
    kind = {"0": "SSD", "1": "rotational"}.get(rotational or "", "rotational ?")
    value = f"{device}: logical {lbs} B, physical {physical or '?'} B, {kind}"
    status: Status = "OK"
    fix = ""
    if lbs > ALIGN:
        status, fix = "FAIL", f"disk.direct_io=false, or put disk.path on a {ALIGN} B device"
    elif rotational == "1":
        status, fix = "WARN", "put disk.path on an SSD (a VM's virtual disk may say rotational "
        fix += "whatever backs it: fio randread tells)"
    result = CheckResult("disk_block_size", status, value, threshold, WHY_BLOCK, fix)
    return result if _disk_in_use(ctx) else _not_configured(result)


WHY_SPACE = (
    "The disk tier preallocates disk.capacity when it opens, and an SSD past ~80% full writes "
    "slower; a full filesystem makes every demotion to disk fail."
)


@check("disk_space")
def disk_space(ctx: DoctorContext) -> CheckResult:
    """Used share and free bytes of the tier's filesystem against disk.capacity."""
    directory, probe_in = disk_directory(ctx)
    try:
        st = ctx.view.statvfs(probe_in)
    except OSError:
        return unreadable("disk_space", probe_in, WHY_SPACE)
    total = st.f_blocks * st.f_frsize
    free = st.f_bavail * st.f_frsize
    used = 1 - free / total if total else 1.0
    held = 0  # a named directory's slot files of an earlier run are reused, not re-allocated
    if ctx.config.disk.path and os.path.isdir(directory):
        for name in os.listdir(directory):
            if SLOT_FILE_PATTERN.fullmatch(name):
                held += os.path.getsize(os.path.join(directory, name))
    need = max(0, ctx.config.disk.capacity - held)
    value = f"{used:.0%} used, {size(free)} free of {size(total)}"
    threshold = (
        f"< {DISK_WARN_USED:.0%} used (FAIL > {DISK_FAIL_USED:.0%}); free >= {size(need)} "
        "(disk.capacity)"
    )
    status: Status = "OK"
    if used > DISK_FAIL_USED or free < need:
        status = "FAIL"
    elif used > DISK_WARN_USED:
        status = "WARN"
    fix = "" if status == "OK" else (
        "free space there, set disk.path on a larger filesystem, or lower disk.capacity"
    )  # fmt: skip
    result = CheckResult("disk_space", status, value, threshold, WHY_SPACE, fix)
    return result if _disk_in_use(ctx) else _not_configured(result)


WHY_URING = (
    "kvferry's disk tier runs on disk.io_threads threads and does not need io_uring, but the "
    "SSD paths of engines sharing this host (FlexKV's SSD cache, Mooncake's file offload) use "
    "it for deep queues at little CPU."
)


@check("io_uring")
def io_uring(ctx: DoctorContext) -> CheckResult:
    """kernel.io_uring_disabled and a real io_uring_setup by this process."""
    disabled = ctx.view.proc_int("sys/kernel/io_uring_disabled")
    reason = ctx.view.io_uring()
    setting = "" if disabled is None else f"io_uring_disabled {disabled}; "
    threshold = "io_uring_disabled 0; io_uring_setup works"
    if reason is None and not disabled:
        return CheckResult("io_uring", "OK", f"{setting}setup works", threshold, WHY_URING, "")
    value = f"{setting}{reason or 'setup works (as this user)'}"
    return CheckResult(
        "io_uring", "WARN", value, threshold, WHY_URING,
        "sysctl -w kernel.io_uring_disabled=0 (root); in a container, a seccomp profile that "
        "allows io_uring_setup",
    )  # fmt: skip


# -- services ------------------------------------------------------------------------------
WHY_REDIS = (
    "Every batch of redis-tier lookups and loads (and every metadata or membership lookup in "
    "Redis) costs at least one round trip, added to the TTFT of each request that touches it."
)


def redact(url: str) -> str:
    """``url`` without its password (``redis://:secret@h/0`` -> ``redis://:***@h/0``)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if parts.password is None:
        return url
    netloc = re.sub(r":[^:@]*@", ":***@", parts.netloc, count=1)
    return urlunsplit(parts._replace(netloc=netloc))


@check("redis")
def redis(ctx: DoctorContext) -> CheckResult:
    """PING round trips to every configured Redis URL (tier, metadata, membership)."""
    cfg = ctx.config
    urls: dict[str, str] = {}
    if "redis" in cfg.store.tiers:
        urls.setdefault(cfg.redis.url, "redis.url")
    if cfg.metadata.backend == "redis":
        urls.setdefault(cfg.metadata.url, "metadata.url")
    if cfg.server.membership_url:
        urls.setdefault(cfg.server.membership_url, "server.membership_url")
    threshold = f"reachable; PING p99 < {REDIS_P99_MAX_US / 1000:g} ms"
    if not urls:
        return CheckResult(
            "redis", "SKIP", "no redis tier, metadata or membership",
            threshold, WHY_REDIS, "",
        )  # fmt: skip
    parts, status, fixes = [], "OK", []
    for url, key in urls.items():
        try:
            lat = redis_round_trip(url)
        except MissingDependency as e:
            parts.append(f"{key}: {e}")
            status = "FAIL"
            fixes.append("pip install 'kvferry[redis]'")
            continue
        except OSError as e:
            parts.append(f"{key} {redact(url)}: unreachable ({e})")
            status = "FAIL"
            fixes.append(f"start Redis at {redact(url)} or fix {key}")
            continue
        ctx.measurements[f"redis_rtt_p50_us[{key}]"] = lat.p50_us
        ctx.measurements[f"redis_rtt_p99_us[{key}]"] = lat.p99_us
        parts.append(f"{key} {redact(url)}: PING p50 {lat.p50_us:.0f} us, p99 {lat.p99_us:.0f} us")
        if lat.p99_us > REDIS_P99_MAX_US:
            status = "FAIL" if status == "FAIL" else "WARN"
            fixes.append(
                "run Redis near kvferry (same rack or host); THP madvise and no swap there"
            )
    final: Status = "FAIL" if status == "FAIL" else "WARN" if status == "WARN" else "OK"
    return CheckResult("redis", final, "; ".join(parts), threshold, WHY_REDIS, "; ".join(fixes))


WHY_MOONCAKE = (
    "A mooncake tier asks Mooncake's master where every block lives: without it each put and "
    "get fails after mooncake.rpc_timeout."
)


@check("mooncake_master")
def mooncake_master(ctx: DoctorContext) -> CheckResult:
    """A TCP connect to mooncake.master_address when a mooncake tier is configured."""
    cfg = ctx.config.mooncake
    threshold = "master_address accepts TCP"
    if "mooncake" not in ctx.config.store.tiers:
        return CheckResult("mooncake_master", "SKIP", "no mooncake tier in store.tiers",
                           threshold, WHY_MOONCAKE, "")  # fmt: skip
    try:
        us = connect_time(cfg.master_address)
    except OSError as e:
        return CheckResult(
            "mooncake_master", "FAIL", f"{cfg.master_address}: unreachable ({e})", threshold,
            WHY_MOONCAKE,
            f"start mooncake_master (port {cfg.master_address.rpartition(':')[2]}) or fix "
            "mooncake.master_address",
        )  # fmt: skip
    return CheckResult("mooncake_master", "OK", f"{cfg.master_address}: connect {us:.0f} us",
                       threshold, WHY_MOONCAKE, "")  # fmt: skip


# -- devices -------------------------------------------------------------------------------
WHY_GPU = (
    "Loading a hit from the cpu tier into the GPU is one host-to-device copy per block: below "
    "PCIe speed the pool is pageable (cpu.pinned off) or on the wrong NUMA node, and every hit "
    "costs more TTFT."
)


def gpu_present(ctx: DoctorContext) -> bool:
    """Whether an NVIDIA driver or device node is here (so importing torch is worth it)."""
    if (ctx.view.proc / "driver/nvidia/version").exists():
        return True
    return any(re.fullmatch(r"nvidia\d+", n) for n in ctx.view.listdir(ctx.view.dev))


@check("gpu")
def gpu(ctx: DoctorContext) -> CheckResult:
    """Pinned host-to-device copy speed of GPU 0, when an NVIDIA driver or device is here."""
    threshold = f"pinned H2D >= {H2D_MIN_GBPS:g} GB/s"
    if not gpu_present(ctx):
        return CheckResult("gpu", "SKIP", "no NVIDIA GPU (/proc/driver/nvidia)",
                           threshold, WHY_GPU, "")  # fmt: skip
    if not torch_installed():
        return CheckResult(
            "gpu", "WARN", "GPU present, torch not installed", threshold, WHY_GPU,
            "pip install torch (a CUDA build) for cpu.pinned and GPU loads",
        )  # fmt: skip
    speed = ctx.view.h2d()
    if speed is None:
        return CheckResult(
            "gpu", "WARN", "GPU present, but torch sees no CUDA device", threshold, WHY_GPU,
            "install a CUDA build of torch that matches the driver (nvidia-smi shows it)",
        )  # fmt: skip
    ctx.measurements["h2d_pinned_gbps"] = speed.gbps
    value = f"{speed.device}, CUDA {speed.cuda}: pinned H2D {speed.gbps:.1f} GB/s"
    if speed.gbps >= H2D_MIN_GBPS:
        return CheckResult("gpu", "OK", value, threshold, WHY_GPU, "")
    return CheckResult(
        "gpu", "WARN", value, threshold, WHY_GPU,
        "run on the GPU's NUMA node (numactl --cpunodebind=N --membind=N); check the PCIe link "
        "(nvidia-smi -q | grep -A2 'Link Width')",
    )  # fmt: skip


WHY_RDMA = (
    "Mooncake's rdma protocol (mooncake.protocol=rdma) moves blocks through these ports: one "
    "that is not ACTIVE (cable, subnet manager, link layer) fails its transfers."
)


@check("rdma")
def rdma(ctx: DoctorContext) -> CheckResult:
    """The state of every RDMA port, against mooncake.device_name when rdma is configured."""
    root = ctx.view.sys / "class/infiniband"
    devices = ctx.view.listdir(root)
    wanted = "mooncake" in ctx.config.store.tiers and ctx.config.mooncake.protocol == "rdma"
    threshold = "a port ACTIVE" + (" on mooncake.device_name" if wanted else "")
    fix = "ibv_devinfo / ibstat; start the subnet manager (opensm) for InfiniBand; set "
    fix += "mooncake.device_name to a device with an ACTIVE port"
    if not devices:
        status: Status = "FAIL" if wanted else "SKIP"
        return CheckResult("rdma", status, "no RDMA device (/sys/class/infiniband)", threshold,
                           WHY_RDMA, fix if wanted else "")  # fmt: skip
    ports, active = [], []
    names = [d.strip() for d in ctx.config.mooncake.device_name.split(",") if d.strip()]
    for dev in devices:
        for port in ctx.view.listdir(root / dev / "ports"):
            base = root / dev / "ports" / port
            state = (ctx.view.read(base / "state") or "?").split(":")[-1].strip()
            layer = ctx.view.read(base / "link_layer") or "?"
            rate = ctx.view.read(base / "rate") or "?"
            ports.append(f"{dev} port {port} {state} ({layer}, {rate})")
            if state == "ACTIVE" and (not names or dev in names):
                active.append(dev)
    value = "; ".join(ports) or f"{', '.join(devices)}: no ports"
    if active:
        return CheckResult("rdma", "OK", value, threshold, WHY_RDMA, "")
    return CheckResult("rdma", "FAIL" if wanted else "WARN", value, threshold, WHY_RDMA, fix)


# -- the wake-up probe and the config --------------------------------------------------------
WHY_WAKEUP = (
    "A kvferry waiter busy-polls for transfer.grace_period_ns before it sleeps, and sleeping "
    "costs this wake-up: spinning about as long as one wake-up catches fast replies and never "
    "costs more than twice the best choice."
)


@check("wakeup_latency")
def wakeup_latency(ctx: DoctorContext) -> CheckResult:
    """A sleeping thread's wake-up cost and the grace period it suggests."""
    lat = ctx.view.wakeup(ctx.wakeup_samples)
    suggested = suggest_grace_period_ns(lat)
    configured = ctx.config.transfer.grace_period_ns
    ctx.measurements.update(
        wakeup_p50_us=lat.p50_us,
        wakeup_p99_us=lat.p99_us,
        suggested_grace_period_ns=float(suggested),
    )
    value = (
        f"p50 {lat.p50_us:.0f} us, p99 {lat.p99_us:.0f} us ({lat.samples}x): grace {suggested} ns"
    )
    threshold = f"transfer.grace_period_ns ({configured}) in 0.5x-2x of that"
    if suggested / 2 <= configured <= suggested * 2:
        return CheckResult("wakeup_latency", "OK", value, threshold, WHY_WAKEUP, "")
    return CheckResult(
        "wakeup_latency", "WARN", value, threshold, WHY_WAKEUP,
        f"--set transfer.grace_period_ns={suggested}",
    )  # fmt: skip


WHY_CONFIG = (
    "Peers resolve settings in different orders; kvferry's is flag > KVFERRY_* env > file > "
    "preset > default, and the report keeps every effective value with where it came from "
    "(kvferry config show prints them)."
)


@check("config")
def config(ctx: DoctorContext) -> CheckResult:
    """How many effective values came from each source (default, preset, file, env, flag)."""
    keys = sorted({*ctx.sources}) if ctx.sources else []
    counts: dict[str, int] = {}
    for key in keys:
        source = ctx.sources[key]
        origin = source if source.startswith(("file:", "preset:")) else source.split(":")[0]
        counts[origin] = counts.get(origin, 0) + 1
    if not keys:
        value = "defaults (no sources recorded)"
    else:
        told = ", ".join(f"{n} {origin}" for origin, n in sorted(counts.items()))
        changed = [k for k in keys if ctx.sources[k] != "default"]
        value = f"{len(keys)} keys: {told}" + (
            f" (set: {', '.join(changed[:6])}{', ...' if len(changed) > 6 else ''})"
            if changed else ""
        )  # fmt: skip
    return CheckResult(
        "config", "OK", value, "every value valid",
        WHY_CONFIG, "",
    )  # fmt: skip
