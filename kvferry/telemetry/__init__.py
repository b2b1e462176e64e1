"""Exporters over the store's and the transfer engine's statistics: :mod:`.prometheus`
(``/metrics`` and ``/health``) and :mod:`.monitor` (per-interval rates for the CLI). They sit
above the store and the transfer engine and read their statistics; neither starts them.
"""
