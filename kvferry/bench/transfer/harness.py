"""The transfer benchmark (kvferry's tebench) as a library: options in, a report out.

``run(options, progress=None, config=..., sources=...)`` connects every contender of
``options.backend`` (each entry's engine with its own config overrides) to its own target (a
child process on loopback, or the running target at ``options.target_seg``), runs every case of
the sweep ``options.rounds`` times alternating the contenders round by round
(:func:`run_interleaved`), measures the references when asked, and returns a
:class:`~kvferry.bench.transfer.report.TransferBenchReport`. The CLI (``kvferry bench
transfer``) only parses flags into options and prints the report; a Python user calls ``run``.

Where the parts live: options and the contender grammar in :mod:`.options`, one case (grid,
timed loop, consistency check, result, round merge) in :mod:`.cases`, engines and targets in
:mod:`.targets`, the report, its table cells and CSV in :mod:`.report`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from kvferry.bench import references
from kvferry.bench.result import EffectiveConfig, Ratio, Reference
from kvferry.bench.stats import Samples
from kvferry.bench.transfer.backends.base import TransferBenchBackend
from kvferry.bench.transfer.cases import (
    Case,
    CaseResult,
    ConsistencyError,
    merge_rounds,
    plan_cases,
    run_case,
)
from kvferry.bench.transfer.options import ContenderSpec, TransferBenchOptions, parse_contenders
from kvferry.bench.transfer.report import (
    BW,
    COLUMNS,
    P99,
    ContenderInfo,
    TransferBenchReport,
    round_ratio,
    row,
    write_csv,
)
from kvferry.bench.transfer.targets import (
    READY_PREFIX,
    make_backend,
    serve,
    serve_target,
    spawn_local_target,
)
from kvferry.config.models import KvferryConfig

__all__ = [
    "COLUMNS",
    "READY_PREFIX",
    "Case",
    "CaseResult",
    "ConsistencyError",
    "Contender",
    "ContenderSpec",
    "Progress",
    "TransferBenchOptions",
    "TransferBenchReport",
    "make_backend",
    "measure_references",
    "merge_rounds",
    "parse_contenders",
    "row",
    "run",
    "run_interleaved",
    "serve",
    "serve_target",
    "spawn_local_target",
    "write_csv",
]

Progress = Callable[[int, int, str], None]
"""``(done, total, what)``: steps done of ``total`` (0: unknown), and what runs now
(``"4096B x128 t1"``, ``"reference: ..."``)."""

REFERENCE_STEP = "reference: socket stream 1MiB, memcpy 16MiB"


def _connect(backend: TransferBenchBackend, options: TransferBenchOptions, target_seg: str) -> int:
    """Connect ``backend`` with a local buffer for the largest case; the bytes a case may use."""
    local_size = min(
        options.total_buffer_size,
        options.max_block_size * options.max_batch_size * options.max_threads,
    )
    backend.connect(target_seg, max(local_size, options.start_block_size))
    return min(backend.target_capacity(), max(local_size, options.start_block_size))


@dataclass
class Contender:
    """A backend connected for an interleaved run, with the target it runs against."""

    name: str
    backend: TransferBenchBackend
    target_seg: str
    target_pid: int | None = None


def run_interleaved(
    contenders: Sequence[Contender],
    options: TransferBenchOptions,
    *,
    on_case: Callable[[CaseResult], None] | None = None,
    progress: Callable[[int, int, Case], None] | None = None,
) -> tuple[list[CaseResult], list[Ratio], list[Case]]:
    """Run every case ``options.rounds`` times, each round once per contender, the order
    rotating from round to round; report each contender's rounds merged (samples pooled, bytes
    and seconds summed) and, with two or more contenders, the first against the second round
    by round (a BW and a P99 :class:`Ratio` per case). Cases are those that fit every
    contender's target; the others are returned as skipped."""
    capacity = min(_connect(c.backend, options, c.target_seg) for c in contenders)
    cases, skipped = plan_cases(options, capacity)
    results: list[CaseResult] = []
    ratios: list[Ratio] = []
    steps = len(cases) * options.rounds * len(contenders)
    step = 0
    for case in cases:
        runs: dict[str, list[CaseResult]] = {c.name: [] for c in contenders}
        kept: dict[str, list[Samples]] = {c.name: [] for c in contenders}
        for r in range(options.rounds):
            k = r % len(contenders)
            for c in [*contenders[k:], *contenders[:k]]:
                if progress:
                    progress(step, steps, case)
                step += 1
                runs[c.name].append(run_case(c.backend, case, options, c.target_pid, kept[c.name]))
        for c in contenders:
            merged = merge_rounds(runs[c.name], kept[c.name])
            merged.backend = c.name  # the contender's label: two configs of one engine differ
            results.append(merged)
            if on_case:
                on_case(merged)
        if len(contenders) > 1:
            base, other = contenders[0].name, contenders[1].name
            pairs = list(zip(runs[base], runs[other], strict=True))
            bw = [a.bw_gbps / b.bw_gbps if b.bw_gbps else float("inf") for a, b in pairs]
            p99 = [
                a.transfer_us.p99 / b.transfer_us.p99 if b.transfer_us.p99 else float("inf")
                for a, b in pairs
            ]
            ratios.append(round_ratio(BW, base, other, case, bw))
            ratios.append(round_ratio(P99, base, other, case, p99))
    return results, ratios, skipped


def measure_references(duration: float) -> list[Reference]:
    """The loopback wire (a plain socket stream of 1 MiB messages between two processes) and
    memcpy (16 MiB), each for ``max(1, duration)`` seconds."""
    seconds = max(1.0, duration)
    stream = references.socket_stream(1 << 20, seconds)
    copy = references.memcpy(16 << 20, seconds)
    return [
        Reference(
            "socket_stream_1MiB",
            stream["gbps"],
            "GB/s",
            {k: v for k, v in stream.items() if k != "gbps"},
        ),
        Reference(
            "memcpy_16MiB", copy["gbps"], "GB/s", {k: v for k, v in copy.items() if k != "gbps"}
        ),
    ]


def run(
    options: TransferBenchOptions,
    progress: Progress | None = None,
    *,
    config: KvferryConfig | None = None,
    sources: Mapping[str, str] | None = None,
) -> TransferBenchReport:
    """Run the sweep ``options`` describes and return its report.

    Args:
        options: the sweep and the contenders (``options.backend``).
        progress: called before every case run and the reference step.
        config: the config every contender starts from (its entry's overrides on top); the
            defaults when None.
        sources: where each dotted key of ``config`` came from (``LoadedConfig.sources``), for
            the report's effective config.

    Raises:
        ConfigError: a bad override, an unknown backend, a backend that cannot run here.
        LaunchError: a local target did not start (the message has its stderr).
        ConsistencyError: ``check_consistency`` found a byte that differs.
        TransferError: a batch failed.
    """
    config = config or KvferryConfig()
    report = TransferBenchReport(
        options=options, config=EffectiveConfig.of(config, sources), started_at=time.time()
    )
    specs = options.contenders()

    def on_case(done: int, total: int, case: Case) -> None:
        if progress:
            progress(done, total, f"{case.block_size}B x{case.batch_size} t{case.threads}")

    configs = [spec.config(config) for spec in specs]  # every bad override before any start
    with contextlib.ExitStack() as stack:
        contenders = []
        for spec, entry_config in zip(specs, configs, strict=True):
            backend = make_backend(spec.name, options, entry_config)
            stack.callback(backend.close)
            if options.target_seg:
                contenders.append(Contender(spec.label, backend, options.target_seg))
            else:
                segment, pid = stack.enter_context(
                    spawn_local_target(spec.name, options, entry_config)
                )
                contenders.append(Contender(spec.label, backend, segment, pid))
        results, ratios, skipped = run_interleaved(contenders, options, progress=on_case)
        report.contenders = [
            ContenderInfo(s.label, s.name, dict(s.overrides), c.backend.describe())
            for s, c in zip(specs, contenders, strict=True)
        ]
    report.cases, report.ratios, report.skipped = results, ratios, skipped
    if options.reference:
        if progress:
            progress(0, 0, REFERENCE_STEP)
        report.references = measure_references(options.duration)
    report.ended_at = time.time()
    return report
