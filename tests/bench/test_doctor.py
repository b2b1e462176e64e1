"""``kvferry doctor``: every check against fake /proc and /sys trees built here (OK, WARN or
FAIL, and SKIP when its files are absent), then the real machine (every check gives a status,
none raises), the real probes (O_DIRECT in tmp_path, a sleeping thread's wake-up, a real
redis-server, a TCP listener standing in for a Mooncake master), the CLI's JSON shape and exit
statuses, and bad flags as one error line. No timing is asserted."""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from kvferry.bench.doctor import (
    CHECKS,
    STATUSES,
    CheckResult,
    DoctorContext,
    DoctorOptions,
    DoctorReport,
    SystemView,
    run,
)
from kvferry.bench.doctor.probes import (
    GRACE_MAX_NS,
    H2dSpeed,
    Latency,
    suggest_grace_period_ns,
    wakeup_latency,
)
from kvferry.bench.doctor.report import DoctorOptions as _Options
from kvferry.bench.result import load_result
from kvferry.cli.main import main
from kvferry.config.loader import load_config
from kvferry.errors import ConfigError
from kvferry.testing.redis_server import free_port

GiB = 1 << 30
INF = resource.RLIM_INFINITY

HEALTHY: dict[str, str] = {
    "proc/meminfo": "MemTotal: 32000000 kB\nHugePages_Total:       0\nHugePages_Free:        0\n"
    "Hugepagesize:       2048 kB\n",
    "proc/sys/kernel/numa_balancing": "0",
    "proc/sys/kernel/io_uring_disabled": "0",
    "proc/sys/vm/max_map_count": "262144",
    "proc/sys/net/core/rmem_max": "16777216",
    "proc/sys/net/core/wmem_max": "16777216",
    "proc/sys/net/core/somaxconn": "4096",
    "proc/sys/net/ipv4/tcp_rmem": "4096 131072 16777216",
    "proc/sys/net/ipv4/tcp_wmem": "4096 16384 16777216",
    "proc/sys/net/ipv4/ip_local_port_range": "10240\t65535",
    "proc/net/tcp": "  sl  local_address rem_address   st tx_queue\n"
    "   0: 0100007F:3C8C 00000000:0000 0A 00000000:00000000\n"
    "   1: 0100007F:3C8C 0100007F:D1A2 06 00000000:00000000\n",
    "sys/kernel/mm/transparent_hugepage/enabled": "always [madvise] never",
    "sys/devices/system/node/node0/cpulist": "0-3",
    "sys/class/net/lo/mtu": "65536",
    "sys/class/net/lo/operstate": "unknown",
    "sys/class/net/eth0/mtu": "9000",
    "sys/class/net/eth0/operstate": "up",
    "sys/dev/block/259:0/queue/logical_block_size": "512",
    "sys/dev/block/259:0/queue/physical_block_size": "4096",
    "sys/dev/block/259:0/queue/rotational": "0",
}
"""A healthy host: every check that applies to the default config says OK."""

DEVICE = os.makedev(259, 0)


def statvfs(total: int, free: int) -> os.statvfs_result:
    block = 4096
    return os.statvfs_result(
        (block, block, total // block, free // block, free // block, 0, 0, 0, 0, 255)
    )


class FakeStat:
    def __init__(self, dev: int) -> None:
        self.st_dev = dev


class Host:
    """A fake machine under ``root``: files, limits, filesystems and probes, all changeable."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files = dict(HEALTHY)
        self.limits = {resource.RLIMIT_MEMLOCK: (INF, INF), resource.RLIMIT_NOFILE: (65536, 65536)}
        self.fs = {"shm": statvfs(16 * GiB, 16 * GiB), "disk": statvfs(1000 * GiB, 500 * GiB)}
        self.device: int | None = DEVICE
        self.affinity = {0, 1, 2, 3}
        self.io_uring: str | None = None
        self.direct: str | None = None
        self.wakeup = Latency(300, 45.0, 80.0, 120.0)
        self.h2d: H2dSpeed | None = H2dSpeed("Fake GPU", "12.4", 256 << 20, 24.0)
        self.disk = root / "disk"
        self.disk.mkdir(exist_ok=True)

    def view(self) -> SystemView:
        for rel, text in self.files.items():
            path = self.root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        (self.root / "shm").mkdir(exist_ok=True)
        (self.root / "dev").mkdir(exist_ok=True)

        def vfs(path: str) -> os.statvfs_result:
            key = "shm" if path == str(self.root / "shm") else "disk"
            if key not in self.fs:
                raise FileNotFoundError(path)
            return self.fs[key]

        def stat(path: str) -> Any:
            if self.device is None:
                raise FileNotFoundError(path)
            return FakeStat(self.device)

        return SystemView(
            proc=self.root / "proc",
            sys=self.root / "sys",
            dev=self.root / "dev",
            dev_shm=self.root / "shm",
            getrlimit=lambda r: self.limits[r],
            statvfs=vfs,
            stat=stat,
            affinity=lambda: set(self.affinity),
            io_uring=lambda: self.io_uring,
            direct_io=lambda d: self.direct,
            wakeup=lambda n: self.wakeup,
            h2d=lambda: self.h2d,
        )

    def check(self, name: str, **flags: object) -> CheckResult:
        loaded = load_config(flags={"disk.path": str(self.disk), **flags}, environ={})
        ctx = DoctorContext(self.view(), loaded.config, dict(loaded.sources))
        result = CHECKS[name](ctx)
        assert result.name == name and result.status in STATUSES
        assert result.why and result.threshold, result
        if result.status in ("WARN", "FAIL"):
            assert result.fix, f"{name} {result.status} without a fix"
        return result


@pytest.fixture
def host(tmp_path: Path) -> Host:
    return Host(tmp_path)


def test_the_registry_holds_the_issue_checklist() -> None:
    assert list(CHECKS) == [
        "memlock", "hugepages", "thp", "numa", "numa_balancing", "nofile", "max_map_count",
        "dev_shm", "tcp_buffers", "port_range", "somaxconn", "mtu", "direct_io",
        "disk_block_size", "disk_space", "io_uring", "redis", "mooncake_master", "gpu", "rdma",
        "wakeup_latency", "config",
    ]  # fmt: skip


def test_a_healthy_host_is_ok_where_a_check_applies(host: Host) -> None:
    with_disk = {"store.tiers": "cpu,disk"}
    statuses = {name: host.check(name, **with_disk).status for name in CHECKS}
    skipped = {n for n, s in statuses.items() if s == "SKIP"}
    # not configured (no pinned memory, no redis, no mooncake), or not present (no GPU, no RDMA)
    assert skipped == {"memlock", "redis", "mooncake_master", "gpu", "rdma"}, statuses
    assert all(s == "OK" for n, s in statuses.items() if n not in skipped), statuses


def test_every_check_skips_or_stays_whole_on_an_empty_tree(tmp_path: Path) -> None:
    host = Host(tmp_path)
    host.files = {}
    host.fs = {}
    host.device = None
    host.h2d = None
    results = {name: host.check(name, **{"store.tiers": "cpu,disk"}) for name in CHECKS}
    reads = {n for n, r in results.items() if r.value.startswith("could not read")}
    assert reads == {
        "hugepages", "thp", "numa", "numa_balancing", "max_map_count", "dev_shm", "tcp_buffers",
        "port_range", "somaxconn", "mtu", "disk_space",
    }  # fmt: skip
    assert all(results[n].status == "SKIP" for n in reads)
    assert str(tmp_path / "proc" / "meminfo") in results["hugepages"].value
    assert results["disk_block_size"].status == "SKIP"  # no block device behind the directory
    # the ones that need no file still judge: limits, probes, config
    assert results["nofile"].status == "OK" and results["io_uring"].status == "OK"


Mutation = Callable[[Host], None]


def _set(rel: str, text: str) -> Mutation:
    def apply(h: Host) -> None:
        h.files[rel] = text

    return apply


def _limit(which: int, soft: int, hard: int | None = None) -> Mutation:
    def apply(h: Host) -> None:
        h.limits[which] = (soft, soft if hard is None else hard)

    return apply


def _attr(name: str, value: object) -> Mutation:
    def apply(h: Host) -> None:
        setattr(h, name, value)

    return apply


def _fs(key: str, total: int, free: int) -> Mutation:
    def apply(h: Host) -> None:
        h.fs[key] = statvfs(total, free)

    return apply


def _two_nodes(h: Host) -> None:
    h.files["sys/devices/system/node/node0/cpulist"] = "0-1"
    h.files["sys/devices/system/node/node1/cpulist"] = "2-3"


def _infiniband(state: str) -> Mutation:
    def apply(h: Host) -> None:
        base = "sys/class/infiniband/mlx5_0/ports/1"
        h.files[f"{base}/state"] = state
        h.files[f"{base}/link_layer"] = "InfiniBand"
        h.files[f"{base}/rate"] = "200 Gb/sec (4X HDR)"

    return apply


def _gpu(h: Host) -> None:
    h.files["proc/driver/nvidia/version"] = "NVRM version: 550.54"


MEMLOCK = resource.RLIMIT_MEMLOCK
RDMA: dict[str, object] = {"store.tiers": "cpu,mooncake", "mooncake.protocol": "rdma"}
DISK: dict[str, object] = {"store.tiers": "cpu,disk"}

CASES: list[tuple[str, list[Mutation], dict[str, object], str, str]] = [
    # check, changes to the healthy host, config flags, expected status, text in the value
    ("memlock", [_limit(MEMLOCK, 64 << 10)], {"cpu.pinned": True}, "WARN", "64 KiB"),
    ("memlock", [_limit(MEMLOCK, 64 << 10)], RDMA, "FAIL", "64 KiB"),
    ("memlock", [_limit(MEMLOCK, 2 * GiB)], {"cpu.pinned": True}, "OK", "2 GiB"),
    ("hugepages", [_set("proc/meminfo", "HugePages_Total: 512\nHugePages_Free: 512\n"
                        "Hugepagesize: 2048 kB\n")], {}, "WARN", "512 x 2 MiB"),
    ("hugepages", [_set("proc/meminfo", "HugePages_Total: 512\nHugePages_Free: 12\n"
                        "Hugepagesize: 2048 kB\n")], {}, "OK", "12 free"),
    ("thp", [_set("sys/kernel/mm/transparent_hugepage/enabled", "always madvise [never]")],
     {"cpu.use_hugepages": True}, "WARN", "never"),
    ("thp", [_set("sys/kernel/mm/transparent_hugepage/enabled", "[always] madvise never")],
     {"store.tiers": "cpu,redis"}, "WARN", "always"),
    ("thp", [_set("sys/kernel/mm/transparent_hugepage/enabled", "[always] madvise never")],
     {}, "OK", "always"),
    ("numa", [_two_nodes], {}, "WARN", "2 nodes"),
    ("numa", [_two_nodes, _attr("affinity", {2, 3})], {}, "OK", "node(s) [1]"),
    ("numa_balancing", [_two_nodes, _set("proc/sys/kernel/numa_balancing", "1")], {}, "WARN",
     "2 nodes"),
    ("numa_balancing", [_set("proc/sys/kernel/numa_balancing", "1")], {}, "OK", "no effect"),
    ("nofile", [_limit(resource.RLIMIT_NOFILE, 1024, 4096)], {}, "FAIL", "1024"),
    ("nofile", [_limit(resource.RLIMIT_NOFILE, 20000)], {}, "WARN", "20000"),
    ("max_map_count", [_set("proc/sys/vm/max_map_count", "1000")], {}, "WARN", "1000"),
    ("dev_shm", [_fs("shm", 64 << 20, 64 << 20)], {}, "WARN", "64 MiB"),
    ("dev_shm", [_fs("shm", 16 * GiB, GiB)], {}, "WARN", "94% used"),
    ("tcp_buffers", [_set("proc/sys/net/core/rmem_max", "212992")], {}, "WARN", "208 KiB"),
    ("tcp_buffers", [_set("proc/sys/net/ipv4/tcp_wmem", "4096 16384 1048576")], {}, "WARN",
     "tcp_wmem 1 MiB"),
    ("port_range", [_set("proc/sys/net/ipv4/ip_local_port_range", "60000 60500")], {}, "WARN",
     "501 ports"),
    ("port_range", [_set("proc/net/tcp", "hdr\n" + "0: a b 06 x\n" * 30000)], {}, "WARN",
     "30000 in TIME_WAIT"),
    ("somaxconn", [_set("proc/sys/net/core/somaxconn", "128")], {}, "WARN", "128"),
    ("somaxconn", [_set("proc/sys/net/core/somaxconn", "600")],
     {"listen.max_connections": 100, "listen.max_pending": 10}, "OK", "600"),
    ("mtu", [_set("sys/class/net/lo/mtu", "1500")], {}, "WARN", "lo 1500"),
    ("mtu", [_set("sys/class/net/eth0/mtu", "1500")], {"listen.bind_address": "0.0.0.0"},
     "WARN", "eth0 1500"),
    ("mtu", [], {"listen.bind_address": "0.0.0.0"}, "OK", "eth0 9000"),
    ("direct_io", [_attr("direct", "open with O_DIRECT failed: EINVAL")], DISK, "WARN", "EINVAL"),
    ("direct_io", [_attr("direct", "open with O_DIRECT failed: EINVAL")], {}, "SKIP",
     "no disk tier"),
    ("direct_io", [], {**DISK, "disk.direct_io": False}, "SKIP", "off"),
    ("disk_block_size", [_set("sys/dev/block/259:0/queue/logical_block_size", "8192")], DISK,
     "FAIL", "logical 8192 B"),
    ("disk_block_size", [_set("sys/dev/block/259:0/queue/rotational", "1")], DISK, "WARN",
     "rotational"),
    ("disk_space", [_fs("disk", 1000 * GiB, 150 * GiB)], DISK, "WARN", "85% used"),
    ("disk_space", [_fs("disk", 1000 * GiB, 50 * GiB)], DISK, "FAIL", "95% used"),
    ("disk_space", [_fs("disk", 2 * GiB, GiB)], DISK, "FAIL", "1 GiB free"),
    ("disk_space", [_fs("disk", 2 * GiB, GiB)], {**DISK, "disk.capacity": "512MiB"}, "OK",
     "50% used"),
    ("io_uring", [_set("proc/sys/kernel/io_uring_disabled", "2"),
                  _attr("io_uring", "io_uring_setup failed: EPERM")], {}, "WARN", "EPERM"),
    ("io_uring", [_set("proc/sys/kernel/io_uring_disabled", "1")], {}, "WARN", "disabled 1"),
    ("gpu", [_gpu], {}, "OK", "24.0 GB/s"),
    ("gpu", [_gpu, _attr("h2d", H2dSpeed("Fake GPU", "12.4", 256 << 20, 6.5))], {}, "WARN",
     "6.5 GB/s"),
    ("gpu", [_gpu, _attr("h2d", None)], {}, "WARN", "no CUDA device"),
    ("rdma", [_infiniband("4: ACTIVE")], {}, "OK", "mlx5_0 port 1 ACTIVE"),
    ("rdma", [_infiniband("1: DOWN")], {}, "WARN", "DOWN"),
    ("rdma", [_infiniband("1: DOWN")], RDMA, "FAIL", "DOWN"),
    ("rdma", [], RDMA, "FAIL", "no RDMA device"),
    ("wakeup_latency", [], {}, "OK", "grace 50000 ns"),
    ("wakeup_latency", [_attr("wakeup", Latency(300, 8.0, 20.0, 30.0))], {}, "WARN",
     "grace 10000 ns"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "changes", "flags", "status", "text"),
    CASES,
    ids=[f"{c[0]}-{c[3]}-{i}" for i, c in enumerate(CASES)],
)
def test_each_check_judges_its_fake_tree(
    host: Host,
    name: str,
    changes: list[Mutation],
    flags: dict[str, object],
    status: str,
    text: str,
) -> None:
    if name == "gpu":
        pytest.importorskip("torch")  # without torch the check says so instead of measuring
    for change in changes:
        change(host)
    result = host.check(name, **flags)
    assert (result.status, text in result.value) == (status, True), result


def test_a_partition_reads_its_disks_queue(host: Host) -> None:
    # /sys/dev/block/MAJ:MIN of a partition links into its disk's directory, whose queue/ holds
    # the sizes: the check looks one level up
    host.device = os.makedev(259, 1)
    disk = host.root / "sys/block/nvme0n1"
    (disk / "queue").mkdir(parents=True)
    (disk / "queue/logical_block_size").write_text("4096")
    (disk / "nvme0n1p1").mkdir()
    link = host.root / "sys/dev/block/259:1"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(disk / "nvme0n1p1")
    result = host.check("disk_block_size", **DISK)
    assert result.status == "OK" and "logical 4096 B" in result.value, result


def test_the_wakeup_check_suggests_a_grace_period_from_the_median(host: Host) -> None:
    host.wakeup = Latency(300, 62.0, 150.0, 400.0)
    loaded = load_config(flags={"transfer.grace_period_ns": 10_000}, environ={})
    ctx = DoctorContext(host.view(), loaded.config, loaded.sources)
    result = CHECKS["wakeup_latency"](ctx)
    assert result.status == "WARN" and result.fix == "--set transfer.grace_period_ns=70000"
    assert ctx.measurements == {
        "wakeup_p50_us": 62.0,
        "wakeup_p99_us": 150.0,
        "suggested_grace_period_ns": 70000.0,
    }


@pytest.mark.parametrize(
    ("p50_us", "grace"), [(0.5, 10_000), (10.0, 10_000), (10.1, 20_000), (62.0, 70_000),
                          (5000.0, GRACE_MAX_NS)],
)  # fmt: skip
def test_suggested_grace_period_rounds_the_median_up_to_10us(p50_us: float, grace: int) -> None:
    assert suggest_grace_period_ns(Latency(10, p50_us, p50_us, p50_us)) == grace


def test_config_check_counts_every_source(host: Host, tmp_path: Path) -> None:
    file = tmp_path / "kv.yaml"
    file.write_text("transfer:\n  workers: 2\n")
    loaded = load_config(
        config_file=str(file),
        flags={"cpu.capacity": "64MiB"},
        environ={"KVFERRY_STORE_TIERS": "cpu"},
    )
    ctx = DoctorContext(host.view(), loaded.config, loaded.sources)
    result = CHECKS["config"](ctx)
    assert result.status == "OK"
    assert f"1 file:{file}" in result.value and "1 flag" in result.value and "1 env" in result.value
    assert "cpu.capacity" in result.value and "transfer.workers" in result.value


def test_a_check_that_raises_is_its_own_fail_row(host: Host) -> None:
    _two_nodes(host)
    view = host.view()

    def broken() -> set[int]:
        raise RuntimeError("affinity unavailable")

    view.affinity = broken
    report = run(DoctorOptions(only=("numa", "somaxconn")), view=view)
    numa, somaxconn = report.checks
    assert numa.status == "FAIL" and "RuntimeError: affinity unavailable" in numa.value
    assert somaxconn.status == "OK"  # the others still ran


# -- the real machine and the real probes ----------------------------------------------------


def test_every_check_on_this_machine_gives_a_status(tmp_path: Path) -> None:
    told: list[tuple[str, int, int]] = []
    loaded = load_config(
        flags={"store.tiers": "cpu,disk", "disk.path": str(tmp_path / "tier")}, environ={}
    )
    report = run(
        DoctorOptions(wakeup_samples=50),
        lambda name, done, total: told.append((name, done, total)),
        config=loaded.config,
        sources=loaded.sources,
    )
    assert [c.name for c in report.checks] == list(CHECKS)
    assert [t[0] for t in told] == list(CHECKS) and told[-1][1:] == (len(CHECKS) - 1, len(CHECKS))
    for c in report.checks:
        assert c.status in STATUSES and "the check raised" not in c.value, c
        assert c.value and c.why
    assert report.measurements["wakeup_p50_us"] > 0
    assert report.config is not None and report.config.sources["disk.path"] == "flag"
    assert sum(report.counts().values()) == len(CHECKS)


def test_wakeup_probe_measures_a_sleeping_thread() -> None:
    lat = wakeup_latency(samples=40, gap_s=0.0002)
    assert lat.samples == 40
    assert 0 < lat.p50_us <= lat.p99_us <= lat.max_us
    with pytest.raises(ConfigError, match="at least 10"):
        wakeup_latency(samples=3)


def test_direct_io_probe_runs_in_the_disk_directory(tmp_path: Path) -> None:
    from kvferry.backends.disk_format import probe_direct_io

    expected = probe_direct_io(str(tmp_path))  # tmpfs before 6.6 refuses O_DIRECT
    loaded = load_config(
        flags={"store.tiers": "cpu,disk", "disk.path": str(tmp_path / "not-yet")}, environ={}
    )
    report = run(DoctorOptions(only=("direct_io", "disk_space")), config=loaded.config)
    direct, space = report.checks
    assert direct.status == ("OK" if expected is None else "WARN"), direct
    assert f"in {tmp_path} (for {tmp_path / 'not-yet'})" in direct.value
    assert not (tmp_path / "not-yet").exists()  # the doctor creates nothing
    assert list(tmp_path.iterdir()) == []  # and leaves no probe file behind
    assert space.status in ("OK", "WARN", "FAIL") and "used" in space.value


def test_redis_check_pings_a_real_server(redis_server: str) -> None:
    loaded = load_config(flags={"store.tiers": "cpu,redis", "redis.url": redis_server}, environ={})
    report = run(DoctorOptions(only=("redis",)), config=loaded.config, sources=loaded.sources)
    (result,) = report.checks
    assert result.status in ("OK", "WARN") and "PING p50" in result.value, result
    assert (
        report.measurements["redis_rtt_p99_us[redis.url]"]
        >= (report.measurements["redis_rtt_p50_us[redis.url]"])
    )


def test_redis_check_fails_when_nothing_listens() -> None:
    url = f"redis://:secret@127.0.0.1:{free_port()}/0"
    loaded = load_config(flags={"metadata.backend": "redis", "metadata.url": url}, environ={})
    (result,) = run(DoctorOptions(only=("redis",)), config=loaded.config).checks
    assert (
        result.status == "FAIL" and "metadata.url" in result.value and "unreachable" in result.value
    )
    assert "secret" not in result.value + result.fix and ":***@" in result.value


@contextlib.contextmanager
def listener() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(4)
        yield s.getsockname()[1]


def test_mooncake_master_check_connects() -> None:
    with listener() as port:
        loaded = load_config(
            flags={"store.tiers": "cpu,mooncake", "mooncake.master_address": f"127.0.0.1:{port}"},
            environ={},
        )
        (ok,) = run(DoctorOptions(only=("mooncake_master",)), config=loaded.config).checks
    assert ok.status == "OK" and f"127.0.0.1:{port}: connect" in ok.value
    loaded = load_config(
        flags={"store.tiers": "cpu,mooncake", "mooncake.master_address": f"127.0.0.1:{port}"},
        environ={},
    )
    (down,) = run(DoctorOptions(only=("mooncake_master",)), config=loaded.config).checks
    assert down.status == "FAIL" and "unreachable" in down.value


# -- the result and the CLI ------------------------------------------------------------------


def cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def test_cli_json_has_the_issue_shape(tmp_path: Path) -> None:
    path = tmp_path / "doctor.json"
    rc, out, _ = cli(
        ["doctor", "--only", "somaxconn,nofile,wakeup_latency,config", "--wakeup-samples", "20",
         "--set", "transfer.workers=2", "--json", str(path), "--quiet"]
    )  # fmt: skip
    assert rc == 0, out
    data = json.loads(path.read_text())
    assert data["tool"] == "doctor"
    assert [c["name"] for c in data["checks"]] == [
        "nofile",
        "somaxconn",
        "wakeup_latency",
        "config",
    ]
    for c in data["checks"]:
        assert set(c) == {"name", "status", "value", "threshold", "why", "fix"}
        assert c["status"] in STATUSES
    assert data["config"]["sources"]["transfer.workers"] == "flag"
    assert data["command"].startswith("kvferry doctor --only")
    report = load_result(path)
    assert isinstance(report, DoctorReport) and report.checks[0].name == "nofile"
    assert report.options.only == ("somaxconn", "nofile", "wakeup_latency", "config")
    # the table and the summary line
    assert "kvferry doctor" in out and "somaxconn" in out
    counts = report.counts()
    assert f"{counts['OK']} OK, {counts['WARN']} WARN, 0 FAIL, {counts['SKIP']} SKIP" in out


def test_cli_exits_1_when_a_check_fails(tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    rc, out, _ = cli(["doctor", "--only", "redis", "--set", "store.tiers=cpu,redis",
                      "--set", f"redis.url={url}", "--quiet", "--wide"])  # fmt: skip
    assert rc == 1 and "FAIL" in out and "0 OK, 0 WARN, 1 FAIL, 0 SKIP" in out
    assert "Why" in out and "Fix" in out  # --wide adds the columns
    rc, out, _ = cli(["doctor", "--only", "redis", "--set", "store.tiers=cpu,redis",
                      "--set", f"redis.url={url}", "--quiet"])  # fmt: skip
    # without --wide each fix is one whole line under the table, ready to copy
    assert rc == 1 and f"fix redis: start Redis at {url} or fix redis.url" in out


def test_the_table_fits_narrow_terminals(host: Host) -> None:
    from kvferry.cli.doctor_cmd import doctor_table
    from kvferry.testing.tables import assert_fits

    _two_nodes(host)
    host.limits[resource.RLIMIT_NOFILE] = (1024, 1024)
    report = run(DoctorOptions(), view=host.view())
    assert {c.status for c in report.checks} == set(STATUSES)
    for width in (120, 80, 60):
        text, dropped = assert_fits(doctor_table(report), width)
        assert dropped in ([], ["Threshold"]), (width, dropped)
        assert "nofile" in text and "FAIL" in text


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--only", "nosuch"], "--only 'nosuch': no such check; known: memlock,"),
        (["--wakeup-samples", "3"], "--wakeup-samples 3 is out of range"),
        (["--set", "transfer.nosuch=1"], "transfer.nosuch"),
    ],
)
def test_bad_flags_are_one_error_line(argv: list[str], message: str) -> None:
    rc, out, err = cli(["doctor", *argv])
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


def test_options_validate_names() -> None:
    assert _Options(only=("rdma", "numa")).names == ["numa", "rdma"]
    with pytest.raises(ConfigError):
        _Options(only=("memlock", "bogus"))
