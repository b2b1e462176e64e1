"""StatsMonitor: interval arithmetic on hand-built StoreStats, stepped by a fake clock."""

from __future__ import annotations

import io
import threading

import pytest
from rich.console import Console

from kvferry.backends.base import TierStats
from kvferry.errors import ConfigError
from kvferry.store.stats import StoreStats, TierCounters
from kvferry.telemetry.monitor import StatsMonitor, format_table


class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _tiers(sample: dict[str, object]) -> dict[str, dict[str, float]]:
    tiers = sample["tiers"]
    assert isinstance(tiers, dict)
    return tiers


def test_interval_rates_come_from_deltas() -> None:
    clock = FakeClock(100.0)
    cpu = TierCounters(bytes_out=1_000_000_000, load_seconds=0.5)
    cpu.bytes_in, cpu.save_seconds = 2_000_000_000, 1.0
    stats = StoreStats(
        lookups=2,
        lookup_blocks=10,
        hit_blocks=4,
        request_hit_fraction_sum=0.8,
        tiers={"cpu": cpu},
        usage={"cpu": TierStats(total_blocks=50, used_blocks=10, peak_blocks=10)},
    )
    # fn hands back the same live object each time, as a store without a copying snapshot
    # would: the monitor must copy the numbers it needs, or every delta would read 0.
    monitor = StatsMonitor(lambda: stats, interval_s=2.0, clock=clock)

    first = monitor.sample()
    assert first["interval_s"] == 0.0
    assert first["hit_rate"] == pytest.approx(0.4)  # totals so far: no predecessor
    assert first["load_gbps"] == pytest.approx(2.0)
    assert first["save_gbps"] == pytest.approx(2.0)
    assert first["load_wall_gbps"] == 0.0  # no wall interval yet

    clock.now = 102.0
    stats.lookups, stats.lookup_blocks, stats.hit_blocks = 4, 20, 12
    stats.request_hit_fraction_sum = 0.8 + 1.5
    cpu.bytes_out += 3_000_000_000
    cpu.load_seconds += 1.0
    cpu.evictions = 7
    stats.tiers["disk"] = TierCounters(bytes_in=4_000_000_000, save_seconds=2.0, blocks_in=3)
    stats.usage["cpu"] = TierStats(total_blocks=50, used_blocks=30, peak_blocks=30)

    second = monitor.sample()
    assert second["interval_s"] == pytest.approx(2.0)
    assert second["lookups"] == 2 and second["lookup_blocks"] == 10 and second["hit_blocks"] == 8
    assert second["hit_rate"] == pytest.approx(0.8)  # 8 / 10 this interval
    assert second["request_hit_rate_mean"] == pytest.approx(0.75)  # 1.5 / 2 lookups
    assert second["total_hit_rate"] == pytest.approx(0.6)  # 12 / 20 since the start
    assert second["bytes_out"] == 3e9 and second["bytes_in"] == 4e9
    assert second["load_gbps"] == pytest.approx(3.0)  # 3e9 B over 1 s spent loading
    assert second["load_wall_gbps"] == pytest.approx(1.5)  # 3e9 B over a 2 s interval
    assert second["save_gbps"] == pytest.approx(2.0)  # only disk saved: 4e9 B over 2 s
    tiers = _tiers(second)
    assert tiers["cpu"]["load_gbps"] == pytest.approx(3.0)
    assert tiers["cpu"]["save_gbps"] == 0.0 and tiers["cpu"]["bytes_in"] == 0
    assert tiers["cpu"]["evictions"] == 7
    assert tiers["cpu"]["used_blocks"] == 30 and tiers["cpu"]["total_blocks"] == 50
    assert tiers["disk"]["save_gbps"] == pytest.approx(2.0)  # a tier new since last sample
    assert tiers["disk"]["blocks_in"] == 3
    assert "used_blocks" not in tiers["disk"]  # no usage reported for it
    assert monitor.latest() == second


def test_an_idle_interval_reports_zero_rates_not_a_division_error() -> None:
    clock = FakeClock()
    stats = StoreStats(lookups=1, lookup_blocks=4, hit_blocks=4, tiers={"cpu": TierCounters()})
    monitor = StatsMonitor(lambda: stats, interval_s=1.0, clock=clock)
    monitor.sample()
    clock.now += 1.0
    idle = monitor.sample()
    assert idle["lookup_blocks"] == 0
    assert idle["hit_rate"] == 0.0 and idle["request_hit_rate_mean"] == 0.0
    assert idle["load_gbps"] == 0.0 and idle["save_wall_gbps"] == 0.0
    assert idle["total_hit_rate"] == 1.0


def test_a_counter_that_goes_backwards_counts_as_reset() -> None:
    clock = FakeClock()
    current = [StoreStats(lookup_blocks=100, hit_blocks=90)]
    monitor = StatsMonitor(lambda: current[0], interval_s=1.0, clock=clock)
    monitor.sample()
    clock.now += 1.0
    current[0] = StoreStats(lookup_blocks=10, hit_blocks=5)  # the store was reopened
    after = monitor.sample()
    assert after["lookup_blocks"] == 10 and after["hit_blocks"] == 5
    assert after["hit_rate"] == pytest.approx(0.5)


def test_history_keeps_the_last_n() -> None:
    clock = FakeClock(0.0)
    stats = StoreStats()
    monitor = StatsMonitor(lambda: stats, interval_s=1.0, history=2, clock=clock)
    assert monitor.latest() == {}
    for i in range(3):
        clock.now = float(i)
        stats.lookup_blocks = i
        monitor.sample()
    assert [s["time"] for s in monitor.history()] == [1.0, 2.0]
    assert monitor.latest()["time"] == 2.0


def test_thread_samples_and_survives_a_failing_read() -> None:
    calls = 0
    sampled_after_failure = threading.Event()

    def read() -> StoreStats:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError("store not ready")
        sampled_after_failure.set()
        return StoreStats(lookup_blocks=2, hit_blocks=1)

    with StatsMonitor(read, interval_s=0.01) as monitor:
        assert monitor.running
        assert sampled_after_failure.wait(10)
    assert not monitor.running
    assert monitor.errors == 1 and monitor.last_error == "OSError: store not ready"
    assert monitor.latest()["total_hit_rate"] == pytest.approx(0.5)
    monitor.stop()  # idempotent
    with pytest.raises(RuntimeError, match="stopped"):
        monitor.start()


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"interval_s": 0}, "interval_s"), ({"history": 0}, "history")]
)
def test_bad_settings(kwargs: dict[str, float], match: str) -> None:
    args: dict[str, float] = {"interval_s": 1.0} | kwargs
    with pytest.raises(ConfigError, match=match):
        StatsMonitor(StoreStats, args["interval_s"], history=int(args.get("history", 10)))


def test_format_table_shows_hit_rates_and_tiers() -> None:
    stats = StoreStats(
        lookups=4,
        lookup_blocks=10,
        hit_blocks=7,
        request_hit_fraction_sum=3.0,
        tiers={
            "cpu": TierCounters(hits=6, bytes_in=4_000_000_000, save_seconds=2.0, evictions=5),
            "disk": TierCounters(hits=1, bytes_out=1_500_000, load_seconds=0.001),
        },
        usage={
            "cpu": TierStats(total_blocks=100, used_blocks=40, peak_blocks=60),
            "disk": TierStats(total_blocks=None, used_blocks=7, peak_blocks=9),
        },
    )
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(format_table(stats))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "hit rate 70.0% (block-weighted, 7/10 blocks)" in text
    assert "per-request mean 75.0% (4 lookups)" in text
    cpu_row = next(line for line in text.splitlines() if " cpu " in line)
    assert "40/100" in cpu_row and "60" in cpu_row and "4.00 GB" in cpu_row
    assert "2.00" in cpu_row and " 5 " in cpu_row
    disk_row = next(line for line in text.splitlines() if " disk " in line)
    assert "7/-" in disk_row and "1.50 MB" in disk_row and "1.50" in disk_row


@pytest.mark.parametrize("width", [100, 80])
def test_format_table_keeps_every_number_whole_in_a_narrow_console(width: int) -> None:
    from kvferry.testing.tables import assert_values_whole, narrow_console, printed

    stats = StoreStats(
        lookups=123_456_789,
        lookup_blocks=9_876_543_210,
        hit_blocks=8_765_432_109,
        request_hit_fraction_sum=3.0,
        tiers={
            "cpu": TierCounters(
                hits=8_000_000_000, bytes_in=4_000_000_000_000, save_seconds=2.0, evictions=5
            ),
            "disk": TierCounters(hits=765_432_109, bytes_out=1_500_000, load_seconds=0.001),
        },
        usage={
            "cpu": TierStats(total_blocks=100_000_000, used_blocks=99_999_999, peak_blocks=60),
            "disk": TierStats(total_blocks=None, used_blocks=7_000_000, peak_blocks=9_000_000),
        },
    )
    console = narrow_console(width)
    console.print(format_table(stats))
    text = printed(console)
    headers = ["tier", "used/total blocks", "peak", "hit blocks", "bytes in", "bytes out"]
    rows = [
        ["cpu", "99999999/100000000", "60", "8000000000", "4.00 TB", "0 B"],
        ["disk", "7000000/-", "9000000", "765432109", "0 B", "1.50 MB"],
    ]
    dropped = assert_values_whole(text, width, headers, rows)
    assert {"used/total blocks", "hit blocks"}.isdisjoint(dropped)
