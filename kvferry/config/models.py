"""Typed, validated config models, one per component, and the whole config they make.

The sections live by component: ``transfer`` (transfer, listen, metadata), ``store`` (the store
and its tiers), ``serving`` (the HTTP servers), on the base of ``common``. This module assembles
them into :class:`KvferryConfig` and names them in :data:`SECTIONS`, and it re-exports every
section, so ``from kvferry.config.models import X`` works for each of them. The models validate
values; the loader (``kvferry.config.loader``) decides where values come from and is the only
module that reads the environment.
"""

from __future__ import annotations

from pydantic import Field

from kvferry.config.common import ConfigModel
from kvferry.config.serving import (
    DEFAULT_MOCK_MODEL_LEN,
    HttpFrontConfig,
    MockConfig,
    RouterConfig,
    RouterMode,
    parse_vllm_events,
)
from kvferry.config.store import (
    CpuTierConfig,
    DiskTierConfig,
    MooncakeTierConfig,
    RedisTierConfig,
    ServerTierConfig,
    StoreConfig,
    TierName,
)
from kvferry.config.transfer import ListenConfig, MetadataConfig, TransferConfig, TransportName

__all__ = [
    "DEFAULT_MOCK_MODEL_LEN",
    "SECTIONS",
    "ConfigModel",
    "CpuTierConfig",
    "DiskTierConfig",
    "HttpFrontConfig",
    "KvferryConfig",
    "ListenConfig",
    "MetadataConfig",
    "MockConfig",
    "MooncakeTierConfig",
    "RedisTierConfig",
    "RouterConfig",
    "RouterMode",
    "ServerTierConfig",
    "StoreConfig",
    "TierName",
    "TransferConfig",
    "TransportName",
    "parse_vllm_events",
]


class _Model(ConfigModel):
    """The base's old private name, kept so code written against it still imports (a subclass,
    not an alias, so pydantic's mypy plugin still sees a model); use :class:`ConfigModel`."""


class KvferryConfig(ConfigModel):
    """All of kvferry's configuration, one section per component."""

    transfer: TransferConfig = Field(default_factory=TransferConfig)
    listen: ListenConfig = Field(default_factory=ListenConfig)
    metadata: MetadataConfig = Field(default_factory=MetadataConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    cpu: CpuTierConfig = Field(default_factory=CpuTierConfig)
    disk: DiskTierConfig = Field(default_factory=DiskTierConfig)
    redis: RedisTierConfig = Field(default_factory=RedisTierConfig)
    server: ServerTierConfig = Field(default_factory=ServerTierConfig)
    mooncake: MooncakeTierConfig = Field(default_factory=MooncakeTierConfig)
    mock: MockConfig = Field(default_factory=MockConfig)
    router: RouterConfig = Field(default_factory=RouterConfig)


SECTIONS: dict[str, type[ConfigModel]] = {
    "transfer": TransferConfig,
    "listen": ListenConfig,
    "metadata": MetadataConfig,
    "store": StoreConfig,
    "cpu": CpuTierConfig,
    "disk": DiskTierConfig,
    "redis": RedisTierConfig,
    "server": ServerTierConfig,
    "mooncake": MooncakeTierConfig,
    "mock": MockConfig,
    "router": RouterConfig,
}
"""Section name -> model; the loader derives env names (KVFERRY_<SECTION>_<KEY>) from these."""
