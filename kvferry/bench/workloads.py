"""Synthetic request traces for the hit-rate lab, written in the Mooncake format.

Owns four seeded workload generators, the registry :data:`WORKLOADS` that names them and
:func:`write_jsonl`. It must not read, replay or analyse traces (:mod:`kvferry.bench.traces`
does) and does no I/O besides :func:`write_jsonl`.

A record is a dict with exactly ``timestamp`` (whole ms since the first request, non-decreasing in
output order), ``input_length`` and ``output_length`` (tokens) and ``hash_ids``, one id per
``block_tokens``-token block of the prompt, so ``len(hash_ids) == ceil(input_length /
block_tokens)`` always and every generated trace reads back through
:func:`kvferry.bench.traces.read_trace` with no problems. The id rules, common to all workloads:

- Equal ids mean an equal block *and* an equal prefix before it: ids form prefix chains.
- Only whole blocks are shared. A shared prefix that ends inside a block makes that block a new id.
- A new id is the next unused integer, starting at 0, in output order: ids are dense, they first
  appear as 0, 1, 2, ..., so a trace's distinct ids number its largest id + 1.
- The same options give byte-identical output. Arrival times come from a random stream of their
  own (token lengths, groups and orders from another, both derived from ``seed``), so changing a
  rate moves the same requests in time.

Options of every workload: ``block_tokens`` (tokens per hash id, default 512) and ``seed``
(int >= 0, default 0). Counts and token lengths are whole numbers >= 1 unless said otherwise;
rates, times and stddevs are finite numbers >= 0. A bad option raises
:class:`~kvferry.errors.ConfigError` naming it, its value and what is valid. A length with a
``*_stddev`` option is drawn from a normal distribution with that standard deviation in tokens
(default 0: fixed), rounded and clipped to >= 1. Poisson arrivals at a rate: the first at 0 ms,
then exponential gaps of mean 1/rate; rate 0 puts all at 0 ms. ``prefix-ratio`` and
``long-doc-qa`` stream their records; ``multi-turn`` and ``agent`` plan every arrival in memory
first (a small tuple per request) to merge the sessions by time.

``prefix-ratio``: N groups of requests, each group sharing one prompt prefix (a system prompt or
few-shot template per tenant). Mirrors Dynamo's router benchmark
(``benchmarks/router/prefix_ratio_benchmark.py``) and aiperf's shared-prefix synthetic prompts.
Each request picks a group uniformly; its first ``floor(prefix_ratio * isl / block_tokens)``
blocks are the group's prefix ids, the same for every request of the group (a request drawn
shorter shares only its whole blocks of it); the rest are new ids. The floor is taken of the
exact decimal value (0.3 of 5120 tokens is 1536 tokens, never 1535.99...).

- ``num_groups``: prefix groups (default 4).
- ``prefix_ratio``: fraction of ``isl`` that is the group's prefix, in [0, 1] (default 0.5).
- ``isl``, ``isl_stddev``: input tokens per request (default 4096, stddev 0).
- ``osl``, ``osl_stddev``: output tokens per request (default 256, stddev 0).
- ``requests``: requests in the trace (default 1000).
- ``request_rate``: requests per second, Poisson (default 10).

``multi-turn``: multi-round chat. Mirrors LMCache's multi-round QA benchmark
(``benchmarks/multi-round-qa``) and vLLM's multi-turn serving benchmark. Every session starts
with the same system prompt; turn 1's input is the system prompt + a user message, turn k's is
turn k-1's input + turn k-1's output + a new user message. Turn k's ids reuse turn k-1's first
``floor(input_length(k-1) / block_tokens)`` ids (turn 1: the first
``floor(system_tokens / block_tokens)`` system ids, shared by all sessions), then new ids.

- ``sessions``: chat sessions (default 50).
- ``turns``: turns per session (default 5).
- ``system_tokens``: system prompt shared by all sessions, tokens (default 1024; 0 = none).
- ``user_tokens``, ``user_tokens_stddev``: new user tokens per turn (default 512, stddev 0).
- ``osl``, ``osl_stddev``: output tokens per turn (default 256, stddev 0).
- ``think_time``: seconds from a turn's arrival to the next turn of its session, exponential
  with this mean (default 5.0; 0 = at once).
- ``session_rate``: sessions starting per second, Poisson (default 1).

``agent``: agent/tool-calling loops: a long tools prompt shared by every session, many steps
each appending a tool result, short outputs. No single peer tool; it has the shape of agentic
(SWE-bench style) traces. The context grows as in ``multi-turn``: step 1's input is the tools
prompt + one tool result (the task), step k's is step k-1's input + output + a new tool result,
with the same id reuse.

- ``sessions``: agent sessions (default 20).
- ``steps``: steps per session (default 10).
- ``tools_tokens``: system + tool definitions prompt shared by all sessions, tokens
  (default 4096; 0 = none).
- ``tool_result_tokens``, ``tool_result_tokens_stddev``: tokens appended per step
  (default 256, stddev 0).
- ``osl``, ``osl_stddev``: output tokens per step (default 64, stddev 0).
- ``step_delay``: seconds from a step's arrival to the next step of its session, exponential
  with this mean (default 0.5; 0 = at once).
- ``session_rate``: sessions starting per second, Poisson (default 0.5).

``long-doc-qa``: many questions about a few long documents. Mirrors LMCache's and vLLM's long
document QA benchmarks (``benchmark_long_document_qa_throughput.py``). A request is a document
followed by a question: its first ``floor(doc_tokens / block_tokens)`` ids are the document's,
shared by every question on it; the document's partial last block (with the question) and the
question's blocks are new ids.

- ``documents``: documents (default 10).
- ``doc_tokens``: tokens per document (default 16384).
- ``questions``: questions per document (default 20).
- ``question_tokens``: tokens per question (default 64).
- ``osl``: output tokens per request (default 128).
- ``order``: ``random`` (default; all (document, question) pairs shuffled) or ``sequential``
  (document by document).
- ``request_rate``: requests per second, Poisson (default 5).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, fields
from fractions import Fraction
from typing import Any, ClassVar, Generic, TextIO, TypedDict, TypeVar

from kvferry.bench.traces import DEFAULT_BLOCK_TOKENS
from kvferry.errors import ConfigError


class Record(TypedDict):
    """One request of a Mooncake-format trace, in the order the format writes its fields."""

    timestamp: int
    input_length: int
    output_length: int
    hash_ids: list[int]


_T = TypeVar("_T")


def _option(default: _T, metavar: str, help: str, *, choices: tuple[str, ...] = ()) -> _T:
    """A dataclass field with what the CLI shows: a metavar naming the unit and a one-line help."""
    return field(default=default, metadata={"metavar": metavar, "help": help, "choices": choices})


@dataclass(frozen=True, kw_only=True)
class WorkloadOptions:
    """Options every workload takes; validated when built (a bad one raises ConfigError)."""

    workload: ClassVar[str] = ""
    common: ClassVar[tuple[str, ...]] = ("block_tokens", "seed")

    block_tokens: int = _option(DEFAULT_BLOCK_TOKENS, "TOKENS", "tokens per hash id")
    seed: int = _option(0, "N", "seed of the random streams (>= 0); same seed, same trace")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every option's type and range.

        Raises:
            ConfigError: naming the workload, the option (and its flag), the value and what
                would be valid.
        """
        self._int("block_tokens", 1)
        self._int("seed", 0)  # Random(-n) is Random(n): negative seeds would repeat traces

    def _fail(self, name: str, valid: str) -> ConfigError:
        flag = "--" + name.replace("_", "-")
        value = getattr(self, name)
        return ConfigError(
            f"workload {self.workload}: {name} ({flag}) must be {valid}, got {value!r}"
        )

    def _int(self, name: str, minimum: int) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self._fail(name, f"a whole number >= {minimum}")

    def _float(self, name: str, valid: str, ok: Callable[[float], bool]) -> None:
        value = getattr(self, name)
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or not ok(value):
            raise self._fail(name, valid)

    def _nonnegative(self, *names: str) -> None:
        for name in names:
            self._float(name, "a finite number >= 0", lambda v: v >= 0)


@dataclass(frozen=True, kw_only=True)
class PrefixRatioOptions(WorkloadOptions):
    """``prefix-ratio``: groups of requests sharing a prefix (see the module docstring)."""

    workload: ClassVar[str] = "prefix-ratio"

    num_groups: int = _option(4, "N", "prefix groups; each request picks one uniformly")
    prefix_ratio: float = _option(
        0.5, "RATIO", "fraction of --isl that is the group's prefix, in [0, 1]"
    )
    isl: int = _option(4096, "TOKENS", "input tokens per request")
    isl_stddev: float = _option(0.0, "TOKENS", "stddev of --isl (normal, clipped to >= 1)")
    osl: int = _option(256, "TOKENS", "output tokens per request")
    osl_stddev: float = _option(0.0, "TOKENS", "stddev of --osl (normal, clipped to >= 1)")
    requests: int = _option(1000, "N", "requests in the trace")
    request_rate: float = _option(10.0, "PER_S", "requests per second, Poisson; 0 = all at 0 ms")

    def validate(self) -> None:
        super().validate()
        self._int("num_groups", 1)
        self._float("prefix_ratio", "a number in [0, 1]", lambda v: 0.0 <= v <= 1.0)
        for name in ("isl", "osl", "requests"):
            self._int(name, 1)
        self._nonnegative("isl_stddev", "osl_stddev", "request_rate")


@dataclass(frozen=True, kw_only=True)
class MultiTurnOptions(WorkloadOptions):
    """``multi-turn``: chat sessions whose context grows turn by turn (module docstring)."""

    workload: ClassVar[str] = "multi-turn"

    sessions: int = _option(50, "N", "chat sessions")
    turns: int = _option(5, "N", "turns per session")
    system_tokens: int = _option(1024, "TOKENS", "system prompt shared by all sessions (0 = none)")
    user_tokens: int = _option(512, "TOKENS", "new user tokens per turn")
    user_tokens_stddev: float = _option(
        0.0, "TOKENS", "stddev of --user-tokens (normal, clipped to >= 1)"
    )
    osl: int = _option(256, "TOKENS", "output tokens per turn")
    osl_stddev: float = _option(0.0, "TOKENS", "stddev of --osl (normal, clipped to >= 1)")
    think_time: float = _option(
        5.0, "SECONDS", "mean time between turns of a session (exponential)"
    )
    session_rate: float = _option(
        1.0, "PER_S", "sessions starting per second, Poisson; 0 = all at 0 ms"
    )

    def validate(self) -> None:
        super().validate()
        for name in ("sessions", "turns", "user_tokens", "osl"):
            self._int(name, 1)
        self._int("system_tokens", 0)
        self._nonnegative("user_tokens_stddev", "osl_stddev", "think_time", "session_rate")


@dataclass(frozen=True, kw_only=True)
class AgentOptions(WorkloadOptions):
    """``agent``: tool-calling loops over a long shared tools prompt (module docstring)."""

    workload: ClassVar[str] = "agent"

    sessions: int = _option(20, "N", "agent sessions")
    steps: int = _option(10, "N", "steps per session")
    tools_tokens: int = _option(4096, "TOKENS", "system + tool definitions shared by all sessions")
    tool_result_tokens: int = _option(256, "TOKENS", "tool result appended per step")
    tool_result_tokens_stddev: float = _option(
        0.0, "TOKENS", "stddev of --tool-result-tokens (normal, clipped to >= 1)"
    )
    osl: int = _option(64, "TOKENS", "output tokens per step")
    osl_stddev: float = _option(0.0, "TOKENS", "stddev of --osl (normal, clipped to >= 1)")
    step_delay: float = _option(
        0.5, "SECONDS", "mean time between steps of a session (exponential)"
    )
    session_rate: float = _option(
        0.5, "PER_S", "sessions starting per second, Poisson; 0 = all at 0 ms"
    )

    def validate(self) -> None:
        super().validate()
        for name in ("sessions", "steps", "tool_result_tokens", "osl"):
            self._int(name, 1)
        self._int("tools_tokens", 0)
        self._nonnegative("tool_result_tokens_stddev", "osl_stddev", "step_delay", "session_rate")


@dataclass(frozen=True, kw_only=True)
class LongDocQAOptions(WorkloadOptions):
    """``long-doc-qa``: many questions about a few long documents (module docstring)."""

    workload: ClassVar[str] = "long-doc-qa"
    orders: ClassVar[tuple[str, ...]] = ("random", "sequential")

    documents: int = _option(10, "N", "documents")
    doc_tokens: int = _option(16384, "TOKENS", "tokens per document")
    questions: int = _option(20, "N", "questions per document")
    question_tokens: int = _option(64, "TOKENS", "tokens per question")
    osl: int = _option(128, "TOKENS", "output tokens per request")
    order: str = _option(
        "random",
        "ORDER",
        "random: all (document, question) pairs shuffled; sequential: document by document",
        choices=orders,
    )
    request_rate: float = _option(5.0, "PER_S", "requests per second, Poisson; 0 = all at 0 ms")

    def validate(self) -> None:
        super().validate()
        for name in ("documents", "doc_tokens", "questions", "question_tokens", "osl"):
            self._int(name, 1)
        if self.order not in self.orders:
            raise self._fail("order", " or ".join(repr(o) for o in self.orders))
        self._nonnegative("request_rate")


# -- generation ----------------------------------------------------------------------------------


class _Ids:
    """Hands out new ids: the next unused integers, from 0, so ids are dense in output order."""

    def __init__(self) -> None:
        self.next = 0

    def take(self, count: int) -> list[int]:
        start = self.next
        self.next += count
        return list(range(start, self.next))


def _streams(seed: int) -> tuple[random.Random, random.Random]:
    """(content, arrivals) random streams. Arrivals have their own, so a rate change moves the
    same requests in time. A str seed is hashed with SHA-512: stable across runs and platforms."""
    return random.Random(seed), random.Random(f"kvferry-workload-arrivals:{seed}")


def _length(rng: random.Random, mean: int, stddev: float) -> int:
    """``mean`` tokens, or a normal draw around it rounded and clipped to >= 1."""
    if stddev <= 0:
        return mean
    return max(1, round(rng.gauss(mean, stddev)))


def _gap(rng: random.Random, mean_s: float) -> float:
    """Exponential gap of mean ``mean_s`` seconds; 0 when the mean is 0."""
    return rng.expovariate(1.0 / mean_s) if mean_s > 0 else 0.0


def _poisson_s(rng: random.Random, rate: float) -> Iterator[float]:
    """Arrival times in seconds: 0, then exponential gaps of mean 1/rate (all 0 when rate is 0)."""
    t = 0.0
    mean = 1.0 / rate if rate > 0 else 0.0
    while True:
        yield t
        t += _gap(rng, mean)


def _ms(seconds: float) -> int:
    # Rounding is monotone, so sorted seconds stay sorted as whole ms.
    return round(seconds * 1000.0)


def _blocks(tokens: int, block_tokens: int) -> int:
    return -(-tokens // block_tokens)


def prefix_ratio(options: PrefixRatioOptions) -> Iterator[Record]:
    """The ``prefix-ratio`` trace, streamed; see the module docstring."""
    bt = options.block_tokens
    content, arrivals = _streams(options.seed)
    times = _poisson_s(arrivals, options.request_rate)
    # Exact decimal arithmetic: 0.3 of 5120 tokens is 1536, never 1535.99... rounded down.
    prefix_blocks = math.floor(Fraction(repr(options.prefix_ratio)) * options.isl / bt)
    ids = _Ids()
    # A group's prefix chain grows on demand, so ids stay dense when a short request comes first.
    prefixes: list[list[int]] = [[] for _ in range(options.num_groups)]
    for _ in range(options.requests):
        group = prefixes[content.randrange(options.num_groups)]
        isl = _length(content, options.isl, options.isl_stddev)
        osl = _length(content, options.osl, options.osl_stddev)
        shared = min(prefix_blocks, isl // bt)
        if len(group) < shared:
            group.extend(ids.take(shared - len(group)))
        yield {
            "timestamp": _ms(next(times)),
            "input_length": isl,
            "output_length": osl,
            "hash_ids": group[:shared] + ids.take(_blocks(isl, bt) - shared),
        }


def _conversations(
    *,
    sessions: int,
    rounds: int,
    shared_tokens: int,
    new_tokens: int,
    new_stddev: float,
    osl: int,
    osl_stddev: float,
    delay_s: float,
    session_rate: float,
    block_tokens: int,
    seed: int,
) -> Iterator[Record]:
    """Sessions whose context grows each round by the last output and ``new_tokens`` more.

    The arrival plan (time, session, input and output lengths) is built in memory and sorted
    stably by whole ms, since sessions interleave; ids are assigned while streaming the sorted
    plan, so they stay dense in output order and only live sessions' ids are held.
    """
    content, arrivals = _streams(seed)
    starts = _poisson_s(arrivals, session_rate)
    plan: list[tuple[int, int, int, int, int]] = []  # (ms, session, round, input, output)
    for session in range(sessions):
        t = next(starts)
        context = shared_tokens
        for round_ in range(rounds):
            if round_:
                t += _gap(arrivals, delay_s)
            isl = context + _length(content, new_tokens, new_stddev)
            out = _length(content, osl, osl_stddev)
            plan.append((_ms(t), session, round_, isl, out))
            context = isl + out
    plan.sort(key=lambda p: p[0])  # stable: a session's rounds keep their order on equal ms

    bt = block_tokens
    ids = _Ids()
    shared: list[int] | None = None
    # Live sessions only: a session's ids are dropped after its last round.
    last: dict[int, tuple[list[int], int]] = {}  # session -> (last hash_ids, last input_length)
    for ms, session, round_, isl, out in plan:
        if round_ == 0:
            if shared is None:
                shared = ids.take(shared_tokens // bt)
            keep = shared
        else:
            previous_ids, previous_isl = last.pop(session)
            keep = previous_ids[: previous_isl // bt]
        hash_ids = keep + ids.take(_blocks(isl, bt) - len(keep))
        if round_ + 1 < rounds:
            last[session] = (hash_ids, isl)
        yield {"timestamp": ms, "input_length": isl, "output_length": out, "hash_ids": hash_ids}


def multi_turn(options: MultiTurnOptions) -> Iterator[Record]:
    """The ``multi-turn`` trace, sorted by timestamp; see the module docstring."""
    return _conversations(
        sessions=options.sessions,
        rounds=options.turns,
        shared_tokens=options.system_tokens,
        new_tokens=options.user_tokens,
        new_stddev=options.user_tokens_stddev,
        osl=options.osl,
        osl_stddev=options.osl_stddev,
        delay_s=options.think_time,
        session_rate=options.session_rate,
        block_tokens=options.block_tokens,
        seed=options.seed,
    )


def agent(options: AgentOptions) -> Iterator[Record]:
    """The ``agent`` trace, sorted by timestamp; see the module docstring."""
    return _conversations(
        sessions=options.sessions,
        rounds=options.steps,
        shared_tokens=options.tools_tokens,
        new_tokens=options.tool_result_tokens,
        new_stddev=options.tool_result_tokens_stddev,
        osl=options.osl,
        osl_stddev=options.osl_stddev,
        delay_s=options.step_delay,
        session_rate=options.session_rate,
        block_tokens=options.block_tokens,
        seed=options.seed,
    )


def long_doc_qa(options: LongDocQAOptions) -> Iterator[Record]:
    """The ``long-doc-qa`` trace, streamed; see the module docstring."""
    bt = options.block_tokens
    content, arrivals = _streams(options.seed)
    times = _poisson_s(arrivals, options.request_rate)
    pairs = [(d, q) for d in range(options.documents) for q in range(options.questions)]
    if options.order == "random":
        content.shuffle(pairs)
    isl = options.doc_tokens + options.question_tokens
    total_blocks = _blocks(isl, bt)
    ids = _Ids()
    docs: dict[int, list[int]] = {}  # allocated at first use, so ids are dense in output order
    for doc, _question in pairs:
        doc_ids = docs.get(doc)
        if doc_ids is None:
            doc_ids = docs[doc] = ids.take(options.doc_tokens // bt)
        yield {
            "timestamp": _ms(next(times)),
            "input_length": isl,
            "output_length": options.osl,
            "hash_ids": doc_ids + ids.take(total_blocks - len(doc_ids)),
        }


# -- registry ------------------------------------------------------------------------------------

_O = TypeVar("_O", bound=WorkloadOptions)


@dataclass(frozen=True)
class OptionInfo:
    """One option of a workload, as the CLI shows it."""

    name: str
    default: int | float | str
    metavar: str
    """What the value is, its unit when it has one (TOKENS, SECONDS, PER_S, N)."""
    help: str
    """One line, unit included."""
    choices: tuple[str, ...]
    """The allowed values of a string option; () when any value goes."""
    common: bool
    """Taken by every workload (``block_tokens``, ``seed``)."""


@dataclass(frozen=True)
class WorkloadSpec(Generic[_O]):
    """A named workload: its options class and its generator."""

    name: str
    summary: str
    """One line, for listings."""
    description: str
    """A few sentences: what it models, how ids are shared, which peer tool it mirrors."""
    options_type: type[_O]
    generator: Callable[[_O], Iterator[Record]]

    def option_infos(self) -> list[OptionInfo]:
        """This workload's options, its own first, then the common ones."""
        infos = [
            OptionInfo(
                name=f.name,
                default=f.default,  # type: ignore[arg-type]  # every option has a default
                metavar=str(f.metadata["metavar"]),
                help=str(f.metadata["help"]),
                choices=tuple(f.metadata["choices"]),
                common=f.name in WorkloadOptions.common,
            )
            for f in fields(self.options_type)
        ]
        return [i for i in infos if not i.common] + [i for i in infos if i.common]

    def options(self, **values: object) -> _O:
        """Build (and validate) this workload's options; unset ones keep their defaults.

        Raises:
            ConfigError: an unknown option name, or a bad value.
        """
        known = [f.name for f in fields(self.options_type)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(
                f"workload {self.name} has no option {unknown[0]!r}; its options are "
                f"{', '.join(known)}"
            )
        return self.options_type(**values)  # type: ignore[arg-type]  # checked by validate()

    def generate(self, **values: object) -> Iterator[Record]:
        """Records of this workload with these options (validated before the first record)."""
        return self.generator(self.options(**values))


WORKLOADS: dict[str, WorkloadSpec[Any]] = {
    spec.name: spec
    for spec in (
        WorkloadSpec(
            "prefix-ratio",
            "N groups sharing a prompt prefix of a set ratio (Dynamo router benchmark, aiperf)",
            "Each request picks one of --num-groups groups uniformly; its first "
            "floor(prefix_ratio * isl / block_tokens) blocks are the group's prefix, the same "
            "for the whole group, and the rest are new. Mirrors Dynamo's router benchmark "
            "(prefix_ratio_benchmark.py) and aiperf's shared-prefix synthetic prompts.",
            PrefixRatioOptions,
            prefix_ratio,
        ),
        WorkloadSpec(
            "multi-turn",
            "chat sessions: shared system prompt, each turn extends the last (LMCache, vLLM)",
            "Every session starts with the shared system prompt plus a user message; turn k's "
            "input is turn k-1's input + its output + a new user message, and reuses turn k-1's "
            "whole blocks. Mirrors LMCache's multi-round QA and vLLM's multi-turn benchmarks.",
            MultiTurnOptions,
            multi_turn,
        ),
        WorkloadSpec(
            "agent",
            "tool loops: long shared tools prompt, many short steps extending the context",
            "Every session starts with the shared tools prompt plus a task; step k's input is "
            "step k-1's input + its output + a tool result, and reuses step k-1's whole blocks. "
            "No single peer tool: the shape of agentic (SWE-bench style) traces.",
            AgentOptions,
            agent,
        ),
        WorkloadSpec(
            "long-doc-qa",
            "many questions per long document (LMCache/vLLM long document QA benchmark)",
            "Each request is one document followed by one question; the document's whole "
            "blocks are shared by all its questions, the rest are new. Mirrors the LMCache and "
            "vLLM long document QA benchmarks.",
            LongDocQAOptions,
            long_doc_qa,
        ),
    )
}
"""Workload name -> spec. Each options class's fields are its options (with help and default)."""


def get_workload(name: str) -> WorkloadSpec[Any]:
    """The spec of workload ``name``.

    Raises:
        ConfigError: no workload has that name; the message lists those that do.
    """
    spec = WORKLOADS.get(name)
    if spec is None:
        raise ConfigError(f"unknown workload {name!r}; choose one of {', '.join(WORKLOADS)}")
    return spec


def generate(name: str, **options: object) -> Iterator[Record]:
    """Records of workload ``name``, e.g. ``generate("multi-turn", sessions=10, seed=1)``.

    Args:
        name: a key of :data:`WORKLOADS`.
        options: fields of that workload's options class; unset ones keep their defaults.

    Returns:
        An iterator of records in output order (timestamps non-decreasing).

    Raises:
        ConfigError: unknown workload or option, or a bad value (checked before the first record).
    """
    return get_workload(name).generate(**options)


def write_jsonl(records: Iterable[Record], file: TextIO) -> int:
    """Write one compact JSON object per line to ``file``; return how many were written."""
    count = 0
    for record in records:
        file.write(json.dumps(record, separators=(",", ":")))
        file.write("\n")
        count += 1
    return count


@dataclass
class Tally:
    """Counts what passes through :meth:`count`: requests, blocks and distinct ids.

    Distinct ids are the largest id + 1, which holds for this module's traces (ids are dense in
    output order) and needs no set of every id seen.
    """

    requests: int = 0
    blocks: int = 0
    distinct: int = 0

    def count(self, records: Iterable[Record]) -> Iterator[Record]:
        """Yield ``records`` unchanged, counting them."""
        for record in records:
            ids = record["hash_ids"]
            self.requests += 1
            self.blocks += len(ids)
            if ids:
                self.distinct = max(self.distinct, max(ids) + 1)
            yield record

    @property
    def ideal_hit_rate(self) -> float:
        """Block-weighted ideal hit rate (infinite cache): ``1 - distinct / blocks``."""
        return 1.0 - self.distinct / self.blocks if self.blocks else 0.0
