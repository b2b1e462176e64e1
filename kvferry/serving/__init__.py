"""The serving side: engine adapters (the vLLM KV connector), the tiny local model for tests, and
the simulated engine behind ``kvferry serve mock`` (blocks: paged KV cache with prefix caching;
timing: step-time model; scheduler: continuous batching; tokenizer; openai_api: request and
response formats; kv_events: the KV event stream; mock: the HTTP server).

Nothing here imports torch, transformers or vLLM at import time; each module imports them where
it needs them.
"""
