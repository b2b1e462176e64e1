"""Prompts of the endpoint bench: synthetic ones of set token lengths, and trace ones whose equal
hash_ids are equal token blocks.

Owns turning a request's description into prompt text (:class:`PromptMaker`, from the words
of a :class:`~kvferry.bench.endpoint.tokens.TokenCounter`: the word tokenizer of
``kvferry serve mock``, or a local Hugging Face tokenizer) and the request sources
(:class:`SyntheticSource`, :class:`TraceSource`, :class:`PromptFileSource`). It sends nothing
and times nothing (:mod:`kvferry.bench.endpoint.harness` does).

Word tokenizer (no ``--tokenizer``): a token is a whitespace-separated word, so a prompt of N
words is N tokens, exactly what ``kvferry serve mock`` counts. With a Hugging Face tokenizer the
words come from its vocabulary (words that are one token each after a space, and a first word
that is one token at the start too), so N words are N tokens when the tokenizer does not merge
across spaces, which is checked once (:class:`PromptMaker`); when it does, every prompt is
counted and trimmed or extended at its end until the tokenizer counts exactly the length asked
for (a handful of tries; the count it reaches is the ISL reported).

Synthetic prompts (``SyntheticSource``): request ``i`` of level ``salt`` draws its ISL and OSL
(normal around the mean when a stddev is set, rounded, at least 1) and its text from a random
stream of its own (seed, salt, i), so every worker process builds the same request ``i`` and
no two requests, levels or warm-ups share a prompt prefix by chance: the first 32 words are
drawn per request, the rest is a random slice of a seeded corpus (cheap at large ISL).

Trace prompts (``TraceSource``, Mooncake format): each hash_id is a deterministic block of
``block_size`` words drawn from a stream seeded by (seed, salt, hash_id); a prompt is its
blocks in order, the last one cut to ``input_length``. Equal hash_ids therefore give equal
token blocks and the server sees the trace's prefix sharing; a cut block is a prefix of the
whole one. ``salt`` differs per sweep level, so one level does not warm the next level's cache.

Prompt files (``PromptFileSource``, aiperf's ``single_turn`` JSONL: ``{"text": ...}`` per line,
optional ``output_length`` and ``timestamp`` in ms): the prompts are sent as written, in file
order, wrapping to the start after the last one as aiperf's sequential sampling does, so both
tools can be given exactly the same inputs. The text is the same in every level of a sweep.
"""

from __future__ import annotations

import json
import os
import random
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from kvferry.bench.endpoint.tokens import (
    HfCounter,
    TokenCounter,
    WordCounter,
    load_counter,
)
from kvferry.bench.traces import Trace, workload_trace
from kvferry.errors import ConfigError

__all__ = [
    "HfCounter",
    "PromptFileSource",
    "PromptMaker",
    "RequestSource",
    "RequestSpec",
    "SyntheticSource",
    "TokenCounter",
    "TraceSource",
    "WordCounter",
    "load_counter",
    "mix64",
    "workload_trace",
]

HEAD_WORDS = 32
"""Words drawn per request at the start of a synthetic prompt (the rest is a corpus slice)."""
CORPUS_WORDS = 1 << 18
BLOCK_CACHE = 2048
"""Trace blocks kept built (a least recently used cache; a block is rebuilt identically)."""
ADJUST_TRIES = 8


def mix64(*parts: int) -> int:
    """A stable 64-bit mix of integers (splitmix64 steps): the seed of one request's stream,
    the same in every process and Python version."""
    x = 0x9E3779B97F4A7C15
    for part in parts:
        x = (x ^ (part & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
        x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        z = x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        x = z ^ (z >> 31)
    return x


# --- prompt text -------------------------------------------------------------------------------


class PromptMaker:
    """Builds prompt text of a token count from a counter's words (module docstring).

    Every word of the pool is one token after a space, and a prompt starts with a word that is
    one token at the start too, so N words are N tokens whenever the tokenizer never merges
    across a space. That is checked once here, on a 2048-word text; if it holds (the word
    tokenizer; byte-level BPE and most others, which pre-split on whitespace), counts are
    exact by construction and no prompt is tokenized again; if not, every prompt is counted
    and trimmed or extended until it is exact.

    Args:
        counter: what counts tokens.
        seed: seeds the synthetic corpus.
    """

    def __init__(self, counter: TokenCounter, seed: int) -> None:
        self.counter = counter
        self.pool = list(counter.words())
        self.lead = list(counter.lead_words()) or self.pool
        self._seed = seed
        self._corpus: list[str] | None = None
        self._blocks: OrderedDict[tuple[int, int, int], list[str]] = OrderedDict()
        self.exact = True
        if not isinstance(counter, WordCounter):
            rng = random.Random(mix64(seed, 0xE8AC7))
            sample = [rng.choice(self.lead), *rng.choices(self.pool, k=2047)]
            self.exact = counter.count(" ".join(sample)) == len(sample)

    def prepare(self) -> None:
        """Build the synthetic corpus (otherwise built at the first long prompt)."""
        self._corpus_words()

    def _corpus_words(self) -> list[str]:
        if self._corpus is None:
            rng = random.Random(mix64(self._seed, 0xC0))
            self._corpus = rng.choices(self.pool, k=CORPUS_WORDS)
        return self._corpus

    def synthetic(self, rng: random.Random, tokens: int) -> tuple[str, int]:
        """``(text, its token count)``: ``tokens`` tokens of fresh text from ``rng``."""
        head = [rng.choice(self.lead), *rng.choices(self.pool, k=min(tokens, HEAD_WORDS) - 1)]
        words = head
        rest = tokens - len(head)
        if rest > 0:
            corpus = self._corpus_words()
            start = rng.randrange(len(corpus))
            tail: list[str] = []
            while len(tail) < rest:
                take = min(rest - len(tail), len(corpus) - start)
                tail.extend(corpus[start : start + take])
                start = 0
            words = head + tail
        return self._fit(words, tokens, rng)

    def block(self, seed: int, salt: int, hash_id: int, size: int) -> list[str]:
        """The words of one hash_id's block (deterministic; recently used ones are cached)."""
        key = (salt, hash_id, size)
        words = self._blocks.get(key)
        if words is not None:
            self._blocks.move_to_end(key)
            return words
        rng = random.Random(mix64(seed, salt, hash_id))
        # The first word may start a prompt: one token there too.
        words = [rng.choice(self.lead), *rng.choices(self.pool, k=size - 1)]
        self._blocks[key] = words
        if len(self._blocks) > BLOCK_CACHE:
            self._blocks.popitem(last=False)
        return words

    def from_blocks(
        self, seed: int, salt: int, hash_ids: Sequence[int], tokens: int, block_size: int
    ) -> tuple[str, int]:
        """``(text, its token count)``: the blocks of ``hash_ids`` in order, cut to ``tokens``."""
        words: list[str] = []
        for hash_id in hash_ids:
            left = tokens - len(words)
            if left <= 0:
                break
            block = self.block(seed, salt, hash_id, block_size)
            words.extend(block if left >= block_size else block[:left])
        filler = random.Random(mix64(seed, salt, 0xF111, len(hash_ids), tokens))
        if len(words) < tokens:  # a record with fewer ids than its length needs
            words.extend(filler.choices(self.pool, k=tokens - len(words)))
        return self._fit(words, tokens, filler)

    def _fit(self, words: list[str], tokens: int, rng: random.Random) -> tuple[str, int]:
        """Join ``words``; with an inexact counter, trim or extend the END until the count is
        ``tokens`` (so block prefixes stay intact)."""
        text = " ".join(words)
        if self.exact:
            return text, len(words)
        count = self.counter.count(text)
        for _ in range(ADJUST_TRIES):
            if count == tokens:
                break
            if count > tokens:
                del words[max(1, len(words) - (count - tokens)) :]
            else:
                words.extend(rng.choices(self.pool, k=tokens - count))
            text = " ".join(words)
            count = self.counter.count(text)
        return text, count


# --- request sources ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RequestSpec:
    """One request to send: its prompt and lengths."""

    index: int
    prompt: str
    isl: int
    """The prompt's token count (client side)."""
    osl: int
    """Output tokens asked for (max_tokens, and min_tokens with ignore_eos)."""
    conversation: str | None = None


def _length(rng: random.Random, mean: int, stddev: float) -> int:
    if stddev <= 0:
        return mean
    return max(1, round(rng.gauss(mean, stddev)))


class RequestSource:
    """Where requests come from; picklable (sent to worker processes), builds prompts lazily
    in the process that asks for them."""

    def __init__(self, seed: int, tokenizer: str) -> None:
        self.seed = seed
        self.tokenizer = tokenizer
        self._maker: PromptMaker | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_maker"] = None  # rebuilt where used: tokenizers do not pickle cheaply
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    @property
    def maker(self) -> PromptMaker:
        if self._maker is None:
            self._maker = PromptMaker(load_counter(self.tokenizer), self.seed)
        return self._maker

    @property
    def size(self) -> int | None:
        """How many distinct requests there are (trace rows), None for unbounded."""
        return None

    cycles = False
    """True: a run may send more than ``size`` requests, wrapping to the first (a prompt file);
    False: ``size`` caps the requests of a level (a trace is replayed once)."""

    def timestamps_ms(self) -> list[float] | None:
        """Each request's send time (ms after the first), or None when it has no schedule."""
        return None

    def prepare(self) -> None:
        """Load the tokenizer and build the prompt material now (workers call it before the
        first level, so its first requests do not pay for it)."""
        self.maker.prepare()

    def spec(self, salt: int, index: int) -> RequestSpec:
        """Request ``index`` of the run ``salt`` (a sweep level, or the warm-up)."""
        raise NotImplementedError


class SyntheticSource(RequestSource):
    """Random prompts of ``isl`` tokens asking for ``osl`` tokens (module docstring)."""

    def __init__(
        self,
        *,
        isl: int,
        osl: int,
        isl_stddev: float = 0.0,
        osl_stddev: float = 0.0,
        seed: int = 0,
        tokenizer: str = "",
    ) -> None:
        super().__init__(seed, tokenizer)
        self.isl, self.osl = isl, osl
        self.isl_stddev, self.osl_stddev = isl_stddev, osl_stddev

    def spec(self, salt: int, index: int) -> RequestSpec:
        rng = random.Random(mix64(self.seed, salt, index))
        isl = _length(rng, self.isl, self.isl_stddev)
        osl = _length(rng, self.osl, self.osl_stddev)
        text, count = self.maker.synthetic(rng, isl)
        return RequestSpec(index, text, count, osl)


class TraceSource(RequestSource):
    """The requests of a Mooncake-format trace, in its order (module docstring).

    Args:
        trace: a validated trace (:func:`kvferry.bench.traces.read_trace`); its
            ``block_tokens`` is the tokens per hash_id.
        seed: seeds the block texts.
        tokenizer: as ``--tokenizer`` ("" = word tokenizer).
    """

    def __init__(self, trace: Trace, *, seed: int = 0, tokenizer: str = "") -> None:
        super().__init__(seed, tokenizer)
        self.name = trace.path
        self.block_size = trace.block_tokens
        self.rows = [
            (r.timestamp_ms, r.input_length, r.output_length, tuple(r.hash_ids), r.line)
            for r in trace.requests
        ]

    @property
    def size(self) -> int:
        return len(self.rows)

    def timestamps_ms(self) -> list[float] | None:
        """Each row's timestamp relative to the first row's."""
        if not self.rows:
            return []
        first = self.rows[0][0]
        return [row[0] - first for row in self.rows]

    def spec(self, salt: int, index: int) -> RequestSpec:
        _, isl, osl, hash_ids, line = self.rows[index % len(self.rows)]
        text, count = self.maker.from_blocks(
            self.seed, salt, hash_ids, max(1, isl), self.block_size
        )
        return RequestSpec(index, text, count, max(1, osl), conversation=f"line-{line}")


PROMPT_FIELDS = ("text", "texts", "output_length", "timestamp", "type", "role", "session_id")
"""What a prompt file line may hold (aiperf ``single_turn`` fields that mean something for a text
completion; ``type``, ``role`` and ``session_id`` are accepted and ignored)."""


class PromptFileSource(RequestSource):
    """Fixed prompts from a JSONL file in aiperf's ``single_turn`` format (module docstring).

    Args:
        path: the file.
        osl: output tokens for a line without ``output_length``.
        tokenizer: as ``--tokenizer`` ("" = word tokenizer); counts each prompt's ISL.

    Raises:
        ConfigError: the file cannot be read, or a line is not a valid entry (its line number,
            what is wrong and what would be right); nothing is skipped.
    """

    cycles = True

    def __init__(self, path: str | os.PathLike[str], *, osl: int, tokenizer: str = "") -> None:
        super().__init__(0, tokenizer)
        self.name = str(path)
        self.rows: list[tuple[str, int, float | None]] = []
        try:
            with open(path, encoding="utf-8") as f:
                for line_no, line in enumerate(f, start=1):
                    if line.strip():
                        self.rows.append(self._row(line, line_no, osl))
        except OSError as e:
            raise ConfigError(f"--input-file {self.name!r}: {e.strerror or e}") from e
        except UnicodeDecodeError as e:
            raise ConfigError(f"--input-file {self.name!r} is not UTF-8 text: {e}") from e
        if not self.rows:
            raise ConfigError(f"--input-file {self.name!r} has no prompt (one JSON object a line)")
        stamped = sum(r[2] is not None for r in self.rows)
        if stamped not in (0, len(self.rows)):
            raise ConfigError(
                f"--input-file {self.name!r}: {stamped} of {len(self.rows)} lines have a "
                "timestamp; give every line one (a schedule) or none"
            )
        self._isl: list[int] | None = None

    def _row(self, line: str, line_no: int, osl: int) -> tuple[str, int, float | None]:
        where = f"--input-file {self.name!r} line {line_no}"
        try:
            entry = json.loads(line)
        except ValueError as e:
            raise ConfigError(f"{where}: not JSON ({e})") from e
        except RecursionError:  # json recurses per level; an entry is two deep
            raise ConfigError(
                f"{where}: JSON nested too deeply to read; expected an object like "
                '{"text": "..."}'
            ) from None
        if not isinstance(entry, dict):
            raise ConfigError(f'{where}: expected a JSON object like {{"text": "..."}}')
        unknown = sorted(set(entry) - set(PROMPT_FIELDS))
        if unknown:
            raise ConfigError(
                f"{where}: unsupported field(s) {', '.join(unknown)} (text prompts only; "
                f"fields: {', '.join(PROMPT_FIELDS)})"
            )
        text = entry.get("text")
        texts = entry.get("texts")
        if text is not None and texts is not None:
            raise ConfigError(f"{where}: give text or texts, not both")
        if texts is not None:
            if not (isinstance(texts, list) and texts and all(isinstance(t, str) for t in texts)):
                raise ConfigError(f"{where}: texts must be a non-empty list of strings")
            text = " ".join(texts)
        if not isinstance(text, str) or not text.strip():
            raise ConfigError(f'{where}: needs a non-empty string "text"')
        out = entry.get("output_length", osl)
        if isinstance(out, bool) or not isinstance(out, int) or out < 1:
            raise ConfigError(f"{where}: output_length must be a whole number >= 1, got {out!r}")
        stamp = entry.get("timestamp")
        if stamp is not None and (
            isinstance(stamp, bool) or not isinstance(stamp, int | float) or not stamp >= 0
        ):
            raise ConfigError(f"{where}: timestamp must be milliseconds >= 0, got {stamp!r}")
        return text, out, None if stamp is None else float(stamp)

    @property
    def size(self) -> int:
        return len(self.rows)

    def prepare(self) -> None:
        if self._isl is None:
            self._isl = [self.maker.counter.count(text) for text, _, _ in self.rows]

    def timestamps_ms(self) -> list[float] | None:
        if self.rows[0][2] is None:
            return None
        first = min(cast(float, r[2]) for r in self.rows)
        return [cast(float, r[2]) - first for r in self.rows]

    def spec(self, salt: int, index: int) -> RequestSpec:
        self.prepare()
        assert self._isl is not None
        k = index % len(self.rows)
        text, osl, _ = self.rows[k]
        return RequestSpec(index, text, self._isl[k], osl, conversation=f"entry-{k + 1}")
