"""The server tier: kvferry store servers (``kvferry serve store``) as a shared remote tier
(:mod:`.client`), the calls both sides speak (:mod:`.protocol`) and the consistent-hash ring
over servers (:mod:`.ring`). The server itself is :mod:`kvferry.store.server`: it serves a
whole ``TieredStore``, so it sits above the store.

Importing this package imports neither side.
"""
