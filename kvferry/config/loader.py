"""Where config values come from: the one module of kvferry that reads environment variables.

Owns layering and provenance. Each layer gives dotted keys (``transfer.slice_size``) raw values;
a higher layer wins key by key, highest first::

    flags  >  environment (KVFERRY_<SECTION>_<KEY>)  >  config file  >  preset  >  defaults

The merged values are validated once by the pydantic models of ``kvferry.config.models``, and
every failure comes back as a :class:`~kvferry.errors.ConfigError` that names the key, the value,
the layer it came from and what would be valid. This module must not be imported for its side
effects: it reads ``os.environ`` only when :func:`load_config` is called without ``environ``.
"""

from __future__ import annotations

import difflib
import json
import os
import reprlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import get_args, get_origin

import yaml
from pydantic import BaseModel, SecretStr, ValidationError

from kvferry.config.models import SECTIONS, KvferryConfig
from kvferry.config.presets import PRESETS
from kvferry.errors import ConfigError

ENV_PREFIX = "KVFERRY_"
ENV_CONFIG = "KVFERRY_CONFIG"
"""Path of the config file, used when ``load_config`` gets no ``config_file``."""
ENV_PRESET = "KVFERRY_PRESET"
"""Name of the preset, used when ``load_config`` gets no ``preset``."""
ENV_LOG_LEVEL = "KVFERRY_LOG_LEVEL"
"""How much the ``kvferry`` command logs (``--log-level``); not a config key."""

SECRET_MASK = "***"

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


@dataclass(frozen=True)
class LoadedConfig:
    """A validated config and, for every dotted key, the layer its effective value came from."""

    config: KvferryConfig
    sources: dict[str, str]
    """Dotted key -> "default", "preset:<name>", "file:<path>", "env:<NAME>" or "flag"."""

    def rows(self) -> list[tuple[str, str, str]]:
        """(dotted key, display value, source) for every key of every section, in model order.

        Secrets display as ``***`` when set; sizes and durations as their shortest exact text.
        """
        values = self.as_dict()
        return [
            (f"{section}.{key}", _display(value), self.sources[f"{section}.{key}"])
            for section, fields in values.items()
            for key, value in fields.items()
        ]

    def as_dict(self) -> dict[str, dict[str, object]]:
        """JSON-ready values, section -> key -> value, with secrets masked as ``***``."""
        out: dict[str, dict[str, object]] = {}
        for section in SECTIONS:
            model: BaseModel = getattr(self.config, section)
            dumped = model.model_dump(mode="json")
            for key in dumped:
                if isinstance(getattr(model, key), SecretStr):
                    dumped[key] = SECRET_MASK
            out[section] = dumped
        return out


@dataclass(frozen=True)
class _Setting:
    """One raw value and the layer it came from."""

    value: object
    source: str  # as recorded in LoadedConfig.sources: "env:KVFERRY_X"
    origin: str  # as written in error messages: "env KVFERRY_X"


def load_config(
    *,
    config_file: str | os.PathLike[str] | None = None,
    preset: str | None = None,
    flags: Mapping[str, object] | None = None,
    environ: Mapping[str, str] | None = None,
    flag_names: Mapping[str, str] | None = None,
) -> LoadedConfig:
    """Merge defaults, a preset, a config file, the environment and flags; validate the result.

    Args:
        config_file: YAML (``.yaml``/``.yml``) or JSON (``.json``) file of section -> key ->
            value. When None, ``$KVFERRY_CONFIG`` names it (if set and not empty).
        preset: a name from :data:`~kvferry.config.presets.PRESETS`. When None,
            ``$KVFERRY_PRESET`` names it (if set and not empty).
        flags: dotted key (``"transfer.workers"``) -> raw value (text or typed). A value of
            None means the flag was not given and is skipped.
        environ: the environment to read ``KVFERRY_*`` variables from; ``os.environ`` if None.
        flag_names: dotted key -> how the flag was spelled (``"--workers"``), for messages.

    Returns:
        The validated config and the source of every key.

    Raises:
        ConfigError: an unknown preset, file, section, key or ``KVFERRY_*`` variable, an
            unreadable file, or a value the models reject. The message names the key, the
            value, where it came from and what is valid.
    """
    env: Mapping[str, str] = os.environ if environ is None else environ
    names = flag_names or {}
    merged: dict[str, _Setting] = {}

    preset_name = preset if preset is not None else (env.get(ENV_PRESET) or None)
    if preset_name is not None:
        merged.update(_preset_layer(preset_name, from_env=preset is None))

    file_path: str | None = None
    if config_file is not None:
        file_path = os.fspath(config_file)
    elif env.get(ENV_CONFIG):
        file_path = env[ENV_CONFIG]
    if file_path is not None:
        merged.update(_file_layer(file_path, from_env=config_file is None))

    merged.update(_env_layer(env))
    merged.update(_flag_layer(flags or {}, names))

    config = _validate(merged)
    sources = {key: "default" for key in _all_keys()}
    sources.update({key: setting.source for key, setting in merged.items()})
    return LoadedConfig(config=config, sources=sources)


# --- layers ----------------------------------------------------------------------------------


def _preset_layer(name: str, *, from_env: bool) -> dict[str, _Setting]:
    if name not in PRESETS:
        via = f" (from {ENV_PRESET})" if from_env else ""
        raise ConfigError(
            f"unknown preset {name!r}{via}{_suggest(name, PRESETS)}; "
            f"valid presets: {', '.join(sorted(PRESETS))}"
        )
    origin = f"preset {name}"
    layer: dict[str, _Setting] = {}
    for section, values in PRESETS[name].items():
        for key, value in values.items():
            dotted = _check_key(section, key, origin)
            layer[dotted] = _Setting(value, f"preset:{name}", origin)
    return layer


def _file_layer(path: str, *, from_env: bool) -> dict[str, _Setting]:
    data = _read_file(path, via=f" (from {ENV_CONFIG})" if from_env else "")
    origin = f"file {path}"
    if data is None:  # an empty file sets nothing
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"config file {path}: expected a mapping of section -> key -> value at the top "
            f"level, got {type(data).__name__}"
        )
    layer: dict[str, _Setting] = {}
    for section, values in data.items():
        section_name = str(section)
        if section_name not in SECTIONS:
            # A flat "workers: 4" is a key missing its section; say which section it belongs to.
            nested = [k for k in _all_keys() if k.rpartition(".")[2] == section_name]
            hint = (
                f" ({section_name} belongs under its section: {nested[0]})"
                if nested
                else _suggest(section_name, SECTIONS)
            )
            raise ConfigError(
                f"config file {path}: unknown section {section_name!r}{hint}; "
                f"valid sections: {', '.join(SECTIONS)}"
            )
        if values is None:  # "transfer:" with nothing under it
            continue
        if not isinstance(values, Mapping):
            raise ConfigError(
                f"config file {path}: section {section_name!r} must be a mapping of key -> "
                f"value, got {type(values).__name__} {values!r}"
            )
        for key, value in values.items():
            dotted = _check_key(section_name, str(key), origin)
            layer[dotted] = _Setting(value, f"file:{path}", origin)
    return layer


def _read_file(path: str, *, via: str) -> object:
    suffix = Path(path).suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise ConfigError(
            f"config file {path}{via}: unsupported extension {suffix or '(none)'!r}; "
            "use .yaml, .yml or .json"
        )
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise ConfigError(f"config file {path}{via} not found") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path}{via} cannot be read: {e}") from e
    try:
        if suffix == ".json":
            # json rather than yaml for .json: its errors point at the exact line and column.
            return json.loads(text) if text.strip() else None
        return yaml.safe_load(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {path}{via} is not valid JSON: {e}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path}{via} is not valid YAML: {_yaml_detail(e)}") from e
    except RecursionError:
        # Both parsers recurse per nesting level; a config is two levels deep.
        raise ConfigError(
            f"config file {path}{via} is nested too deeply to read; a config file is a "
            "mapping of section -> key -> value"
        ) from None


def _yaml_detail(error: yaml.YAMLError) -> str:
    """'line 2, column 1: expected ...' rather than PyYAML's multi-line text with a caret."""
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark = error.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}"
        context = f" ({error.context})" if error.context else ""
        return f"{where}: {error.problem}{context}"
    return " ".join(str(error).split())


def _env_layer(env: Mapping[str, str]) -> dict[str, _Setting]:
    known = _env_names()
    layer: dict[str, _Setting] = {}
    unknown: list[str] = []
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name in (ENV_CONFIG, ENV_PRESET, ENV_LOG_LEVEL):
            continue
        dotted = known.get(name)
        if dotted is None:
            unknown.append(name)
            continue
        layer[dotted] = _Setting(value, f"env:{name}", f"env {name}")
    if unknown:
        candidates = [*known, ENV_CONFIG, ENV_PRESET, ENV_LOG_LEVEL]
        lines = [f"{name}{_suggest(name, candidates)}" for name in sorted(unknown)]
        raise ConfigError(
            "unknown environment variable"
            + ("s " if len(lines) > 1 else " ")
            + "; ".join(lines)
            + f". kvferry reads {ENV_CONFIG}, {ENV_PRESET}, {ENV_LOG_LEVEL} and "
            "KVFERRY_<SECTION>_<KEY> for "
            "the keys listed by `kvferry config show`"
        )
    return layer


def _flag_layer(flags: Mapping[str, object], names: Mapping[str, str]) -> dict[str, _Setting]:
    layer: dict[str, _Setting] = {}
    for dotted, value in flags.items():
        if value is None:
            continue
        origin = f"flag {names.get(dotted, dotted)}"
        section, _, key = dotted.partition(".")
        if not key:
            raise ConfigError(
                f"{origin}: {dotted!r} is not a SECTION.KEY name{_suggest_key(dotted)}"
            )
        layer[_check_key(section, key, origin)] = _Setting(value, "flag", origin)
    return layer


# --- validation ------------------------------------------------------------------------------


def _validate(merged: Mapping[str, _Setting]) -> KvferryConfig:
    raw: dict[str, dict[str, object]] = {}
    problems: list[str] = []
    for dotted, setting in merged.items():
        section, key = dotted.split(".", 1)
        try:
            value = _coerce(section, key, setting.value)
        except ValueError as e:
            problems.append(f"{dotted} = {_shown(dotted, setting.value)} ({setting.origin}): {e}")
            continue
        raw.setdefault(section, {})[key] = value
    if problems:
        raise ConfigError(_problems_message(problems))
    try:
        return KvferryConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_problems_message(_explain(e, merged))) from None


def _coerce(section: str, key: str, value: object) -> object:
    """Turn boolean text into a bool and list text ("cpu,disk" or "[cpu, disk]") into a list;
    everything else is left to the models."""
    annotation = SECTIONS[section].model_fields[key].annotation
    if isinstance(value, str) and get_origin(annotation) is list:
        text = value.strip()
        if text.startswith("["):
            text = text[1:-1] if text.endswith("]") else text[1:]
        return [item.strip().strip("'\"") for item in text.split(",") if item.strip()]
    if isinstance(value, str) and annotation is bool:
        word = value.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
        raise ValueError("expected a boolean: 1/0, true/false, yes/no or on/off")
    return value


def _explain(error: ValidationError, merged: Mapping[str, _Setting]) -> list[str]:
    problems: list[str] = []
    seen: set[tuple[str, ...]] = set()
    for item in error.errors(include_url=False):
        # A union (auth_token: SecretStr | None) reports once per member; the key is enough.
        loc = tuple(str(part) for part in item["loc"][:2])
        if loc in seen:
            continue
        seen.add(loc)
        message = _strip_prefix(item["msg"])
        if len(loc) == 2:
            dotted = ".".join(loc)
            setting = merged.get(dotted)
            if setting is None:
                where, shown = "default", _shown(dotted, item.get("input"))
            else:
                where, shown = setting.origin, _shown(dotted, setting.value)
            problems.append(f"{dotted} = {shown} ({where}): {message}")
        else:
            # A check across keys of one section (slice_size vs max_frame_size): name every key
            # of that section that was set, so the user sees which layers collided.
            section = loc[0] if loc else ""
            involved = [
                f"{dotted} = {_shown(dotted, s.value)} ({s.origin})"
                for dotted, s in merged.items()
                if dotted.startswith(f"{section}.")
            ]
            detail = f" [set: {'; '.join(involved)}]" if involved else ""
            problems.append(f"{section or 'config'}: {message}{detail}")
    return problems


def _strip_prefix(message: str) -> str:
    for prefix in ("Value error, ", "Assertion failed, "):
        if message.startswith(prefix):
            return message[len(prefix) :]
    return message


def _problems_message(problems: list[str]) -> str:
    if len(problems) == 1:
        return f"invalid config: {problems[0]}"
    return "invalid config:\n" + "\n".join(f"  {p}" for p in problems)


# --- names -----------------------------------------------------------------------------------


def _all_keys() -> list[str]:
    return [f"{section}.{key}" for section, model in SECTIONS.items() for key in model.model_fields]


def env_name(dotted_key: str) -> str:
    """The environment variable that sets ``dotted_key`` (``transfer.workers`` ->
    ``KVFERRY_TRANSFER_WORKERS``)."""
    return f"{ENV_PREFIX}{dotted_key.replace('.', '_').upper()}"


def _env_names() -> dict[str, str]:
    """KVFERRY_<SECTION>_<KEY> -> dotted key, for every key."""
    return {env_name(key): key for key in _all_keys()}


def _is_secret(dotted: str) -> bool:
    section, _, key = dotted.partition(".")
    field = SECTIONS[section].model_fields.get(key) if section in SECTIONS else None
    if field is None:
        return False
    return field.annotation is SecretStr or SecretStr in get_args(field.annotation)


def _check_key(section: str, key: str, origin: str) -> str:
    """Return ``section.key`` if it names a field, else raise naming the closest valid key."""
    dotted = f"{section}.{key}"
    if section not in SECTIONS:
        raise ConfigError(
            f"{origin}: unknown section {section!r} in {dotted!r}{_suggest_key(dotted)}; "
            f"valid sections: {', '.join(SECTIONS)}"
        )
    fields = SECTIONS[section].model_fields
    if key not in fields:
        raise ConfigError(
            f"{origin}: unknown key {dotted}{_suggest_key(dotted)}; "
            f"valid keys of {section}: {', '.join(fields)}"
        )
    return dotted


def _suggest_key(dotted: str) -> str:
    """The closest valid dotted key: the same key under another section (``transfer.port`` ->
    ``listen.port``), else the closest spelling within the section, else anywhere."""
    section, _, key = dotted.rpartition(".")
    same_key = [k for k in _all_keys() if k.rpartition(".")[2] == key.lower()]
    if same_key:
        return f" (did you mean {same_key[0]}?)"
    if section in SECTIONS:
        in_section = [f"{section}.{k}" for k in SECTIONS[section].model_fields]
        hint = _suggest(dotted, in_section)
        if hint:
            return hint
    return _suggest(dotted, _all_keys())


def _suggest(name: str, candidates: Iterable[str]) -> str:
    match = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {match[0]}?)" if match else ""


def _shown(dotted: str, value: object) -> str:
    """A value as written in an error message, shortened (a file may hold a huge or deeply
    nested value); secrets never appear."""
    if value is not None and _is_secret(dotted):
        return SECRET_MASK
    return _SHORT.repr(value)


_SHORT = reprlib.Repr()
_SHORT.maxlevel = 3
_SHORT.maxstring = _SHORT.maxother = 200


def _display(value: object) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


__all__ = ["ENV_CONFIG", "ENV_PRESET", "LoadedConfig", "env_name", "load_config"]
