"""The serving side: engine adapters (the vLLM KV connector) and the tiny local model for tests.

Nothing here imports torch, transformers or vLLM at import time; each module imports them where
it needs them.
"""
