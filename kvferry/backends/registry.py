"""The tier registry: name -> "module:Class", imported on first use."""

from __future__ import annotations

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
        ConfigError: unknown tier or a tier class naming a config section that does not exist.
        MissingDependency: the tier's optional extra is not installed.
    """
    cls = load_tier(name)
    section = getattr(config, cls.config_section, None)
    if section is None:
        raise ConfigError(
            f"tier {name!r} ({cls.__name__}) names config section {cls.config_section!r}, "
            "which KvferryConfig does not have"
        )
    return cls(section, TierContext(slot_size=config.store.slot_size, label=cls.name))
