"""The simulated engine behind ``kvferry serve mock``, bottom up: :mod:`.blocks` (paged KV cache
with prefix caching, pure), :mod:`.timing` (step-time model, pure), :mod:`.clock` (when each step
ends on the wall clock), :mod:`.scheduler` (continuous batching on asyncio), :mod:`.tokenizer`,
:mod:`.openai_api` (request and response formats), :mod:`.kv_events` (the KV event stream) and
:mod:`.server` (the HTTP server).
"""
