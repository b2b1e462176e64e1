"""The KV-aware router behind ``kvferry serve router``: :mod:`.prefix_index` (which worker holds
which blocks, and the routing decision, pure), :mod:`.workers` (health, start-up check),
:mod:`.events` (the workers' KV event subscriptions), :mod:`.vllm_events` (vLLM's ZeroMQ KV
events, translated), :mod:`.server` (the OpenAI-compatible front) and :mod:`.metrics` (its
``/router/stats`` and Prometheus metrics).
"""
