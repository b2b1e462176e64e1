"""The generators of :mod:`kvferry.bench.workloads`: one function per workload, its validated
options in, Mooncake-format records out.

Owns the id allocation, the random streams and the arrival processes, and follows the rules
:mod:`kvferry.bench.workloads` documents (ids form dense prefix chains, the same options give
byte-identical output, arrivals have a random stream of their own). Callers reach them through
that module's registry (:data:`~kvferry.bench.workloads.WORKLOADS`, ``generate``); this module
validates nothing and does no I/O.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from fractions import Fraction
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the options classes import this module's functions into their registry
    from kvferry.bench.workloads import (
        AgentOptions,
        LongDocQAOptions,
        MultiTurnOptions,
        PrefixRatioOptions,
        Record,
    )

__all__ = ["agent", "long_doc_qa", "multi_turn", "prefix_ratio"]


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
