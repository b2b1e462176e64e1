"""kvferry as a vLLM KV connector: the connector (:mod:`.connector`, imports vLLM), its settings
(:mod:`.config`) and statistics (:mod:`.metrics`), and the block copies (:mod:`.kv_blocks`).

``kv_connector_module_path`` may name this package or :mod:`kvferry.serving.vllm.connector`:
``KvferryConnector`` is looked up lazily, so importing the settings or the metrics never
imports vLLM.
"""

from __future__ import annotations

from typing import Any

__all__ = ["KvferryConnector"]


def __getattr__(name: str) -> Any:
    if name == "KvferryConnector":
        from kvferry.serving.vllm.connector import KvferryConnector

        return KvferryConnector
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
