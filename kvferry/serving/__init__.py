"""The serving side, three products over one HTTP front:

- :mod:`kvferry.serving.vllm`: kvferry as a vLLM KV connector (runs inside vLLM);
- :mod:`kvferry.serving.mock`: the simulated engine behind ``kvferry serve mock``;
- :mod:`kvferry.serving.router`: the KV-aware router behind ``kvferry serve router``.

Shared here: :mod:`~kvferry.serving.http_front` (what every kvferry HTTP server does around its
handlers) and :mod:`~kvferry.serving.tiny_model` (a tiny random-weight model for tests and demos).
Nothing here imports torch, transformers or vLLM at import time; each module imports them where
it needs them.
"""
