"""The hit-rate lab (``kvferry bench hitrate``) as a library: simulate or replay a request
trace against kvferry's real store, sweep capacities and policies, size a cache.

Both modes run the same per-request calls over the same :class:`~kvferry.store.TieredStore`
code (index, placement, promotion, demotion, eviction policies); only the tiers differ:

- *simulate*: memory tiers of given capacities in blocks, holding empty values, so a run costs
  only keys and bookkeeping (with exact shortcuts where they count the same: ``ENGINES``);
- *replay*: the tiers of the config (cpu, disk, redis, server, ...) with real bytes sized from
  a model's KV geometry, at the trace's timestamps (scaled) or as fast as possible.

So a simulated hit rate and a replay's with the same capacities, policy and watermarks are
equal (a test holds them to it). Hit rates are reported three ways and always labelled:
block-weighted (headline: leading hit blocks / blocks looked up, a ratio of sums),
token-weighted (hit tokens / input tokens) and the per-request mean (aiperf's definition).

The entry point: ``run(HitRateOptions(trace="mooncake-synthetic", capacities=[5000]))``
returns a :class:`HitRateReport` (the lab's result model, tool ``hitrate``). The modules, one
concern each:

- :mod:`.spec`: capacities, tier pipelines, KV geometry, reference curves (parsing);
- :mod:`.options`: :class:`HitRateOptions`, its validation and the cases it expands to;
- :mod:`.simulation`: one simulated run and its :class:`HitRateResult`;
  :mod:`.lru_stack` (every LRU capacity in one pass) and :mod:`.direct` (one tier driven
  through its eviction policy) are the fast paths it picks from;
- :mod:`.pool`: a sweep of simulations in forked worker processes;
- :mod:`.replayer`: one run against the configured store with real bytes;
- :mod:`.advice`: the smallest capacity reaching a target hit rate;
- :mod:`.report`: :class:`HitRateReport`, its JSON (and older files'), CSV;
- :mod:`.harness`: :func:`run`, options to report.
"""

from kvferry.bench.hitrate.advice import Advice, advise
from kvferry.bench.hitrate.harness import HitRateProgress, load_trace, run, sim_config
from kvferry.bench.hitrate.options import FRACTIONS, HitRateOptions, expand_cases, search_tiers
from kvferry.bench.hitrate.pool import SweepProgressFn, default_jobs, sweep
from kvferry.bench.hitrate.replayer import replay
from kvferry.bench.hitrate.report import (
    CSV_FIELDS,
    HIT_RATE_DEFINITIONS,
    HitRateReport,
    peak_rss_mib,
    write_csv,
    write_json,
)
from kvferry.bench.hitrate.simulation import (
    ENGINES,
    SIM_SLOT_SIZE,
    HitRateResult,
    ProgressFn,
    SimCase,
    Tally,
    serve,
    sim_store_config,
    simulate,
    stack_refusal,
    stack_result,
    trace_keys,
)
from kvferry.bench.hitrate.spec import (
    DTYPE_BYTES,
    HitRateError,
    TierSpec,
    kv_bytes_per_token,
    parse_capacity,
    parse_tiers,
    read_reference,
)

__all__ = [
    "CSV_FIELDS",
    "DTYPE_BYTES",
    "ENGINES",
    "FRACTIONS",
    "HIT_RATE_DEFINITIONS",
    "SIM_SLOT_SIZE",
    "Advice",
    "HitRateError",
    "HitRateOptions",
    "HitRateProgress",
    "HitRateReport",
    "HitRateResult",
    "ProgressFn",
    "SimCase",
    "SweepProgressFn",
    "Tally",
    "TierSpec",
    "advise",
    "default_jobs",
    "expand_cases",
    "kv_bytes_per_token",
    "load_trace",
    "parse_capacity",
    "parse_tiers",
    "peak_rss_mib",
    "read_reference",
    "replay",
    "run",
    "search_tiers",
    "serve",
    "sim_config",
    "sim_store_config",
    "simulate",
    "stack_refusal",
    "stack_result",
    "sweep",
    "trace_keys",
    "write_csv",
    "write_json",
]
