"""Tuning that decides (``kvferry tune``): searches whose every step is a same-run measurement
on this machine (:mod:`~kvferry.bench.tune.search`), for the transfer engine
(:mod:`~kvferry.bench.tune.transfer`) and the cache's capacity and policy
(:mod:`~kvferry.bench.tune.cache`)."""
