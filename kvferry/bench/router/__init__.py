"""The router bench (``kvferry bench router``): KV-aware routing against round-robin and random
on mock or real workers. :mod:`.harness` (options, report, the run), :mod:`.fleet` (the worker
and router processes, their counters) and :mod:`.plot` (its figure).
"""
