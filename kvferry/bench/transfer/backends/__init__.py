"""Engines under the transfer benchmark, behind TransferBenchBackend (see base.py)."""
