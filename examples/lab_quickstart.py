"""The lab as a library: three benches run from Python, each returning a report on the one
result model, written as JSON and read back with ``load_result``.

    .venv/bin/python examples/lab_quickstart.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from kvferry.bench.hitrate import HitRateOptions
from kvferry.bench.hitrate import run as run_hitrate
from kvferry.bench.result import BenchResult, load_result
from kvferry.bench.store import StoreBenchOptions
from kvferry.bench.store import run as run_store
from kvferry.bench.transfer import TransferBenchOptions
from kvferry.bench.transfer import run as run_transfer


def round_trip(report: BenchResult, directory: Path) -> None:
    path = directory / f"{report.tool}.json"
    report.write(path)
    again = load_result(path)
    env = again.environment
    print(
        f"  {report.tool}: {type(again).__name__} read back equal: {again == report}; "
        f"measured on {env.cpus} CPUs, Python {env.python}, kvferry {env.packages['kvferry']}"
    )


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        # Hit rate of the bundled trace at two capacities (deterministic: a simulation).
        hitrate = run_hitrate(
            HitRateOptions(
                trace="mooncake-synthetic",
                policies=["lru", "length-aware"],
                capacities=[1953, 9765],
                jobs=1,
            )
        )
        for case in hitrate.cases:
            print(
                f"hitrate {case.policy:12} {case.capacity_blocks:5} blocks: "
                f"{case.block_hit_rate:.4f}"
            )
        round_trip(hitrate, out)

        # kvferry's transfer engine over loopback tcp, 4 KiB x 128, two short rounds, with the
        # loopback wire and memcpy measured in the same run.
        transfer = run_transfer(
            TransferBenchOptions(
                backend="kvferry",
                transport="tcp",
                rounds=2,
                duration=0.3,
                warmup=0.1,
                start_block_size=4096,
                max_block_size=4096,
                start_batch_size=128,
                max_batch_size=128,
                total_buffer_size=1 << 20,
                reference=True,
            )
        )
        refs = ", ".join(f"{r.name} ({r.unit})" for r in transfer.references)
        print(f"transfer: {len(transfer.cases)} case; same-run references: {refs}")
        round_trip(transfer, out)

        # The store bench's cpu backend, batch-get of 4 KiB values.
        store = run_store(StoreBenchOptions(backend="cpu", op="batch-get", duration=0.5))
        print(f"store: phases {', '.join(p.phase for p in store.phases)}; ok={store.ok}")
        round_trip(store, out)


if __name__ == "__main__":
    main()
