"""kvferry's configuration: typed models, presets, units and the one loader that reads them.

Owns the public names of the config package; the modules behind them are ``models`` (what is
valid), ``units`` (size and duration text), ``presets`` (named bundles of values) and ``loader``
(where values come from; the only module that reads environment variables). Importing this
package reads nothing.
"""

from __future__ import annotations

from kvferry.config.loader import LoadedConfig, load_config
from kvferry.config.models import KvferryConfig, ListenConfig, MetadataConfig, TransferConfig
from kvferry.config.presets import PRESETS
from kvferry.config.units import parse_duration, parse_size

__all__ = [
    "PRESETS",
    "KvferryConfig",
    "ListenConfig",
    "LoadedConfig",
    "MetadataConfig",
    "TransferConfig",
    "load_config",
    "parse_duration",
    "parse_size",
]
