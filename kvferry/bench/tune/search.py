"""The tuner's search: coordinate descent over knobs, every step a same-run comparison.

Owns :func:`coordinate_search` and the verdict rule :func:`helped`. The search starts from the
current config (``best`` = no change), and for each knob in turn measures each of its values
against ``best`` with a caller-given ``measure(best, candidate) -> ratios``: one ratio per
round, candidate over best, measured in alternating rounds of one run (the transfer bench's
contenders, the store bench's alternating pairs). A value is adopted only when :func:`helped`
says every round improved and the median by at least ``min_gain``, so a winner is a same-run
ratio beyond the noise, not a lucky minute. The search stops when every knob has been tried, or
when the next measurement would overrun ``budget_s`` (the mean cost so far predicts it); what
was not tried is listed. It never adopts an unmeasured value: the result's ``best`` holds only
values that won a measurement.

The measuring is the caller's, so tests drive the search with a synthetic objective whose
optimum is known (``tests/bench/test_tune.py``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from kvferry.errors import ConfigError

__all__ = ["MIN_GAIN", "SearchResult", "Step", "coordinate_search", "helped"]

MIN_GAIN = 0.05
"""The median gain a candidate needs on top of winning every round: rounds seconds apart
share the machine's state, so a 1-2% edge in every round is still within what a minute later
can undo (the report's ``MIN_BAND``)."""

Overrides = dict[str, str]
Measure = Callable[[Overrides, Overrides], list[float]]
"""``measure(best, candidate)``: per-round ratios of candidate over best (higher is better when
the objective is, lower otherwise)."""


def helped(ratios: Sequence[float], higher_better: bool, min_gain: float = MIN_GAIN) -> bool:
    """Every round improved and the median by at least ``min_gain``."""
    if not ratios:
        return False
    median = statistics.median(ratios)
    if higher_better:
        return min(ratios) > 1.0 and median >= 1.0 + min_gain
    return max(ratios) < 1.0 and median <= 1.0 / (1.0 + min_gain)


@dataclass
class Step:
    """One candidate measured against the best so far."""

    knob: str
    value: str
    against: Overrides
    """The best config it was measured against (its overrides of the start)."""
    ratios: list[float]
    adopted: bool
    seconds: float

    @property
    def median(self) -> float:
        return statistics.median(self.ratios) if self.ratios else float("nan")


@dataclass
class SearchResult:
    best: Overrides
    """The winning overrides of the start config (empty: nothing beat it)."""
    steps: list[Step] = field(default_factory=list)
    untried: list[tuple[str, str]] = field(default_factory=list)
    """(knob, value) pairs the budget left unmeasured."""
    seconds: float = 0.0


def coordinate_search(
    space: Mapping[str, Sequence[str]],
    measure: Measure,
    *,
    higher_better: bool,
    budget_s: float,
    start: Mapping[str, str] | None = None,
    min_gain: float = MIN_GAIN,
    on_step: Callable[[Step, int, int], None] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> SearchResult:
    """Try each value of each knob of ``space`` against the best so far (module docstring).

    Args:
        space: knob (dotted config key) -> values to try, in order; a value equal to the
            knob's current one (in ``start``) is skipped.
        measure: per-round ratios of a candidate over the best.
        higher_better: the objective's direction.
        budget_s: stop before a measurement that the mean cost so far says would overrun it.
        start: the overrides the search starts from (their values count as current).
        on_step: called after each measurement with the step, its index and the total.

    Raises:
        ConfigError: an empty space or a budget that is not positive.
    """
    if not space or not any(space.values()):
        raise ConfigError("nothing to tune: the search space has no knob with values")
    if not budget_s > 0:
        raise ConfigError(f"--budget {budget_s:g} is invalid: must be above 0 seconds")
    began = clock()
    best: Overrides = dict(start or {})
    plan = [(k, str(v)) for k, values in space.items() for v in values]
    result = SearchResult(best=best)
    for index, (knob, value) in enumerate(plan):
        if best.get(knob) == value:
            continue
        spent = clock() - began
        if result.steps:
            mean = spent / len(result.steps)
            if spent + mean > budget_s:
                result.untried = [(k, v) for k, v in plan[index:] if best.get(k) != v]
                break
        candidate = {**best, knob: value}
        t0 = clock()
        ratios = list(measure(dict(best), candidate))
        adopted = helped(ratios, higher_better, min_gain)
        step = Step(knob, value, dict(best), ratios, adopted, clock() - t0)
        result.steps.append(step)
        if adopted:
            best = candidate
        if on_step is not None:
            on_step(step, index, len(plan))
    result.best = {k: v for k, v in best.items() if (start or {}).get(k) != v}
    result.seconds = clock() - began
    return result
