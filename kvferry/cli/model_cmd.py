"""``kvferry model tiny OUTDIR``: write the tiny random-weight Llama and its tokenizer;
``kvferry model hf-cache MODEL_DIR CACHE_DIR``: lay its tokenizer out as a Hugging Face hub
cache entry, for tools that only take a hub name (aiperf's ``--tokenizer``), offline.

Owns the flags (one per :class:`~kvferry.serving.tiny_model.TinyModelSpec` field); the model is
built by :func:`kvferry.serving.tiny_model.build_tiny_model` and placed by
:func:`kvferry.serving.tiny_model.place_in_hf_cache`.
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import fields

from kvferry.errors import ConfigError
from kvferry.serving.tiny_model import TinyModelSpec, build_tiny_model, place_in_hf_cache


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``kvferry model`` and ``kvferry model tiny``."""
    model = subparsers.add_parser(
        "model",
        help="build local test models (tiny random-weight Llama)",
        description="Build models locally, for tests and benchmarks that run a real engine "
        "with no model hub.",
    )
    kinds = model.add_subparsers(title="models", metavar="KIND", required=True)
    tiny = kinds.add_parser(
        "tiny",
        help="a tiny random-weight Llama and byte-level BPE tokenizer (seeded, deterministic)",
        description="Write a tiny random-weight Llama (safetensors) and a byte-level BPE "
        "tokenizer trained on a seeded synthetic corpus to OUTDIR, in Hugging Face layout, "
        "loadable offline by vLLM and transformers. The same flags give the same bytes. "
        "Needs torch, transformers and tokenizers (pip install 'kvferry[vllm]').",
    )
    tiny.add_argument("outdir", metavar="OUTDIR", help="directory to write (created)")
    defaults = TinyModelSpec()
    for f in fields(TinyModelSpec):
        default = getattr(defaults, f.name)
        tiny.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=type(default),
            default=default,
            help="(default: %(default)s)",
        )
    tiny.set_defaults(func=run_tiny)
    cache = kinds.add_parser(
        "hf-cache",
        help="place a model's tokenizer in a Hugging Face hub cache (for aiperf, offline)",
        description="Copy MODEL_DIR's tokenizer files (tokenizer.json, tokenizer_config.json, "
        "chat template, config.json) into CACHE_DIR as the hub entry REPO, so tools that only "
        "take a hub name load it with no network: HF_HUB_OFFLINE=1 HF_HUB_CACHE=CACHE_DIR "
        "aiperf profile --tokenizer REPO ... Existing files of the entry are replaced.",
    )
    cache.add_argument("model_dir", metavar="MODEL_DIR", help="e.g. from `kvferry model tiny`")
    cache.add_argument("cache_dir", metavar="CACHE_DIR", help="the hub cache (created)")
    cache.add_argument(
        "--repo", default="local/tiny", help="hub name OWNER/NAME to place it as (%(default)s)"
    )
    cache.set_defaults(func=run_hf_cache)


def run_tiny(args: argparse.Namespace) -> int:
    spec = TinyModelSpec(**{f.name: getattr(args, f.name) for f in fields(TinyModelSpec)})
    out = build_tiny_model(args.outdir, spec)
    print(
        f"tiny model written to {out} ({spec.num_layers} layers, hidden {spec.hidden_size}, "
        f"{spec.num_kv_heads} KV heads, vocab {spec.vocab_size}, {spec.dtype})"
    )
    return 0


def run_hf_cache(args: argparse.Namespace) -> int:
    try:
        snapshot = place_in_hf_cache(args.model_dir, args.cache_dir, args.repo)
    except OSError as e:
        raise ConfigError(
            f"cannot place {args.model_dir!r} in {args.cache_dir!r}: {e.strerror or e}"
        ) from e
    cache = shlex.quote(str(args.cache_dir))
    print(f"{args.repo} placed at {snapshot}")
    print(f"use it offline: HF_HUB_OFFLINE=1 HF_HUB_CACHE={cache} ... --tokenizer {args.repo}")
    return 0
