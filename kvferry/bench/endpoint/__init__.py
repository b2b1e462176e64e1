"""The endpoint bench (``kvferry bench serve``) against any OpenAI-compatible endpoint:
:mod:`.inputs` (prompts), :mod:`.client` (the streaming client and its worker processes),
:mod:`.metrics` (per-request records), :mod:`.aggregate` and :mod:`.sweeps` (one run's
statistics), :mod:`.export` (aiperf-compatible files and plots) and :mod:`.harness` (the run).
"""
