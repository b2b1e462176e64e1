"""Token counting on the client side of the endpoint bench, as the server counts them.

Owns :class:`TokenCounter` and its two kinds: :class:`WordCounter` (one token per
whitespace-separated word, exactly what ``kvferry serve mock`` counts; its words are
:func:`lexicon`'s) and :class:`HfCounter` (a local Hugging Face tokenizer), and
:func:`load_counter`, which picks one for ``--tokenizer``. Building prompt text from their
words is :mod:`kvferry.bench.endpoint.inputs`' job.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any, Protocol

from kvferry.errors import ConfigError, MissingDependency

__all__ = ["HfCounter", "TokenCounter", "WordCounter", "lexicon", "load_counter"]

_ONSETS = ("b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z")
_NUCLEI = ("a", "e", "i", "o", "u", "ai", "ea", "ou")
_CODAS = ("", "n", "r", "s", "t", "l", "m", "nd")


@cache
def lexicon() -> tuple[str, ...]:
    """4096 distinct pronounceable words (word-tokenizer prompts): built once, on first use."""
    words: list[str] = []
    seen: set[str] = set()
    rng = random.Random(0)
    while len(words) < 4096:
        word = "".join(
            rng.choice(_ONSETS) + rng.choice(_NUCLEI) + rng.choice(_CODAS)
            for _ in range(rng.choice((1, 2, 2, 3)))
        )
        if word not in seen:
            seen.add(word)
            words.append(word)
    return tuple(words)


class TokenCounter(Protocol):
    """Counts tokens as the bench reports them (aiperf: no special tokens added)."""

    name: str

    def count(self, text: str) -> int:
        """Tokens of ``text``."""
        ...

    def words(self) -> Sequence[str]:
        """Words that are one token each after a space (the prompt vocabulary)."""
        ...

    def lead_words(self) -> Sequence[str]:
        """Those of :meth:`words` that are one token at the start of a text too."""
        ...


class WordCounter:
    """One token per whitespace-separated word, as ``kvferry serve mock``'s default tokenizer."""

    name = "words"

    def count(self, text: str) -> int:
        return len(text.split())

    def words(self) -> Sequence[str]:
        return lexicon()

    def lead_words(self) -> Sequence[str]:
        return lexicon()


class HfCounter:
    """A local Hugging Face tokenizer: ``tokenizer.json`` through the ``tokenizers`` library, or
    any directory ``transformers.AutoTokenizer`` loads offline.

    Raises:
        ConfigError: nothing loadable at ``path``.
        MissingDependency: neither library is installed.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        where = Path(path)
        file = where / "tokenizer.json" if where.is_dir() else where
        self.name = str(where)
        self._fast: Any = None
        self._auto: Any = None
        if file.is_file() and file.suffix == ".json":
            try:
                from tokenizers import Tokenizer
            except ImportError as e:
                raise MissingDependency("tokenizers", "tokenizer") from e
            try:
                self._fast = Tokenizer.from_file(str(file))
            except Exception as e:  # the library raises a bare Exception for a bad file
                raise ConfigError(
                    f"--tokenizer {str(file)!r} is not a Hugging Face tokenizer file: {e}"
                ) from e
        elif where.is_dir():
            try:
                from transformers import AutoTokenizer
            except ImportError as e:
                raise MissingDependency("transformers", "tokenizer") from e
            try:
                self._auto = AutoTokenizer.from_pretrained(str(where), local_files_only=True)
            except Exception as e:  # OSError, ValueError, ... depending on what is missing
                raise ConfigError(
                    f"--tokenizer {str(where)!r}: no tokenizer.json and transformers cannot "
                    f"load it offline ({type(e).__name__}: {e})"
                ) from e
        else:
            raise ConfigError(
                f"--tokenizer {str(where)!r}: no such file or directory; give a local Hugging "
                "Face tokenizer directory or its tokenizer.json (none = the word tokenizer)"
            )
        self._words: list[str] | None = None
        self._lead: list[str] | None = None

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self._fast is not None:
            return [list(e.ids) for e in self._fast.encode_batch(texts, add_special_tokens=False)]
        return [list(ids) for ids in self._auto(texts, add_special_tokens=False)["input_ids"]]

    def count(self, text: str) -> int:
        return len(self.encode_batch([text])[0])

    def _vocab(self) -> dict[str, int]:
        if self._fast is not None:
            return dict(self._fast.get_vocab(with_added_tokens=False))
        return dict(self._auto.get_vocab())

    def _decode_each(self, ids: list[int]) -> list[str]:
        """The text of each token on its own."""
        if self._fast is not None:
            return [str(t) for t in self._fast.decode_batch([[i] for i in ids])]
        return [str(t) for t in self._auto.batch_decode([[i] for i in ids])]

    def words(self) -> Sequence[str]:
        """Vocabulary words (3-12 ASCII letters) that are one token after a space, checked."""
        if self._words is not None:
            return self._words
        texts = self._decode_each(sorted(self._vocab().values()))
        candidates = sorted(
            {
                word
                for text in texts
                if (word := text.strip()).isascii() and word.isalpha() and 3 <= len(word) <= 12
            }
        )
        words = [
            w
            for w, ids in zip(candidates, self.encode_batch([" " + w for w in candidates]))
            if len(ids) == 1
        ]
        if len(words) < 16:
            raise ConfigError(
                f"--tokenizer {self.name!r}: only {len(words)} vocabulary words are one token "
                "after a space; prompts of exact lengths need at least 16"
            )
        self._words = words
        return words

    def lead_words(self) -> Sequence[str]:
        if self._lead is None:
            words = list(self.words())
            self._lead = [w for w, ids in zip(words, self.encode_batch(words)) if len(ids) == 1]
        return self._lead


def load_counter(tokenizer: str) -> TokenCounter:
    """The word counter when ``tokenizer`` is empty, else :class:`HfCounter` of it."""
    if not tokenizer:
        return WordCounter()
    return HfCounter(tokenizer)
