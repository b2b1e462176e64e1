"""Conformance kits and real test fixtures for kvferry's plug-in points.

``transport_kit.check_transport`` holds the checks every transport of the transfer engine must
pass; ``target.TargetProcess`` runs a real transfer target in its own process;
``mock_engine.MockServerProcess`` runs a simulated engine (``kvferry serve mock``);
``router_process.RouterProcess`` runs a KV-aware router (``kvferry serve router``). Nothing here
is imported by kvferry itself.
"""

from kvferry.testing.mock_engine import MockServerProcess
from kvferry.testing.router_process import RouterProcess
from kvferry.testing.target import TargetProcess, pattern
from kvferry.testing.transport_kit import TransportKit, check_transport

__all__ = [
    "MockServerProcess",
    "RouterProcess",
    "TargetProcess",
    "TransportKit",
    "check_transport",
    "pattern",
]
