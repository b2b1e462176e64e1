"""The whole lab in one call (``kvferry bench all``, ``make run``): every bench, small, on the
embedded default, each writing its result into one run directory.

Owns the plan of the run (what each bench is asked to do, in a full run and a ``quick`` one),
running the benches through their libraries in order, and the list of what was written. The
steps, each a result JSON (the lab's result model, read back by
:func:`~kvferry.bench.result.load_result`) and the bench's own figures:

    doctor     the production checklist against this machine and the default config (seconds):
               what a reader needs to trust the numbers after it (limits, NUMA, wake-up cost)
    transfer   kvferry over TCP on loopback, 4 KiB..1 MiB blocks x batches 1..4, with the same
               run's socket-stream and memcpy references; Mooncake's transfer engine beside it
               when its wheel imports (else a note in the result says how to add it)
    store      batch-get on the cpu tier, then on a store server this run starts
    hitrate    the bundled Mooncake-style trace, LRU and length-aware over a capacity sweep,
               against the mooncake-fig9 curve, with capacity advice for a 0.5 hit rate
    serve      one ``kvferry serve mock`` engine and a closed-loop concurrency sweep against it
    router     KV-aware routing against round-robin over a fresh pair of mock engines per run

The run uses no external service and no ``KVFERRY_*`` setting: every config is the defaults,
with the few keys a step sets itself marked ``bench``. A step that fails (a
:class:`~kvferry.errors.KvferryError`) is recorded with its message and the next step runs:
what was measured before it stays on disk. Building the report from the files is the caller's
(the report layer sits above the lab): ``kvferry bench all`` does it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kvferry.bench.result import BenchResult
from kvferry.config.loader import load_config
from kvferry.errors import ConfigError, KvferryError, MissingDependency

__all__ = [
    "FULL",
    "QUICK",
    "STEPS",
    "StepResult",
    "SuiteOptions",
    "SuitePlan",
    "SuiteProgress",
    "SuiteProgressFn",
    "SuiteResult",
    "mooncake_available",
    "run",
]

STEPS = ("doctor", "transfer", "store", "hitrate", "serve", "router")
"""The steps, in the order they run."""

MOONCAKE_HINT = (
    "Mooncake's transfer engine is not installed here, so the transfer sweep measured kvferry "
    "alone; to measure it beside kvferry: make mooncake (pip install 'kvferry[mooncake]'), "
    "then make run again"
)


@dataclass(frozen=True)
class SuitePlan:
    """What each step is asked to do (sizes in bytes, times in seconds)."""

    doctor_wakeup_samples: int
    transfer_max_block: int
    transfer_max_batch: int
    transfer_buffer: int
    transfer_duration: float
    transfer_warmup: float
    store_value_size: int
    store_batch: int
    store_keys: int
    store_capacity: int
    store_duration: float
    store_warmup: float
    hitrate_capacities: tuple[int, ...]
    """Blocks of 512 tokens (the bundled trace's block)."""
    hitrate_target: float | None
    serve_concurrency: tuple[int, ...]
    serve_requests: int | None
    """Requests per level; None: each level sends for ``serve_duration`` seconds."""
    serve_duration: float | None
    serve_isl: int
    serve_osl: int
    serve_speedup: float
    """The mock engine's timing model is divided by this (1: an 8B model on one H100)."""
    router_ratios: tuple[float, ...]
    router_requests: int


FULL = SuitePlan(
    doctor_wakeup_samples=300,
    transfer_max_block=1 << 20,
    transfer_max_batch=4,
    transfer_buffer=64 << 20,
    transfer_duration=0.5,
    transfer_warmup=0.2,
    store_value_size=64 << 10,
    store_batch=32,
    store_keys=2048,
    store_capacity=256 << 20,
    store_duration=1.0,
    store_warmup=0.3,
    # 0.2%, 2%, 4%, 10%, 20% and 100% of the trace's distinct blocks
    hitrate_capacities=(195, 1953, 3906, 9765, 19531, 97656),
    hitrate_target=0.5,
    serve_concurrency=(1, 2, 4, 8, 16),
    serve_requests=None,
    serve_duration=2.0,
    serve_isl=512,
    serve_osl=32,
    serve_speedup=1.0,
    router_ratios=(0.5, 0.9),
    router_requests=60,
)
"""``make run``: a few minutes at most on two cores."""

QUICK = SuitePlan(
    doctor_wakeup_samples=50,
    transfer_max_block=16 << 10,
    transfer_max_batch=1,
    transfer_buffer=16 << 20,
    transfer_duration=0.1,
    transfer_warmup=0.05,
    store_value_size=4096,
    store_batch=8,
    store_keys=128,
    store_capacity=16 << 20,
    store_duration=0.2,
    store_warmup=0.05,
    hitrate_capacities=(195, 3906, 97656),
    hitrate_target=None,
    serve_concurrency=(1, 4),
    serve_requests=8,
    serve_duration=None,
    serve_isl=64,
    serve_osl=8,
    serve_speedup=20.0,
    router_ratios=(0.9,),
    router_requests=20,
)
"""``--quick`` (the tests): every step and file of a full run, each as small as it goes."""


@dataclass(frozen=True)
class SuiteOptions:
    """One run of the lab.

    Validated on construction: a value that makes no sense raises ConfigError naming the flag.
    """

    out: Path = Path(".kvferry-run")
    """The run directory: every result JSON and figure goes here."""
    quick: bool = False
    """:data:`QUICK` instead of :data:`FULL`."""
    steps: tuple[str, ...] = STEPS
    """The steps to run, a subset of :data:`STEPS` (run in that order)."""
    mooncake: bool | None = None
    """Measure Mooncake's transfer engine beside kvferry: None = when its wheel imports."""
    command: str = ""
    """The command line that started the run, noted in every result."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        unknown = [s for s in self.steps if s not in STEPS]
        if unknown or not self.steps:
            raise ConfigError(
                f"--only {','.join(self.steps)!r} is invalid: must be one or more of "
                + ", ".join(STEPS)
            )

    @property
    def plan(self) -> SuitePlan:
        return QUICK if self.quick else FULL


@dataclass(frozen=True)
class SuiteProgress:
    """Where a run is: step ``index`` (0-based) of ``steps``, and what that step does now
    (``done`` of ``total`` units, None: not known)."""

    step: str
    index: int
    steps: int
    detail: str = ""
    done: float = 0.0
    total: float | None = None


SuiteProgressFn = Callable[[SuiteProgress], None]


@dataclass
class StepResult:
    """One step: the files it wrote, how long it took, and its failure (None: it ran)."""

    name: str
    files: list[Path] = field(default_factory=list)
    seconds: float = 0.0
    error: str | None = None

    @property
    def results(self) -> list[Path]:
        """The result JSON files among :attr:`files`."""
        return [p for p in self.files if p.suffix == ".json"]


@dataclass
class SuiteResult:
    """A whole run: its directory, one :class:`StepResult` per step run, and notes."""

    out: Path
    steps: list[StepResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    started_at: float = 0.0
    ended_at: float = 0.0

    @property
    def files(self) -> list[Path]:
        return [p for s in self.steps for p in s.files]

    @property
    def results(self) -> list[Path]:
        """Every result JSON written, in step order (what a report is built from)."""
        return [p for s in self.steps for p in s.results]

    @property
    def failed(self) -> list[StepResult]:
        return [s for s in self.steps if s.error is not None]

    @property
    def seconds(self) -> float:
        return max(0.0, self.ended_at - self.started_at)


def mooncake_available() -> bool:
    """Whether Mooncake's transfer engine imports here (its wheel and its shared libraries)."""
    from kvferry.backends.mooncake import import_mooncake

    try:
        import_mooncake("engine", "TransferEngine", package="mooncake-transfer-engine-non-cuda")
    except MissingDependency:
        return False
    return True


# -- the steps -----------------------------------------------------------------------------------
Tell = Callable[[str, float, "float | None"], None]
"""``tell(detail, done, total)``: the running step's progress."""


@dataclass(frozen=True)
class _Context:
    options: SuiteOptions
    plan: SuitePlan
    out: Path


def _finish(report: BenchResult, ctx: _Context, path: Path, extra: Sequence[str] = ()) -> Path:
    report.notes.extend(extra)
    report.command = ctx.options.command
    report.write(path)
    return path


def _doctor(ctx: _Context, tell: Tell, suite_notes: list[str]) -> list[Path]:
    from kvferry.bench.doctor import DoctorOptions
    from kvferry.bench.doctor import run as run_doctor

    def progress(name: str, done: int, total: int) -> None:
        tell(name, done, total)

    # a FAIL is a finding of the report, not a failed step: the benches after it still run
    options = DoctorOptions(wakeup_samples=ctx.plan.doctor_wakeup_samples)
    report = run_doctor(options, progress)
    return [_finish(report, ctx, ctx.out / "doctor.json")]


def _transfer(ctx: _Context, tell: Tell, suite_notes: list[str]) -> list[Path]:
    from kvferry.bench.transfer import TransferBenchOptions
    from kvferry.bench.transfer import run as run_transfer

    p = ctx.plan
    with_mooncake = mooncake_available() if ctx.options.mooncake is None else ctx.options.mooncake
    options = TransferBenchOptions(
        backend="kvferry,mooncake" if with_mooncake else "kvferry",
        transport="tcp",
        total_buffer_size=p.transfer_buffer,
        start_block_size=4096,
        max_block_size=p.transfer_max_block,
        max_batch_size=p.transfer_max_batch,
        duration=p.transfer_duration,
        warmup=p.transfer_warmup,
        check_consistency=True,
        reference=True,
    )

    def progress(done: int, total: int, what: str) -> None:
        tell(what, done, total or None)

    report = run_transfer(options, progress)
    extra = [] if with_mooncake else [MOONCAKE_HINT]
    suite_notes.extend(extra)
    return [_finish(report, ctx, ctx.out / "transfer.json", extra)]


def _store(ctx: _Context, tell: Tell, suite_notes: list[str]) -> list[Path]:
    from kvferry.bench.store import StoreBenchOptions
    from kvferry.bench.store import run as run_store

    p = ctx.plan
    loaded = load_config(flags={"cpu.capacity": p.store_capacity}, environ={})
    sources = {**loaded.sources, "cpu.capacity": "bench"}
    written = []
    for backend in ("cpu", "server"):
        options = StoreBenchOptions(
            backend=backend,
            op="batch-get",
            value_size=p.store_value_size,
            batch_size=p.store_batch,
            num_keys=p.store_keys,
            duration=p.store_duration,
            warmup=p.store_warmup,
        )

        def progress(phase: str, done: float, total: float, unit: str, b: str = backend) -> None:
            tell(f"{b} {phase} ({unit})", done, total or None)

        report = run_store(options, progress, config=loaded.config, sources=sources)
        written.append(_finish(report, ctx, ctx.out / f"store-{backend}.json"))
        report.raise_for_failures()  # after writing: the file says what failed
    return written


class _HitRateBars:
    """The hit-rate lab's tasks (one per simulation) summed into one progress figure."""

    def __init__(self, tell: Tell) -> None:
        self.tell = tell
        self.tasks: dict[int, tuple[str, int, int | None]] = {}

    def add(self, label: str, total: int | None) -> Any:
        task = len(self.tasks)
        self.tasks[task] = (label, 0, total)
        self._show(label)
        return task

    def update(self, task: Any, done: int) -> None:
        label, _, total = self.tasks[task]
        self.tasks[task] = (label, done, total)
        self._show(label)

    def remove(self, task: Any) -> None:
        self.tasks.pop(task, None)

    def _show(self, label: str) -> None:
        known = [(d, t) for _, d, t in self.tasks.values() if t is not None]
        total = sum(t for _, t in known)
        self.tell(label, sum(d for d, _ in known), total or None)


def _hitrate(ctx: _Context, tell: Tell, suite_notes: list[str]) -> list[Path]:
    from kvferry.bench.hitrate import HitRateOptions, write_json
    from kvferry.bench.hitrate import run as run_hitrate
    from kvferry.bench.plots import plot_hitrate

    p = ctx.plan
    reference = "mooncake-fig9"
    options = HitRateOptions(
        trace="mooncake-synthetic",
        policies=["lru", "length-aware"],
        capacities=list(p.hitrate_capacities),
        model_kv="32,8,128,bf16",
        target_hit_rate=p.hitrate_target,
        reference=reference,
    )
    report = run_hitrate(options, _HitRateBars(tell))
    report.command = ctx.options.command
    path = ctx.out / "hitrate.json"
    write_json(path, report)
    figure = ctx.out / "hitrate.png"
    plot_hitrate(str(figure), report, weighting="token", reference_label=reference)
    return [path, figure]


def _serve(ctx: _Context, tell: Tell, suite_notes: list[str]) -> list[Path]:
    from kvferry.bench.endpoint.export import plot_sweep
    from kvferry.bench.endpoint.harness import ProgressUpdate, ServeBenchOptions
    from kvferry.bench.endpoint.harness import run as run_serve
    from kvferry.bench.router.fleet import ServeProcess

    p = ctx.plan

    def progress(u: ProgressUpdate) -> None:
        tell(f"{u.level.label} {u.phase}", u.done, u.total)

    tell("starting kvferry serve mock", 0, None)
    with ServeProcess("mock", ["--speedup-ratio", f"{p.serve_speedup:g}"]) as mock:
        options = ServeBenchOptions(
            url=mock.url,
            concurrency=p.serve_concurrency,
            request_count=p.serve_requests,
            duration_s=p.serve_duration,
            isl=p.serve_isl,
            osl=p.serve_osl,
        )
        report = run_serve(options, progress)
    report.command = ctx.options.command
    extra = [
        f"against kvferry serve mock (simulated engine, no model) at speedup "
        f"{p.serve_speedup:g}: its timing model (an 8B bf16 model on one H100-class GPU) "
        f"divided by {p.serve_speedup:g}"
    ]
    path = _finish(report, ctx, ctx.out / "serve.json", extra)
    # the figures go to a directory of their own: plot_sweep names the run after it
    figures = plot_sweep(report, ctx.out / "serve")
    failed = [r.level.label for r in report.cases if r.metrics.request_count == 0]
    if failed:
        raise KvferryError(f"every request failed at {', '.join(failed)}")
    return [path, *figures]


def _router(ctx: _Context, tell: Tell, suite_notes: list[str]) -> list[Path]:
    from kvferry.bench.router.harness import RouterBenchOptions, RouterProgress
    from kvferry.bench.router.harness import run as run_router
    from kvferry.bench.router.plot import plot_router

    p = ctx.plan
    options = RouterBenchOptions(
        workers=2,
        num_blocks=256,
        speedup_ratio=100.0,
        policies=("kv", "round-robin"),
        prefix_ratios=p.router_ratios,
        groups=4,
        isl=256,
        osl=4,
        requests=p.router_requests,
        rate=50.0,
    )

    def progress(u: RouterProgress) -> None:
        what = f"ratio {u.label} {u.policy}: {u.phase}"
        if u.serve is not None and u.phase == "running":
            tell(what, u.index + u.serve.done / max(1, u.serve.total or 1), u.total)
        else:
            tell(what, u.index + (1 if u.phase == "done" else 0), u.total)

    report = run_router(options, progress)
    report.command = ctx.options.command
    path = _finish(report, ctx, ctx.out / "router.json")
    figure = ctx.out / "router.png"
    plot_router(report, figure)
    failed = [c for c in report.cases if c.requests == 0]
    if failed:
        raise KvferryError(f"every request failed in {failed[0].label}, {failed[0].policy}")
    return [path, figure]


_STEP_RUNNERS: dict[str, Callable[[_Context, Tell, list[str]], list[Path]]] = {
    "doctor": _doctor,
    "transfer": _transfer,
    "store": _store,
    "hitrate": _hitrate,
    "serve": _serve,
    "router": _router,
}


_OUTPUTS = {
    "doctor": ("doctor.json",),
    "transfer": ("transfer.json",),
    "store": ("store-cpu.json", "store-server.json"),
    "hitrate": ("hitrate.json", "hitrate.png"),
    "serve": ("serve.json", "serve/ttft_itl_vs_concurrency.png",
              "serve/throughput_vs_concurrency.png", "serve/pareto.png"),
    "router": ("router.json", "router.png"),
}  # fmt: skip
"""The files each step writes, relative to the run directory."""


def _outputs(out: Path, step: str) -> list[Path]:
    return [out / name for name in _OUTPUTS[step]]


def run(options: SuiteOptions, progress: SuiteProgressFn | None = None) -> SuiteResult:
    """Run every step of ``options`` in order, each writing into ``options.out``.

    A step that raises a :class:`~kvferry.errors.KvferryError` is recorded
    (:attr:`StepResult.error`, with the files it wrote before it failed) and the run goes on;
    the caller decides what a failed step means (``kvferry bench all`` exits non-zero).

    Args:
        options: the run.
        progress: called in this thread as steps start and advance.

    Returns:
        What each step wrote, how long it took, and the notes of the run (how to add
        Mooncake when it is absent).

    Raises:
        ConfigError: ``options.out`` cannot be made a directory.
    """
    out = options.out
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {str(out)!r}: cannot make the directory: {e.strerror}") from e
    steps = [s for s in STEPS if s in options.steps]
    ctx = _Context(options, options.plan, out)
    result = SuiteResult(out=out, started_at=time.time())
    for index, step in enumerate(steps):
        where = SuiteProgress(step, index, len(steps))

        def tell(detail: str, done: float, total: float | None, at: SuiteProgress = where) -> None:
            if progress is not None:
                progress(replace(at, detail=detail, done=done, total=total))

        tell("starting", 0, None)
        started = time.monotonic()
        record = StepResult(step)
        # An earlier run's files of this step go first: a file in the directory is this run's.
        for path in _outputs(out, step):
            with contextlib.suppress(FileNotFoundError, NotADirectoryError):
                path.unlink()
        try:
            record.files = _STEP_RUNNERS[step](ctx, tell, result.notes)
        except KvferryError as e:  # one step's failure: recorded, the next step runs
            record.error = str(e)
            record.files = [p for p in _outputs(out, step) if p.exists()]
        record.seconds = time.monotonic() - started
        result.steps.append(record)
    result.ended_at = time.time()
    return result
