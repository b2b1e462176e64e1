"""``kvferry model tiny OUTDIR``: write the tiny random-weight Llama and its tokenizer.

Owns the flags (one per :class:`~kvferry.serving.tiny_model.TinyModelSpec` field); the model is
built by :func:`kvferry.serving.tiny_model.build_tiny_model`.
"""

from __future__ import annotations

import argparse
from dataclasses import fields

from kvferry.serving.tiny_model import TinyModelSpec, build_tiny_model


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


def run_tiny(args: argparse.Namespace) -> int:
    spec = TinyModelSpec(**{f.name: getattr(args, f.name) for f in fields(TinyModelSpec)})
    out = build_tiny_model(args.outdir, spec)
    print(
        f"tiny model written to {out} ({spec.num_layers} layers, hidden {spec.hidden_size}, "
        f"{spec.num_kv_heads} KV heads, vocab {spec.vocab_size}, {spec.dtype})"
    )
    return 0
