"""The store bench (``kvferry bench store``): short real runs against real tiers.

Every run here is real: real TieredStores over the cpu tier, the disk tier in ``tmp_path``, a real
redis-server (the session fixture), a real ``kvferry serve store`` process, real spawned client
processes. Runs last 0.2 s and fill 256 keys of 4 KiB, so no test allocates more than a few MiB.
Nothing asserts on timing: only on counts, ordering and verdicts.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import socket
import uuid
from pathlib import Path
from typing import Any

import pytest

import kvferry.tables as tables
from kvferry.bench.stats import Summary
from kvferry.bench.store import harness as store_bench
from kvferry.bench.store.backends import start_store_server
from kvferry.bench.store.harness import (
    BACKENDS,
    COLUMNS,
    KeySpace,
    PhaseHook,
    PhaseResult,
    StoreBenchError,
    StoreBenchOptions,
    StoreBenchReport,
    auto_slot_size,
    run,
)
from kvferry.cli.bench_cmd import _print_store_report
from kvferry.cli.main import main
from kvferry.config.models import (
    CpuTierConfig,
    DiskTierConfig,
    KvferryConfig,
    MooncakeTierConfig,
    RedisTierConfig,
)
from kvferry.errors import ConfigError
from kvferry.store.tiered import TieredStore
from kvferry.testing.store_server import StoreServerProcess
from kvferry.testing.tables import assert_values_whole, narrow_console, printed

NUM_KEYS = 256
VALUE = 4096
SHORT = {"duration": 0.2, "warmup": 0.05, "num_keys": NUM_KEYS, "value_size": VALUE}
CPU = KvferryConfig(cpu=CpuTierConfig(capacity=4 << 20))


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI reads os.environ; start every test without KVFERRY_* variables."""
    for name in list(os.environ):
        if name.startswith("KVFERRY_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("COLUMNS", "200")  # rich wraps tables to the terminal width


def options(**kw: object) -> StoreBenchOptions:
    return StoreBenchOptions(**{**SHORT, **kw})  # type: ignore[arg-type]


def run_store_bench(
    opts: StoreBenchOptions, config: KvferryConfig, *, hook: PhaseHook | None = None
) -> StoreBenchReport:
    return run(opts, config=config, hook=hook)


def rows(report: StoreBenchReport) -> dict[tuple[str, str], object]:
    return {(p.phase, p.op): p for p in report.phases}


def assert_sane(report: StoreBenchReport) -> None:
    """Every row did work and its statistics are ordered."""
    for p in report.phases:
        assert p.ops > 0 and p.blocks >= p.ops, p
        assert p.seconds > 0 and p.ops_per_s > 0 and p.blocks_per_s >= p.ops_per_s, p
        t = p.latency_us
        assert t.count == p.ops
        assert 0 < t.min <= t.p50 <= t.p90 <= t.p99 <= t.p999 <= t.max, t
        assert t.min <= t.avg <= t.max
        if p.op == "get":
            assert p.hits + p.misses == p.blocks
            assert p.bytes == p.hits * VALUE
        else:
            assert p.stored + p.exists + p.no_space == p.blocks
            assert p.bytes == p.stored * VALUE
        assert p.gbps == pytest.approx(p.bytes / 1e9 / p.seconds)


def test_cpu_batch_get_reads_every_key_it_filled() -> None:
    report = run_store_bench(options(op="batch-get", batch_size=16), CPU)
    assert_sane(report)
    assert [(p.phase, p.op) for p in report.phases] == [
        ("fill", "put"),
        ("read_perf", "get"),
        ("verify", "get"),
    ]
    fill, read, verify = report.phases
    assert fill.stored == NUM_KEYS and fill.blocks == NUM_KEYS
    assert read.batch_size == 16 and read.blocks == 16 * read.ops
    assert read.hits == read.blocks  # everything filled is resident: every read hits
    assert verify.hits == NUM_KEYS
    assert report.verify is not None and report.verify.ok
    assert (report.verify.keys, report.verify.missing, report.verify.mismatched) == (NUM_KEYS, 0, 0)
    assert report.ok and report.failures == []
    assert report.backend["slot_size"] == VALUE
    report.raise_for_failures()


def test_cpu_put_writes_fresh_keys_and_verify_reads_them_back() -> None:
    report = run_store_bench(options(op="put"), CPU)
    assert_sane(report)
    put = rows(report)[("write_perf", "put")]
    assert put.batch_size == 1 and put.blocks == put.ops  # one key per call
    assert put.stored == put.blocks  # fresh keys: never EXISTS
    assert report.verify is not None and report.verify.ok
    # Verify covers the filled keys and every fresh key (warm-up writes included).
    assert report.verify.keys >= NUM_KEYS + put.blocks
    assert report.verify.mismatched == 0


def test_cpu_mixed_reports_gets_and_puts_apart() -> None:
    report = run_store_bench(options(op="mixed", batch_size=4, read_ratio=0.5), CPU)
    assert_sane(report)
    get, put = rows(report)[("mixed", "get")], rows(report)[("mixed", "put")]
    assert get.blocks == 4 * get.ops and put.blocks == 4 * put.ops
    assert get.hits == get.blocks
    assert report.verify is not None and report.verify.ok


def test_disk_tier_under_tmp_path_verifies_and_removes_its_directory(tmp_path: Path) -> None:
    path = tmp_path / "disk"
    config = KvferryConfig(disk=DiskTierConfig(path=str(path), capacity=8 << 20))
    report = run_store_bench(options(backend="disk", op="batch-get", batch_size=8), config)
    assert_sane(report)
    assert rows(report)[("read_perf", "get")].hits == rows(report)[("read_perf", "get")].blocks
    assert report.verify is not None and report.verify.ok and report.verify.keys == NUM_KEYS
    assert str(path) in str(report.backend["path"])
    assert list(path.iterdir()) == []  # the run's own directory is gone


def test_disk_tier_without_a_path_writes_nothing_anywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # no --disk-path: private files under ~/.cache/kvferry/disk, never the working directory
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    config = KvferryConfig(disk=DiskTierConfig(capacity=8 << 20))
    report = run_store_bench(options(backend="disk", op="batch-get", batch_size=8), config)
    assert_sane(report)
    assert report.verify is not None and report.verify.ok and report.verify.keys == NUM_KEYS
    root = home / ".cache" / "kvferry" / "disk"
    assert str(root) in str(report.backend["path"])
    assert list(cwd.iterdir()) == [] and list(root.iterdir()) == []


def test_two_client_processes_each_fill_and_verify_their_own_cpu_store() -> None:
    report = run_store_bench(options(op="get", clients=2, threads=2), CPU)
    assert_sane(report)
    read = rows(report)[("read_perf", "get")]
    assert (read.clients, read.threads) == (2, 2)
    assert read.hits == read.blocks
    assert rows(report)[("fill", "put")].stored == 2 * NUM_KEYS  # one copy per process
    assert report.verify is not None and report.verify.ok
    assert report.verify.keys == 2 * NUM_KEYS
    assert any("not shared between processes" in n for n in report.notes)


@pytest.mark.redis
def test_redis_two_clients_share_one_fill_and_leave_no_keys(redis_server: str) -> None:
    redis = pytest.importorskip("redis")
    prefix = "kvferry-store-bench-test:"
    config = KvferryConfig(redis=RedisTierConfig(url=redis_server, key_prefix=prefix))
    report = run_store_bench(
        options(backend="redis", op="mixed", batch_size=8, clients=2, read_ratio=0.7), config
    )
    assert_sane(report)
    # A shared tier is filled once: the clients split the keys.
    assert rows(report)[("fill", "put")].stored == NUM_KEYS
    assert rows(report)[("mixed", "get")].hits == rows(report)[("mixed", "get")].blocks
    put = rows(report)[("mixed", "put")]
    assert report.verify is not None and report.verify.ok
    assert report.verify.keys >= NUM_KEYS + put.blocks
    client = redis.Redis.from_url(redis_server)
    try:
        assert list(client.scan_iter(match=prefix + "*")) == []  # every key was deleted
    finally:
        client.close()


def test_server_backend_starts_its_own_store_server() -> None:
    config = KvferryConfig(cpu=CpuTierConfig(capacity=4 << 20))
    report = run_store_bench(options(backend="server", op="batch-get", batch_size=16), config)
    assert_sane(report)
    assert report.verify is not None and report.verify.ok
    addresses = report.backend["addresses"]
    assert isinstance(addresses, list) and addresses[0].startswith("127.0.0.1:")
    assert any("kvferry serve store" in n for n in report.notes)


@pytest.mark.parametrize("clients", [1, 2])
def test_keys_a_running_server_evicted_are_not_a_verify_failure(clients: int) -> None:
    # A server too small for the run: 64 slots of 4 KiB for 256 filled keys plus fresh ones.
    small = KvferryConfig(cpu=CpuTierConfig(capacity=64 * VALUE))
    with start_store_server(small) as address:
        report = run_store_bench(
            options(backend="server", op="batch-put", address=address, clients=clients), small
        )
    v = report.verify
    assert v is not None and v.evictions > NUM_KEYS // 2  # the server really evicted
    assert v.mismatched == 0
    # Every missing key was evicted by the server (counted once however many clients ran) or
    # refused outright (NO_SPACE: a batch larger than the server's free slots).
    assert v.missing == v.evictions + v.refused, report.to_json()["store"]
    assert v.ok and report.ok, report.failures


@pytest.mark.mooncake
def test_mooncake_backend_starts_its_own_master() -> None:
    pytest.importorskip("mooncake")
    config = KvferryConfig(
        mooncake=MooncakeTierConfig(global_segment_size=32 << 20, local_buffer_size=4 << 20)
    )
    report = run_store_bench(options(backend="mooncake", op="batch-get", batch_size=16), config)
    assert_sane(report)
    assert report.verify is not None and report.verify.ok
    assert any("mooncake_master" in n for n in report.notes)


# -- verify must catch what it is there for --------------------------------------------------
def corrupt_after_fill(phase: str, store: TieredStore, ks: KeySpace) -> None:
    """Lose filled key #0 and replace filled key #1 with zeros, through the store."""
    if phase != "fill":
        return
    lost, changed = ks.fill_keys(0, 2)
    assert store.delete([lost, changed]) == 2
    store.put([changed], [bytes(ks.value_size)])


def test_verify_reports_a_lost_key_and_a_changed_key() -> None:
    report = run_store_bench(options(op="get"), CPU, hook=corrupt_after_fill)
    v = report.verify
    assert v is not None and not v.ok
    assert (v.keys, v.missing, v.mismatched, v.evictions) == (NUM_KEYS, 1, 1, 0)
    assert any("filled key #0" in e and "missing" in e for e in v.examples)
    assert any("filled key #1" in e and "differs" in e for e in v.examples)
    assert not report.ok
    with pytest.raises(StoreBenchError, match=r"verify failed.*1 differ.*1 are missing"):
        report.raise_for_failures()
    data = report.to_json()
    assert data["ok"] is False and data["verify"]["ok"] is False


def test_values_derive_from_the_key_alone() -> None:
    a, b = KeySpace(b"12345678", 7, 1000), KeySpace(b"12345678", 7, 1000)
    keys = a.fill_keys(0, 64)
    assert keys == b.fill_keys(0, 64) and all(len(k) == 16 for k in keys)
    assert [bytes(a.value(k)) for k in keys] == [bytes(b.value(k)) for k in keys]
    assert len({bytes(a.value(k)) for k in keys}) == 64  # different keys, different bytes
    assert all(len(a.value(k)) == 1000 for k in keys)
    assert KeySpace(b"87654321", 7, 1000).fill_keys(0, 1) != keys[:1]  # fresh per run


@pytest.mark.parametrize(
    ("value", "slot"), [(4096, 4096), (4097, 8192), (100, 128), (10, 64), (65536, 65536)]
)
def test_auto_slot_size(value: int, slot: int) -> None:
    assert auto_slot_size(value) == slot


# -- the CLI ------------------------------------------------------------------------------------
CLI_SHORT = ["--duration", "0.2", "--warmup", "0.05", "--num-keys", str(NUM_KEYS)]


def test_cli_writes_table_json_and_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_json, out_csv = tmp_path / "r.json", tmp_path / "r.csv"
    argv = ["bench", "store", "--backend", "cpu", "--capacity", "4MiB", "--op", "BatchGet"]
    argv += [*CLI_SHORT, "--batch-size", "16", "--quiet"]
    assert main([*argv, "--json", str(out_json), "--csv", str(out_csv)]) == 0
    printed = capsys.readouterr().out
    assert "read_perf" in printed and f"verify: {NUM_KEYS} keys read back" in printed
    assert "OK" in printed

    data = json.loads(out_json.read_text())
    assert data["schema_version"] == 1 and data["tool"] == "store"
    assert data["command"] == shlex.join(
        ["kvferry", *argv, "--json", str(out_json), "--csv", str(out_csv)]
    )
    assert data["options"]["op"] == "batch-get" and data["options"]["batch_size"] == 16
    assert data["ok"] is True and data["verify"]["ok"] is True
    assert [(p["phase"], p["op"]) for p in data["phases"]] == [
        ("fill", "put"),
        ("read_perf", "get"),
        ("verify", "get"),
    ]
    read = data["phases"][1]
    assert read["ops"] > 0 and read["hit_rate"] == 1.0
    assert read["latency_us"]["p50"] <= read["latency_us"]["p99"]
    assert data["backend"]["slot_size"] == VALUE
    assert "cpu_model" in data["environment"] and data["environment"]["cpus"] > 0
    assert data["config"]["values"]["cpu.capacity"] == "4MiB"
    assert data["config"]["sources"]["cpu.capacity"] == "flag"
    assert data["config"]["sources"]["store.slot_size"] == "bench"

    with open(out_csv, newline="") as f:
        table = list(csv.DictReader(f))
    assert [(r["phase"], r["op"]) for r in table] == [(p["phase"], p["op"]) for p in data["phases"]]
    assert int(table[1]["ops"]) == read["ops"]
    assert float(table[1]["blocks_per_s"]) > 0
    assert float(table[1]["lat_p50_us"]) <= float(table[1]["lat_p999_us"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--op", "scan"], "'scan' is not an op; valid: put, get"),
        (
            ["--op", "get", "--batch-size", "8"],
            "--batch-size 8 is invalid: must be 1 with --op get",
        ),
        (["--capacity", "1MiB", "--num-keys", "10000"], "--num-keys 10000 does not fit"),
        (["--redis-url", "redis://x"], "--redis-url does not apply to --backend cpu"),
        (["--address", "127.0.0.1:1"], "--address does not apply to --backend cpu"),
        (["--slot-size", "1KiB"], "--slot-size 1024 is invalid: must be >= --value-size"),
        (["--clients", "0"], "--clients 0 is invalid: must be 1..256"),
        (["--value-size", "lots"], "expected a size like"),
        (["--read-ratio", "2"], "expected a number in [0, 1]"),
        (["--backend", "nfs"], "invalid choice: 'nfs'"),
    ],
)
def test_cli_rejects_bad_flags_with_a_clear_message(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["bench", "store", "--capacity", "4MiB", *CLI_SHORT, *args]) == 2
    err = capsys.readouterr().err
    assert message in err


def big_numbers_report() -> StoreBenchReport:
    """The figures issue 27 saw cut in a 100-column terminal (223,…  24.5…  11,6…)."""
    lat = Summary(
        count=9, min=1.0, max=9e3, avg=24.5, std=3.0, p50=11.6, p90=123.4, p95=130.0,
        p99=456.7, p999=2_789.1,
    )  # fmt: skip

    def phase(name: str, op: str, **outcome: int) -> PhaseResult:
        return PhaseResult(
            phase=name, op=op, batch_size=128, clients=4, threads=8, ops=1_234_567,
            blocks=158_024_576, bytes=10**12, seconds=5.0, ops_per_s=223_456.7,
            blocks_per_s=11_634_567.0, gbps=24.5123, latency_us=lat, **outcome,
        )  # fmt: skip

    phases = [phase("fill", "put", stored=158_024_576), phase("read_perf", "get", hits=9)]
    return StoreBenchReport(options=options(), phases=phases)


@pytest.mark.parametrize("width", [100, 80])
def test_the_table_keeps_every_number_whole_in_a_narrow_terminal(width: int) -> None:
    report = big_numbers_report()
    console = narrow_console(width)
    _print_store_report(console, report)
    text = printed(console)
    values = [store_bench.row(p) for p in report.phases]
    dropped = assert_values_whole(text, width, COLUMNS, values)
    assert dropped, "the full table is wider than this: some columns must be left out"
    assert "--wide shows every column" in " ".join(text.split())
    for kept in ("Ops/s", "GB/s", "P50 (us)", "P99 (us)", "Hit/Stored"):
        assert kept not in dropped


def test_cli_wide_prints_every_column(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(tables, "PIPED_WIDTH", 80)
    argv = ["bench", "store", "--backend", "cpu", "--capacity", "4MiB", *CLI_SHORT, "--quiet"]
    assert main(argv) == 0
    narrow = capsys.readouterr().out
    assert "…" not in narrow and "left out to fit 80 columns" in " ".join(narrow.split())
    assert main([*argv, "--wide"]) == 0
    wide = capsys.readouterr().out
    assert "left out" not in wide and "…" not in wide
    assert all(header.split()[0] in wide for header in COLUMNS)
    assert max(len(line) for line in wide.splitlines()) > 80


def test_every_backend_is_a_tier_and_the_cli_offers_exactly_the_table(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The one table of backends: each is a tier the store can build, and the CLI's --backend
    choices are its names (read from it, not listed again)."""
    from kvferry.backends.registry import TIERS

    assert list(BACKENDS) == ["cpu", "disk", "redis", "server", "mooncake"]
    assert set(BACKENDS) <= set(TIERS.names())
    assert all(name == b.name and callable(b.prepare) for name, b in BACKENDS.items())
    assert main(["bench", "store", "--backend", "nfs"]) == 2
    assert "[--backend {cpu,disk,redis,server,mooncake}]" in capsys.readouterr().err


def test_a_client_that_cannot_reach_its_tier_fails_the_run_with_the_tier_message() -> None:
    pytest.importorskip("redis")
    with socket.socket() as s:  # a port nothing listens on once this socket is closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = KvferryConfig(redis=RedisTierConfig(url=f"redis://127.0.0.1:{port}/0"))
    with pytest.raises(StoreBenchError, match=r"client \d failed: StorageError: .*127\.0\.0\.1"):
        run_store_bench(options(backend="redis", clients=2), config)


# -- the library, driven directly ----------------------------------------------------------------
RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def test_the_library_runs_a_few_cpu_ops_and_the_report_round_trips_through_json() -> None:
    from kvferry.bench import store
    from kvferry.bench.result import load_result
    from kvferry.config.loader import load_config

    loaded = load_config(flags={"cpu.capacity": "4MiB"}, environ={})
    seen: list[tuple[str, str]] = []
    report = store.run(
        store.StoreBenchOptions(
            backend="cpu", op="batch-get", batch_size=8, duration=0.1, warmup=0.0, num_keys=64
        ),
        lambda phase, done, total, unit: seen.append((phase, unit)),
        config=loaded.config,
        sources=loaded.sources,
    )
    assert isinstance(report, store.StoreBenchReport) and report.tool == "store"
    assert [(p.phase, p.op) for p in report.phases] == [
        ("fill", "put"),
        ("read_perf", "get"),
        ("verify", "get"),
    ]
    assert report.phases[1].hits == report.phases[1].blocks > 0 and report.ok
    assert {phase for phase, _ in seen} == {"fill", "read_perf", "verify"}
    assert ("read_perf", "s") in seen and ("fill", "keys") in seen
    assert report.config is not None
    assert report.config.sources["cpu.capacity"] == "flag"
    assert report.config.sources["store.slot_size"] == "bench"  # derived from value_size
    assert report.config.values["store.tiers"] == ["cpu"]
    assert 0 < report.started_at < report.ended_at

    doc = json.loads(json.dumps(report.to_json()))
    assert (doc["schema"], doc["tool"], doc["ok"], doc["verify"]["ok"]) == (
        "kvferry.bench.result",
        "store",
        True,
        True,
    )
    assert doc["phases"][1]["hit_rate"] == 1.0
    back = load_result(doc)
    assert isinstance(back, store.StoreBenchReport) and back == report


def test_options_are_validated_when_built() -> None:
    with pytest.raises(ConfigError, match=r"--clients 0 is invalid: must be 1\.\.256"):
        StoreBenchOptions(clients=0)
    with pytest.raises(ConfigError, match="--backend 'nfs' is invalid: must be cpu, disk"):
        StoreBenchOptions(backend="nfs")
    with pytest.raises(ConfigError, match="must be given only with --backend server or mooncake"):
        StoreBenchOptions(address="127.0.0.1:1")


def test_backend_settings_come_from_the_one_table() -> None:
    from kvferry.bench.store.backends import backend_settings

    given = {"--capacity": 1 << 20, "--disk-path": "/tmp/x", "--redis-url": None}
    assert backend_settings("disk", given) == {"disk.capacity": 1 << 20, "disk.path": "/tmp/x"}
    assert backend_settings("server", {"--capacity": 1, "--address": "h:1"}) == {"cpu.capacity": 1}
    with pytest.raises(ConfigError, match="--disk-path does not apply to --backend cpu; it is"):
        backend_settings("cpu", given)


def test_every_old_store_result_file_loads() -> None:
    from kvferry.bench.result import load_result

    paths = []
    for path in sorted(RESULTS.glob("*.json")):
        doc = json.loads(path.read_text())
        if isinstance(doc, dict) and doc.get("tool") == "kvferry bench store":
            paths.append(path)
    assert len(paths) >= 3  # store_cpu_4k, store_server_auto, store_server_tcp
    for path in paths:
        old = json.loads(path.read_text())
        report = load_result(path)
        assert isinstance(report, StoreBenchReport), path
        assert report.options.backend == old["options"]["backend"]
        assert [(p.phase, p.op, p.gbps) for p in report.phases] == [
            (p["phase"], p["op"], p["gbps"]) for p in old["phases"]
        ]
        assert report.phases[1].latency_us.p99 == old["phases"][1]["latency_us"]["p99"]
        assert report.verify is not None and report.verify.ok == old["verify"]["ok"]
        assert report.ok == old["ok"] and report.backend == old["backend"]
        assert report.environment.cpu_model == old["machine"]["cpu_model"]
        assert StoreBenchReport.from_json(json.loads(json.dumps(report.to_json()))) == report


def test_overfill_measures_a_store_that_evicts_as_it_fills(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "churn.json"
    argv = ["bench", "store", "--backend", "cpu", "--op", "batch-put", "--capacity", "1MiB"]
    argv += [*CLI_SHORT, "--num-keys", "2000", "--overfill", "--quiet", "--json", str(out)]
    assert main(argv) == 0  # without --overfill: "--num-keys 2000 does not fit"
    data = json.loads(out.read_text())
    assert data["options"]["overfill"] is True
    assert data["verify"]["ok"] is True and data["verify"]["evictions"] > 0
    assert data["store"]["evictions"] > 0


def _run_server_bench(tmp_path: Path, *extra: str) -> dict[str, Any]:
    out = tmp_path / "servers.json"
    argv = ["bench", "store", "--backend", "server", "--op", "batch-get", "--quiet"]
    assert main([*argv, *CLI_SHORT, *extra, "--json", str(out)]) == 0
    data: dict[str, Any] = json.loads(out.read_text())
    assert data["verify"]["ok"] is True and data["verify"]["missing"] == 0
    return data


def test_the_server_bench_runs_against_a_list_of_running_servers(tmp_path: Path) -> None:
    servers = [StoreServerProcess(slot_size=VALUE).start() for _ in range(2)]
    try:
        listed = ",".join(s.address for s in servers)
        data = _run_server_bench(tmp_path, "--address", listed)
        assert data["backend"]["addresses"] == [s.address for s in servers]
        assert not any("started `kvferry serve store`" in n for n in data["notes"])
    finally:
        for s in servers:
            s.kill()


@pytest.mark.redis
def test_the_server_bench_runs_against_a_membership(redis_server: str, tmp_path: Path) -> None:
    prefix = f"kvferry:bench-{uuid.uuid4().hex[:8]}"
    key = f"server.membership_key={prefix}"
    servers = [
        StoreServerProcess("--register", redis_server, "--set", key, slot_size=VALUE).start()
        for _ in range(2)
    ]
    try:
        data = _run_server_bench(tmp_path, "--membership-url", redis_server, "--set", key)
        assert data["backend"]["membership_url"] == redis_server
        assert data["config"]["values"]["server.membership_url"] == redis_server
    finally:
        for s in servers:
            s.kill()


@pytest.mark.parametrize("address", ["nohost", "127.0.0.1:1,oops", ","])
def test_a_bad_server_address_list_is_one_error_line(
    address: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", "store", "--backend", "server", "--address", address, *CLI_SHORT]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--address" in err[0] and "HOST:PORT" in err[0], err
