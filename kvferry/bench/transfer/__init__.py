"""The transfer bench (``kvferry bench transfer``): :mod:`.harness` runs one sweep against any
engine behind :class:`~kvferry.bench.transfer.backends.base.TransferBenchBackend`
(:mod:`.backends`: kvferry's own engine and Mooncake's).
"""
