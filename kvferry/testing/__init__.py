"""Conformance kits and real test fixtures for kvferry's plug-in points.

The kits hold the contract of each plug-in point, and the suite runs each over every registered
implementation: ``transport_kit.check_transport`` (transports), ``tier_kit`` (tiers),
``eviction_kit.check_policy`` (eviction policies), ``metadata_kit.check_metadata`` (metadata
services). ``target.TargetProcess`` runs a real transfer target in its own process;
``mock_engine.MockServerProcess`` runs a simulated engine (``kvferry serve mock``);
``router_process.RouterProcess`` runs a KV-aware router (``kvferry serve router``);
``netns.NetLab`` makes network namespaces joined by a bridge, so servers run as on other hosts
(``store_server.StoreServerProcess(netns=...)``). Nothing here is imported by kvferry itself.
"""

from kvferry.testing.eviction_kit import check_policy
from kvferry.testing.metadata_kit import MetadataKit, check_metadata
from kvferry.testing.mock_engine import MockServerProcess
from kvferry.testing.router_process import RouterProcess
from kvferry.testing.target import TargetProcess, pattern
from kvferry.testing.transport_kit import TransportKit, check_transport

__all__ = [
    "MetadataKit",
    "MockServerProcess",
    "RouterProcess",
    "TargetProcess",
    "TransportKit",
    "check_metadata",
    "check_policy",
    "check_transport",
    "pattern",
]
