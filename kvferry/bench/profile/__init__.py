"""The SLA profiler (``kvferry profile``) and planner (``kvferry plan``): sweep prefill and decode
on an OpenAI-compatible endpoint, fit and interpolate, pick what meets a TTFT and an ITL target.

Modules: :mod:`.options` (what a profile is asked to do), :mod:`.prefill` and :mod:`.decode` (the
points of each sweep), :mod:`.harness` (the run, over :mod:`kvferry.bench.endpoint.harness`),
:mod:`.fit` (quadratic fit, 1-D and 2-D linear interpolation, numpy only), :mod:`.select` (SLA
selection and replica counts), :mod:`.report` (the result, tool ``profile``), :mod:`.npz` (the
arrays Dynamo's planner reads) and :mod:`.plot` (figures; matplotlib is the ``plot`` extra).
"""
