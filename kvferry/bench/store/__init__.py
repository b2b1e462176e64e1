"""The store bench (``kvferry bench store``, kvferry's master_bench): :mod:`.harness` (phases,
clients, the report), :mod:`.client` (what one client process runs) and :mod:`.backends` (what
each backend needs before the clients start).
"""
