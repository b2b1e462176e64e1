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
``<|assistant|>``; a Hugging Face tokenizer whose ``tokenizer_config.json`` carries a chat
template uses that one instead (:class:`ChatTemplate`), as vLLM does. This module does no I/O
besides loading a tokenizer's files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import xxhash

from kvferry.errors import ConfigError, MissingDependency

__all__ = [
    "ANSWER_TEXT",
    "ChatTemplate",
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

    def chat_ids(self, messages: Sequence[Mapping[str, object]]) -> list[int]:
        """The token ids of a chat prompt (messages validated by the caller), generation
        prompt included."""
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

    def chat_ids(self, messages: Sequence[Mapping[str, object]]) -> list[int]:
        return self.encode(render_chat(messages))


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
        self.chat_template = ChatTemplate.from_dir(file.parent)
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

    def chat_ids(self, messages: Sequence[Mapping[str, object]]) -> list[int]:
        """With the model's chat template (:meth:`ChatTemplate.from_dir`), what vLLM feeds the
        model: the rendered text with the generation prompt, tokenized without special tokens
        (the template adds them). Without one, the fixed template (:func:`render_chat`)."""
        if self.chat_template is None:
            return self.encode(render_chat(messages))
        return self.encode_plain(self.chat_template.render(messages))


def load_tokenizer(path: str, vocab_size: int) -> MockTokenizer:
    """The word tokenizer when ``path`` is empty, else the Hugging Face tokenizer at ``path``.

    Raises:
        MissingDependency: ``path`` is set and ``tokenizers`` is not installed.
        ConfigError: the tokenizer cannot be loaded.
    """
    if not path:
        return WordTokenizer(vocab_size)
    return HfTokenizer(path)


class ChatTemplate:
    """A model's Jinja chat template, rendered the way Hugging Face ``transformers`` renders it
    (a sandboxed environment with ``trim_blocks``/``lstrip_blocks``, ``raise_exception``, the
    special tokens as variables), for text messages in vLLM's "string" content format: text
    parts joined with newlines, a ``developer`` role read as ``system``.

    Args:
        source: the template text.
        special_tokens: ``bos_token``, ``eos_token``, ... as the template sees them.

    Raises:
        MissingDependency: ``jinja2`` is not installed.
        ConfigError: the template does not compile.
    """

    def __init__(self, source: str, special_tokens: Mapping[str, str]) -> None:
        try:
            import jinja2
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError as e:
            raise MissingDependency("jinja2", "tokenizer") from e

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = lambda x, indent=None: json.dumps(
            x, ensure_ascii=False, indent=indent
        )
        try:
            self._template = env.from_string(source)
        except jinja2.exceptions.TemplateError as e:
            raise ConfigError(f"the tokenizer's chat template does not compile: {e}") from e
        self._error = jinja2.exceptions.TemplateError
        self.special_tokens = dict(special_tokens)

    @classmethod
    def from_dir(cls, directory: Path) -> ChatTemplate | None:
        """The chat template of a tokenizer directory, where transformers finds it: the file
        ``chat_template.jinja`` (what recent transformers write), else ``chat_template`` of
        ``tokenizer_config.json`` (its ``default`` one when it names several); the special
        tokens from ``tokenizer_config.json``. None when there is no template.

        Raises:
            ConfigError: a file is unreadable or not JSON, or the template is malformed.
        """
        path = directory / "tokenizer_config.json"
        config: object = {}
        if path.is_file():
            try:
                config = json.loads(path.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ConfigError(f"{path}: not a readable JSON tokenizer config: {e}") from e
        if not isinstance(config, dict):
            raise ConfigError(f"{path}: a tokenizer config is a JSON object")
        jinja = directory / "chat_template.jinja"
        source = config.get("chat_template")
        if jinja.is_file():
            try:
                source = jinja.read_text()
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError(f"{jinja}: cannot read the chat template: {e}") from e
        if isinstance(source, list):  # [{"name": ..., "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        if source is None:
            return None
        if not isinstance(source, str):
            raise ConfigError(f"{path}: chat_template must be a string, got {source!r}")
        tokens = {}
        for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
            value = config.get(name)
            if isinstance(value, dict):  # an AddedToken written out
                value = value.get("content")
            if isinstance(value, str):
                tokens[name] = value
        return cls(source, tokens)

    def render(self, messages: Sequence[Mapping[str, object]]) -> str:
        """The prompt text of ``messages`` with the generation prompt.

        Raises:
            ValueError: the template refused the conversation (``raise_exception``).
        """
        conversation = []
        for message in messages:
            role = message.get("role")
            conversation.append(
                {
                    "role": "system" if role == "developer" else role,
                    "content": _content_text(message.get("content"), "\n"),
                }
            )
        try:
            return str(
                self._template.render(
                    messages=conversation,
                    add_generation_prompt=True,
                    tools=None,
                    documents=None,
                    **self.special_tokens,
                )
            )
        except (self._error, TypeError, KeyError, AttributeError, ValueError) as e:
            # raise_exception, or the template tripping over a message it did not expect
            raise ValueError(f"the chat template refused these messages: {e}") from e


def render_chat(messages: Sequence[Mapping[str, object]]) -> str:
    """The fixed chat template: ``<|role|> content`` per message, then ``<|assistant|>``.

    ``content`` is a string or a list of ``{"type": "text", "text": ...}`` parts (joined with a
    space); messages must have been validated by the caller.
    """
    lines = [
        f"<|{message.get('role')}|> {_content_text(message.get('content'), ' ')}"
        for message in messages
    ]
    lines.append("<|assistant|>")
    return "\n".join(lines)


def _content_text(content: object, joiner: str) -> str:
    """A message's ``content``: a string, or text parts (``{"type": "text", "text": ...}``)
    joined with ``joiner``; None is empty."""
    if isinstance(content, list):
        return joiner.join(str(part.get("text", "")) for part in content)
    return "" if content is None else str(content)
