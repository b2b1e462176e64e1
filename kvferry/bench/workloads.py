"""Synthetic request traces for the hit-rate lab, written in the Mooncake format.

Owns the four seeded workloads' options, the registry :data:`WORKLOADS` that names them with
their generators (:mod:`kvferry.bench.generators`), the one parser of a workload spec
``NAME[:KEY=VALUE,...]`` (:func:`parse_workload`) and :func:`write_jsonl`. It must not read,
replay or analyse traces (:mod:`kvferry.bench.traces` does) and does no I/O besides
:func:`write_jsonl`.

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

import contextlib
import json
import math
import typing
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Generic, TextIO, TypedDict, TypeVar

from kvferry.bench.generators import agent, long_doc_qa, multi_turn, prefix_ratio
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


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def parse_workload(text: str, **defaults: object) -> tuple[WorkloadSpec[Any], WorkloadOptions]:
    """Read a workload spec ``NAME[:KEY=VALUE,...]`` (``multi-turn:sessions=20,turns=8``): the
    one parser of ``--workload`` (the hit-rate lab and ``bench serve`` read it here).

    A key is an option's name (``-`` or ``_``); a value is read as the option's type: a whole
    number, a number, one of its choices, or a boolean (true/false, 1/0, yes/no, on/off).
    ``defaults`` (e.g. ``block_tokens=16``) apply where the spec gives no value.

    Returns:
        The workload and its validated options.

    Raises:
        ConfigError: an unknown workload or key, an item that is not KEY=VALUE, a key given
            twice, or a bad value; one line naming the key and what it accepts.
    """
    name, _, rest = text.partition(":")
    spec = get_workload(name.strip())
    known = [i.name for i in spec.option_infos()]
    types = typing.get_type_hints(spec.options_type)
    given: dict[str, object] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or key not in known:
            raise ConfigError(
                f"workload {text!r}: {item!r} is not KEY=VALUE with KEY one of {', '.join(known)}"
            )
        if key in given:
            raise ConfigError(f"workload {text!r}: {key} is given twice")
        given[key] = _value(text, key, types[key], value.strip())
    return spec, spec.options(**{**defaults, **given})


def _value(text: str, key: str, kind: Any, value: str) -> object:
    if kind is bool:
        if value.lower() in _TRUE + _FALSE:
            return value.lower() in _TRUE
        accepted = "true or false (1/0, yes/no, on/off)"
    else:
        with contextlib.suppress(ValueError):
            return kind(value)
        accepted = {int: "a whole number", float: "a number"}.get(kind, kind.__name__)
    raise ConfigError(f"workload {text!r}: {key} must be {accepted}, got {value!r}")


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
