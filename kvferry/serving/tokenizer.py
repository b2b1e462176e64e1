"""Tokenizers of the simulated engine: text -> token ids, and the deterministic output text.

Two kinds, behind one small interface (:class:`MockTokenizer`):

- :class:`WordTokenizer` (the default, no dependency): every whitespace-separated word is one
  token, its id a stable hash of the word into ``[0, vocab_size)`` (xxh64, so the same in every
  process and run). A prompt of N words is N tokens, which makes block boundaries easy to aim
  at from a benchmark or a test.
- :class:`HfTokenizer`: a local Hugging Face ``tokenizer.json`` (or a directory holding one),
  loaded with the ``tokenizers`` library, for token counts that match a real model.

The engine's output is deterministic: a request's answer is the fixed :data:`ANSWER_TEXT`
passage, tokenized once, read cyclically from an offset the prompt picks. Each output token
comes with the text it adds (``pieces``), so streaming needs no incremental detokenizer.

:func:`render_chat` is the fixed chat template: one line ``<|role|> content`` per message, then
``<|assistant|>``. This module does no I/O besides loading a tokenizer file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import xxhash

from kvferry.errors import ConfigError, MissingDependency

__all__ = [
    "ANSWER_TEXT",
    "HfTokenizer",
    "MockTokenizer",
    "WordTokenizer",
    "load_tokenizer",
    "render_chat",
]

ANSWER_TEXT = (
    "The quick brown fox jumps over the lazy dog while seven bright lanterns sway above the "
    "quiet harbor and a patient keeper counts every ship that sails past the northern light "
    "before the morning tide carries fresh news from distant islands where old friends gather "
    "to share simple bread warm tea and long stories about the sea under a pale sky as gulls "
    "circle"
)
"""The passage every answer is cut from (64 words, 64 tokens with the word tokenizer)."""


class MockTokenizer(Protocol):
    """What the engine needs from a tokenizer."""

    name: str
    """"words" or the tokenizer file's path."""
    vocab_size: int
    """Token ids are in ``[0, vocab_size)``."""
    pieces: list[tuple[int, str]]
    """The answer passage as ``(token id, text it adds)``, in order."""

    def encode(self, text: str) -> list[int]:
        """The token ids of ``text``."""
        ...


class WordTokenizer:
    """One token per whitespace-separated word (module docstring).

    Args:
        vocab_size: ids are ``xxh64(word) % vocab_size``.

    Raises:
        ConfigError: ``vocab_size`` is below 2.
    """

    name = "words"

    def __init__(self, vocab_size: int) -> None:
        if vocab_size < 2:
            raise ConfigError(f"vocab_size must be at least 2, got {vocab_size}")
        self.vocab_size = vocab_size
        self.pieces: list[tuple[int, str]] = [
            (self.word_id(word), " " + word) for word in ANSWER_TEXT.split()
        ]

    def word_id(self, word: str) -> int:
        """The token id of one word."""
        return xxhash.xxh64_intdigest(word.encode()) % self.vocab_size

    def encode(self, text: str) -> list[int]:
        return [self.word_id(word) for word in text.split()]


class HfTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer read from a local file.

    Args:
        path: ``tokenizer.json`` or a directory that holds one.

    Raises:
        MissingDependency: the ``tokenizers`` package is not installed.
        ConfigError: the file is missing or not a tokenizer.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            raise MissingDependency("tokenizers", "tokenizer") from e
        file = Path(path)
        if file.is_dir():
            file = file / "tokenizer.json"
        if not file.is_file():
            raise ConfigError(
                f"mock.tokenizer {os.fspath(path)!r}: no tokenizer.json there; give a "
                "Hugging Face tokenizer.json or a directory that holds one"
            )
        try:
            self._tok = Tokenizer.from_file(str(file))
        except Exception as e:  # the library raises a bare Exception for a malformed file
            raise ConfigError(
                f"mock.tokenizer {str(file)!r} is not a Hugging Face tokenizer file: {e}"
            ) from e
        self.name = str(file)
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        ids = self.encode_plain(ANSWER_TEXT)
        if not ids:
            raise ConfigError(f"mock.tokenizer {str(file)!r} encodes the answer text to nothing")
        # The text each token adds: decode growing prefixes once, here, so that streaming
        # never needs an incremental detokenizer (byte-level BPE splits characters).
        pieces: list[tuple[int, str]] = []
        before = ""
        for i, token in enumerate(ids):
            text = str(self._tok.decode(ids[: i + 1]))
            pieces.append((token, text[len(before) :] if text.startswith(before) else text))
            before = text
        self.pieces = pieces

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with the tokenizer's special tokens (a BOS, if it adds one)."""
        return list(self._tok.encode(text, add_special_tokens=True).ids)

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        return list(self._tok.encode(text, add_special_tokens=False).ids)


def load_tokenizer(path: str, vocab_size: int) -> MockTokenizer:
    """The word tokenizer when ``path`` is empty, else the Hugging Face tokenizer at ``path``.

    Raises:
        MissingDependency: ``path`` is set and ``tokenizers`` is not installed.
        ConfigError: the tokenizer cannot be loaded.
    """
    if not path:
        return WordTokenizer(vocab_size)
    return HfTokenizer(path)


def render_chat(messages: Sequence[Mapping[str, object]]) -> str:
    """The fixed chat template: ``<|role|> content`` per message, then ``<|assistant|>``.

    ``content`` is a string or a list of ``{"type": "text", "text": ...}`` parts (joined with a
    space); messages must have been validated by the caller.
    """
    lines = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            text = " ".join(str(part.get("text", "")) for part in content)
        else:
            text = "" if content is None else str(content)
        lines.append(f"<|{message.get('role')}|> {text}")
    lines.append("<|assistant|>")
    return "\n".join(lines)
