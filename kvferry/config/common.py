"""What every config section shares: the base model and the validators several sections use.

A section is a frozen pydantic model that refuses unknown keys and validates its defaults
(:class:`ConfigModel`); a component outside ``kvferry.config`` that owns a section of its own
(``backends/memory.py``) derives from it too. No section lives here.
"""

from __future__ import annotations

import ipaddress

from pydantic import BaseModel, ConfigDict, SecretStr

__all__ = ["ConfigModel", "bind_address", "blank_is_none"]


class ConfigModel(BaseModel):
    """A config section: frozen, unknown keys refused, defaults validated too."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def bind_address(value: str) -> str:
    """An IP address to bind; "localhost" and "*" are accepted as 127.0.0.1 and 0.0.0.0."""
    if value in ("localhost", "*"):
        return "127.0.0.1" if value == "localhost" else "0.0.0.0"
    try:
        ipaddress.ip_address(value)
    except ValueError as e:
        raise ValueError(
            f"must be an IP address such as 127.0.0.1 or 0.0.0.0, got {value!r}"
        ) from e
    return value


def blank_is_none(value: SecretStr | None) -> SecretStr | None:
    """An empty or blank token means no token."""
    if value is not None and not value.get_secret_value().strip():
        return None
    return value
