"""The tier registry: name -> "module:Class", imported on first use."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel

from kvferry.backends.base import Tier, TierContext
from kvferry.config.models import KvferryConfig
from kvferry.errors import ConfigError
from kvferry.plugins import Registry

TIERS = Registry(
    "tier",
    {
        "cpu": "kvferry.backends.cpu:CpuTier",
        "disk": "kvferry.backends.disk:DiskTier",
        "redis": "kvferry.backends.redis:RedisTier",
        "server": "kvferry.backends.server.client:ServerTier",
        "mooncake": "kvferry.backends.mooncake:MooncakeTier",
    },
)


def load_tier(name: str) -> type[Tier]:
    """The tier class registered as ``name`` (or a "module:Class" path).

    Raises:
        ConfigError: unknown name, or the class cannot be imported.
    """
    return TIERS.load(name, Tier)  # type: ignore[type-abstract]


def create_tier(name: str, config: KvferryConfig) -> Tier:
    """Build tier ``name`` from its own section of ``config``.

    Raises:
        ConfigError: unknown tier, a tier class naming a config section that does not exist, or
            a config the host cannot honour (``Tier.check``).
        MissingDependency: the tier's optional extra is not installed.
    """
    cls = load_tier(name)
    return cls(_section(name, cls, config), TierContext(config.store.slot_size, label=cls.name))


def check_tiers(names: Sequence[str], config: KvferryConfig) -> list[type[Tier]]:
    """Load every tier of ``names`` and run its ``check``, allocating nothing: what a store
    does before it builds its first tier. Returns the classes, in order.

    Raises:
        ConfigError: as :func:`create_tier`, for the first tier that fails.
    """
    classes = [load_tier(name) for name in names]
    for name, cls in zip(names, classes):
        cls.check(_section(name, cls, config), TierContext(config.store.slot_size, label=cls.name))
    return classes


def _section(name: str, cls: type[Tier], config: KvferryConfig) -> BaseModel:
    section: BaseModel | None = getattr(config, cls.config_section, None)
    if section is None:
        raise ConfigError(
            f"tier {name!r} ({cls.__name__}) names config section {cls.config_section!r}, "
            "which KvferryConfig does not have"
        )
    return section
