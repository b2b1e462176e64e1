"""The benchmark-and-tuning lab: transfer bench, store bench, hit-rate lab, endpoint bench, SLA
profiler, tuner, doctor (host checks, :mod:`kvferry.bench.doctor`) and reports.

Every statistic the lab prints comes from :mod:`kvferry.bench.stats`, so a number means the same
thing in every bench and for every engine measured. The lab drives kvferry's public API only.
"""
