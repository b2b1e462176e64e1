"""A tiny random-weight Llama and a byte-level BPE tokenizer, built locally and deterministically.

Tests and benchmarks that run a real inference engine (vLLM's CPU build) need a model, and
nothing may be downloaded from a model hub. :func:`build_tiny_model` writes a Hugging Face model
directory (``config.json``, ``model.safetensors``, ``tokenizer.json``, ...) that vLLM and
transformers load offline. The same arguments give the same files, byte for byte: the weights
come from a seeded generator and the tokenizer is trained on a seeded synthetic corpus.

The weights are random, so the model's text is noise, but its computation is real: greedy
decoding is deterministic, and the KV cache it produces is what a real model of that shape
produces. Weights are scaled so activations keep unit size through the layers and the logits
have a standard deviation of ``logit_std``: peaked enough that a greedy argmax does not flip on
the last bit of a float (a trained-style 0.02 init gives near-uniform logits, where it does),
which keeps output comparisons between two servers meaningful.

torch, transformers and tokenizers are imported inside the functions that need them, so
importing kvferry never imports them.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from kvferry.errors import ConfigError, MissingDependency

__all__ = ["TinyModelSpec", "build_tiny_model", "place_in_hf_cache", "synthetic_corpus"]

# Syllables of the synthetic corpus: enough variety for thousands of BPE merges.
_ONSETS = ["", "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w"]
_ONSETS += ["br", "ch", "cl", "dr", "fl", "gr", "pl", "pr", "sh", "st", "th", "tr"]
_NUCLEI = ["a", "e", "i", "o", "u", "ai", "ea", "ee", "io", "oo", "ou"]
_CODAS = ["", "", "n", "r", "s", "t", "l", "m", "nd", "ng", "st", "ck"]
_PUNCT = [".", ".", ",", "?", "!", ";", ":"]


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of the tiny Llama (the defaults: about 2.5M parameters, 64 KiB of float32 KV per
    16-token block)."""

    hidden_size: int = 256
    intermediate_size: int = 512
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    vocab_size: int = 4096
    max_position_embeddings: int = 4096
    dtype: str = "float32"
    logit_std: float = 4.0
    seed: int = 0

    def validate(self) -> None:
        """Raise ConfigError for a shape no Llama can have."""
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_heads "
                f"({self.num_heads})"
            )
        if self.num_kv_heads < 1 or self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_kv_heads ({self.num_kv_heads}) must divide num_heads ({self.num_heads})"
            )
        if self.vocab_size < 512:
            raise ConfigError(
                f"vocab_size must be at least 512 (256 bytes + merges), got {self.vocab_size}"
            )
        if self.max_position_embeddings < 16:
            raise ConfigError("max_position_embeddings must be at least 16")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")
        if not self.logit_std > 0:
            raise ConfigError(f"logit_std must be positive, got {self.logit_std}")


def synthetic_corpus(n_words: int = 200_000, seed: int = 0) -> list[str]:
    """Seeded pseudo-English lines (words from syllables) to train the tokenizer on."""
    rng = random.Random(seed)
    lexicon = []
    for _ in range(6000):
        word = "".join(
            rng.choice(_ONSETS) + rng.choice(_NUCLEI) + rng.choice(_CODAS)
            for _ in range(rng.choice((1, 1, 2, 2, 3)))
        )
        lexicon.append(word)
    # Zipf-like word frequencies, as in real text.
    weights = [1.0 / (rank + 1) for rank in range(len(lexicon))]
    lines: list[str] = []
    words = rng.choices(lexicon, weights=weights, k=n_words)
    i = 0
    while i < len(words):
        n = rng.randint(5, 18)
        sentence = " ".join(words[i : i + n])
        lines.append(sentence.capitalize() + rng.choice(_PUNCT))
        i += n
    return lines


def _train_tokenizer(vocab_size: int, seed: int) -> object:
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError as e:
        raise MissingDependency("tokenizers", "vllm") from e
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(synthetic_corpus(seed=seed), trainer=trainer)
    return tok


TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
"""The tiny model's chat template (transformers writes it to ``chat_template.jinja``): a BOS,
``<|role|>`` and the content on lines of their own per message, then the assistant's header.
vLLM needs one to serve chat completions; the mock and the router render it the same way."""


def build_tiny_model(outdir: str | os.PathLike[str], spec: TinyModelSpec | None = None) -> Path:
    """Write the tiny model and its tokenizer to ``outdir`` (created; existing files of the same
    names are replaced) and return the directory.

    Raises:
        ConfigError: an impossible shape.
        MissingDependency: torch, transformers or tokenizers is not installed.
    """
    spec = spec or TinyModelSpec()
    spec.validate()
    try:
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    except ImportError as e:
        raise MissingDependency(e.name or "transformers", "vllm") from e
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)

    tok = _train_tokenizer(spec.vocab_size, spec.seed)
    n_vocab = tok.get_vocab_size()  # type: ignore[attr-defined]
    if n_vocab != spec.vocab_size:  # the corpus ran out of merges: a smaller vocab
        raise ConfigError(
            f"the tokenizer corpus yields {n_vocab} tokens, fewer than vocab_size "
            f"{spec.vocab_size}; use a smaller vocab_size"
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        model_max_length=spec.max_position_embeddings,
        chat_template=TINY_CHAT_TEMPLATE,
    )
    fast.save_pretrained(out)
    bos = fast.convert_tokens_to_ids("<|begin_of_text|>")
    eos = fast.convert_tokens_to_ids("<|end_of_text|>")

    config = LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=bos,
        eos_token_id=eos,
        tie_word_embeddings=False,
    )
    config.dtype = spec.dtype
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    # Seeded normal weights in name order (independent of transformers' init order, which may
    # change between its versions): unit embeddings, 1/sqrt(fan_in) matrices, unit norms, and
    # an output head that gives logits of standard deviation logit_std.
    gen = torch.Generator().manual_seed(spec.seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            fan_in = param.shape[-1]
            if name.endswith("norm.weight"):
                param.fill_(1.0)
                continue
            if "embed_tokens" in name:
                std = 1.0
            elif name.startswith("lm_head"):
                std = spec.logit_std / fan_in**0.5
            else:
                std = 1.0 / fan_in**0.5
            param.copy_(torch.randn(param.shape, generator=gen) * std)
    model = model.to(getattr(torch, spec.dtype))
    model.save_pretrained(out, safe_serialization=True)
    (out / "kvferry_tiny.json").write_text(json.dumps(asdict(spec), indent=2) + "\n")
    return out


def place_in_hf_cache(
    model_dir: str | os.PathLike[str], cache_dir: str | os.PathLike[str], repo: str = "local/tiny"
) -> Path:
    """Copy a built model's tokenizer (and config) into a Hugging Face hub cache as ``repo``.

    Tools that only take a hub name (aiperf's ``--tokenizer``) then load it offline with
    ``HF_HUB_OFFLINE=1 HF_HUB_CACHE=cache_dir``. Returns the snapshot directory.

    Raises:
        ConfigError: ``repo`` is not ``owner/name``, or ``model_dir`` has no tokenizer.json.
    """
    owner, _, name = repo.partition("/")
    if not owner or not name or "/" in name:
        raise ConfigError(f"repo must look like 'owner/name', got {repo!r}")
    src = Path(model_dir)
    if not (src / "tokenizer.json").exists():
        raise ConfigError(f"{src} has no tokenizer.json; build it with `kvferry model tiny`")
    revision = "0" * 40
    root = Path(cache_dir) / f"models--{owner}--{name}"
    snapshot = root / "snapshots" / revision
    snapshot.mkdir(parents=True, exist_ok=True)
    files = (
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "special_tokens_map.json",
        "config.json",
    )
    for file in files:
        if (src / file).exists():
            shutil.copy(src / file, snapshot / file)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(revision)
    return snapshot
