"""The simulated engine's scheduler: continuous batching over the paged KV cache, on asyncio.

:class:`MockEngine` is what ``kvferry serve mock`` runs behind its HTTP endpoints. One task
(:meth:`MockEngine.run`) loops over engine steps the way vLLM's scheduler does:

1. every running request that is decoding gets a KV slot for its next token (a new block when
   its last one is full); when none is left, the newest running request is preempted (its
   blocks are freed and it goes back to the head of the queue, to be recomputed later);
   requests still prefilling get their next chunk;
2. waiting requests that arrived before the step starts are admitted first-come first-served
   while fewer than ``max_num_seqs`` run, the step's token budget (``max_num_batched_tokens``)
   lasts and their blocks fit (:meth:`~kvferry.serving.mock.blocks.BlockManager.admit`; the head of
   the queue waits otherwise); each computes its uncached tokens, in chunks of the remaining
   budget;
3. the step lasts the modelled time of its prefill chunks and decode batch
   (:class:`~kvferry.serving.mock.timing.TimingModel`) on the engine's deadline clock
   (:class:`~kvferry.serving.mock.clock.StepClock`: it starts when the previous step ended, or when
   its first request arrived if the engine was idle), then emits one token per decoding request
   and the first token of each request whose prefill finished. A request whose whole prompt is
   cached still computes its last token (an engine needs its logits).

Steps are timed in model time, not by sleeping their length: a step's tokens leave when its
end has come on the wall clock, never before, and when the engine is behind (a late wake-up,
a busy event loop, steps shorter than a wake-up), the steps that are due run back to back and
their tokens leave together, so each request's TTFT and ITL stay the model's at any
``speedup_ratio`` (:mod:`kvferry.serving.mock.clock` has the rules and their limits).

Outputs are deterministic (:mod:`kvferry.serving.mock.tokenizer`): the prompt's hash picks where in
the answer passage the output starts and, unless ``ignore_eos``, how long the answer is (16 to
512 tokens, at least ``min_tokens``); ``max_tokens`` always ends it ("length").

Everything runs on one event loop thread; nothing here is thread-safe. The engine owns no
socket: the HTTP side (:mod:`kvferry.serving.mock.server`) submits requests and reads their tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
from array import array
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Literal

import xxhash

from kvferry.config.models import MockConfig
from kvferry.index.hashing import BlockHasher
from kvferry.serving.mock.blocks import BlockManager
from kvferry.serving.mock.clock import StepClock
from kvferry.serving.mock.timing import TimingModel
from kvferry.serving.mock.tokenizer import MockTokenizer

__all__ = [
    "EngineCounters",
    "MockEngine",
    "MockRequest",
    "SamplingParams",
    "StepWork",
    "TokenOut",
]

log = logging.getLogger("kvferry.serving.mock.scheduler")

FinishReason = Literal["stop", "length", "abort"]

ANSWER_MIN_TOKENS = 16
ANSWER_MAX_TOKENS = 512


@dataclass(frozen=True)
class SamplingParams:
    """The request options the engine honours.

    Attributes:
        max_tokens: output tokens at most (finish reason "length").
        min_tokens: the answer does not stop ("stop") before this many.
        ignore_eos: never stop before ``max_tokens``.
    """

    max_tokens: int
    min_tokens: int = 0
    ignore_eos: bool = False


@dataclass(frozen=True)
class TokenOut:
    """One output token: its id, the text it adds, and the finish reason on the last one."""

    token_id: int
    text: str
    finish_reason: FinishReason | None = None


@dataclass
class EngineCounters:
    """Monotonic counters of the engine (the HTTP side adds its own)."""

    requests_submitted: int = 0
    requests_finished: dict[str, int] = field(
        default_factory=lambda: {"stop": 0, "length": 0, "abort": 0}
    )
    prompt_tokens: int = 0
    """Prompt tokens of admitted requests (counted at first admission)."""
    cached_prompt_tokens: int = 0
    handoff_tokens: int = 0
    """P/D: prompt tokens a prefill instance handed off (beyond the cache's hits)."""
    """Prompt tokens found in the cache at first admission."""
    prefill_tokens: int = 0
    """Tokens computed by prefill chunks (recomputation after preemption included)."""
    generated_tokens: int = 0
    preemptions: int = 0
    steps: int = 0
    prefill_seconds: float = 0.0
    """Modelled prefill time of all steps (after speedup_ratio)."""
    decode_seconds: float = 0.0
    """Modelled decode time of all steps (after speedup_ratio)."""
    late_seconds: float = 0.0
    """Sum over steps of how late the step's tokens were handed out (wall time after the step's
    modelled end); / ``steps`` = the mean lag of the engine behind its model."""
    slipped_seconds: float = 0.0
    """Model time the engine gave up because it fell too far behind the wall clock
    (:class:`~kvferry.serving.mock.clock.StepClock`); 0 while it keeps its model's time."""


class MockRequest:
    """A submitted request: read its tokens with :meth:`MockEngine.stream`.

    Attributes:
        request_id: unique per engine.
        prompt_ids: the prompt's token ids.
        params: its sampling options.
        cached_tokens: prompt tokens found in the cache at its first admission.
        finish_reason: set when it ends.
    """

    def __init__(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        hasher: BlockHasher,
        arrival: float = 0.0,
    ) -> None:
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.params = params
        self.hasher = hasher
        self.arrival = arrival
        """When it was submitted (the engine clock's seconds): no step before it admits it."""
        self.output_ids: list[int] = []
        self.cached_tokens = 0
        self.finish_reason: FinishReason | None = None
        self.queue: asyncio.Queue[TokenOut] = asyncio.Queue()
        seed = xxhash.xxh64_intdigest(array("I", prompt_ids).tobytes())
        self.offset = seed
        span = ANSWER_MAX_TOKENS - ANSWER_MIN_TOKENS + 1
        self.answer_tokens = ANSWER_MIN_TOKENS + (seed >> 20) % span
        # Scheduler state.
        self.tokens: list[int] = list(prompt_ids)
        self.hashes: list[bytes] | None = None
        self.admitted_once = False
        self.prefill_pos = 0
        self.handoff_tokens = 0
        """P/D: prompt tokens whose KV came from a prefill instance (first admission only)."""
        self.prefilling = True

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_ids)


@dataclass(frozen=True)
class StepWork:
    """What one step computed: the timing model's inputs (:class:`TimingModel.step_ms`)."""

    chunks: tuple[tuple[int, int], ...]
    """``(new_tokens, prior_tokens)`` of each prefill chunk."""
    batch: int
    """Requests decoding one token."""
    context_tokens: int
    """Their tokens in all."""


@dataclass
class _Step:
    prefill: list[tuple[MockRequest, int]]
    """Requests prefilling and the tokens they compute in this step."""
    decode: list[tuple[MockRequest, tuple[int, str]]]
    """Requests decoding and the token (id, text) each produces in this step."""
    prefill_ms: float
    decode_ms: float


class MockEngine:
    """The simulated engine (module docstring).

    Args:
        config: the ``mock`` config section.
        tokenizer: turns prompts into ids and gives the answer passage.
        timing: the step-time model; from ``config`` if None.
        clock: when steps end on the wall clock (:mod:`kvferry.serving.mock.clock`); a
            :class:`~kvferry.serving.mock.clock.StepClock` if None.
    """

    def __init__(
        self,
        config: MockConfig,
        tokenizer: MockTokenizer,
        timing: TimingModel | None = None,
        clock: StepClock | None = None,
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.timing = timing or TimingModel.from_config(config)
        self.blocks = BlockManager(config.num_blocks, config.block_size, model_name=config.model)
        self.counters = EngineCounters()
        self._hashers: dict[str, BlockHasher] = {"": self.blocks.hasher}
        self._waiting: deque[MockRequest] = deque()
        self._running: list[MockRequest] = []
        self._requests: dict[str, MockRequest] = {}
        self._ids = itertools.count(1)
        self._wake = asyncio.Event()
        self._stopping = False
        self._clock = clock or StepClock()

    # --- submission --------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def hasher(self, cache_salt: str = "") -> BlockHasher:
        """The block hasher of a tenant (``cache_salt``; "" = none), salted with the model."""
        hasher = self._hashers.get(cache_salt)
        if hasher is None:
            hasher = BlockHasher(
                self.config.block_size, model_name=self.config.model, cache_salt=cache_salt
            )
            self._hashers[cache_salt] = hasher
        return hasher

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        cache_salt: str = "",
        handoff_tokens: int = 0,
    ) -> MockRequest:
        """Queue a request; its tokens arrive through :meth:`stream`.

        The caller has validated the request (ids in the vocabulary, ``1 <= max_tokens``,
        prompt + max_tokens <= max_model_len).

        Raises:
            RuntimeError: the engine is stopping.
        """
        if self._stopping:
            raise RuntimeError("the engine is shutting down")
        request = MockRequest(
            f"req-{next(self._ids)}",
            list(prompt_ids),
            params,
            self.hasher(cache_salt),
            self._clock.now(),
        )
        request.handoff_tokens = handoff_tokens
        self._requests[request.request_id] = request
        self._waiting.append(request)
        self.counters.requests_submitted += 1
        self._wake.set()
        return request

    async def stream(self, request: MockRequest) -> AsyncGenerator[TokenOut, None]:
        """The request's tokens as they are produced, the last one with its finish reason.

        Leaving the iteration early (the client went away) aborts the request.
        """
        async with contextlib.aclosing(self.stream_batches(request)) as batches:
            async for batch in batches:
                for out in batch:
                    yield out

    async def stream_batches(self, request: MockRequest) -> AsyncGenerator[list[TokenOut], None]:
        """Like :meth:`stream`, but each item is every token that has arrived since the last
        one: a reader that falls behind catches up with one write instead of one per token."""
        try:
            while True:
                batch = [await request.queue.get()]
                while not request.queue.empty():
                    batch.append(request.queue.get_nowait())
                yield batch
                if batch[-1].finish_reason is not None:
                    return
        finally:
            if request.finish_reason is None:
                self.abort(request.request_id)

    def abort(self, request_id: str) -> None:
        """End a request now (finish reason "abort") and free its blocks; no error if it has
        finished already."""
        request = self._requests.get(request_id)
        if request is None:
            return
        if request in self._running:
            self._running.remove(request)
            self.blocks.free(request_id)
        elif request in self._waiting:
            self._waiting.remove(request)
        self._finish(request, "abort")

    # --- the loop ----------------------------------------------------------------------------

    async def run(self) -> None:
        """Run engine steps until :meth:`stop`; then abort every request left."""
        clock = self._clock
        try:
            while not self._stopping:
                step = self._schedule(clock.due)
                if step is None:
                    if self._waiting and self._waiting[0].arrival > clock.due:
                        # Idle in model time until the next request arrived (it has already,
                        # on the wall clock: arrivals are stamped when submitted).
                        clock.start_at(self._waiting[0].arrival)
                        continue
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                await clock.step((step.prefill_ms + step.decode_ms) / 1000.0)
                self.counters.steps += 1
                self.counters.prefill_seconds += step.prefill_ms / 1000.0
                self.counters.decode_seconds += step.decode_ms / 1000.0
                self.counters.late_seconds = clock.late_s
                self.counters.slipped_seconds = clock.slipped_s
                self._complete(step)
        finally:
            clock.close()
            for request in [*self._running, *self._waiting]:
                self.abort(request.request_id)

    def stop(self) -> None:
        """Make :meth:`run` return after the current step; later submissions fail."""
        self._stopping = True
        self._wake.set()

    def dry_step(self) -> StepWork | None:
        """Schedule the next step and complete it at once, with no clock and every submitted
        request taken as arrived: a dry run of this scheduler, so that
        :mod:`kvferry.serving.mock.calibrate` knows which steps a request's TTFT and ITL span.
        None when nothing is left to run. Not for a running engine (:meth:`run` owns it)."""
        step = self._schedule(math.inf)
        if step is None:
            return None
        work = StepWork(
            tuple((n, r.prefill_pos) for r, n in step.prefill),
            len(step.decode),
            sum(len(r.tokens) for r, _ in step.decode),
        )
        self._complete(step)
        return work

    def _schedule(self, start: float) -> _Step | None:
        """The next step, starting at model time ``start``: requests that arrived after it
        wait for a later step, as they would at an engine that keeps the model's time."""
        budget = self.config.max_num_batched_tokens
        prefill: list[tuple[MockRequest, int]] = []
        decode: list[tuple[MockRequest, tuple[int, str]]] = []
        i = 0
        while i < len(self._running):
            request = self._running[i]
            if request.prefilling:
                chunk = min(len(request.tokens) - request.prefill_pos, budget)
                if chunk > 0:
                    prefill.append((request, chunk))
                    budget -= chunk
                i += 1
                continue
            if budget < 1:
                i += 1
                continue
            token = self._next_token(request)
            if not self._reserve_slot(request, token[0]):
                break  # it preempted itself: it was the newest, nothing runs after it
            decode.append((request, token))
            budget -= 1
            i += 1
        while self._waiting and budget > 0 and len(self._running) < self.config.max_num_seqs:
            request = self._waiting[0]
            if request.arrival > start or not self._admit(request):
                break
            self._waiting.popleft()
            self._running.append(request)
            chunk = min(len(request.tokens) - request.prefill_pos, budget)
            prefill.append((request, chunk))
            budget -= chunk
        if not prefill and not decode:
            return None
        chunks = [(n, r.prefill_pos) for r, n in prefill]
        context = sum(len(r.tokens) for r, _ in decode)
        return _Step(
            prefill,
            decode,
            self.timing.prefill_ms(chunks),
            self.timing.decode_ms(len(decode), context),
        )

    def _reserve_slot(self, request: MockRequest, token_id: int) -> bool:
        """Append the token the request produces next to its KV blocks, preempting the newest
        running requests while no block is left. False if ``request`` itself was preempted."""
        while not self.blocks.append_token(request.request_id, token_id):
            victim = self._running.pop()
            self._preempt(victim)
            if victim is request:
                return False
        return True

    def _preempt(self, request: MockRequest) -> None:
        self.blocks.free(request.request_id)
        self.counters.preemptions += 1
        # Recompute later: the prompt and the output so far are its new prefill.
        request.tokens = [*request.prompt_ids, *request.output_ids]
        request.hashes = None
        request.prefill_pos = 0
        request.prefilling = True
        self._waiting.appendleft(request)
        log.debug("preempted %s at %d tokens", request.request_id, len(request.tokens))

    def _admit(self, request: MockRequest) -> bool:
        if request.hashes is None:
            request.hashes = request.hasher.hashes(request.tokens)
        admission = self.blocks.admit(
            request.request_id,
            request.tokens,
            hashes=request.hashes,
            hasher=request.hasher,
            reserve_tokens=1,
        )
        if not admission.admitted:
            return False
        hit_tokens = admission.hit_blocks * self.config.block_size
        # A fully cached prompt still computes its last token (its logits give the next one).
        # P/D: tokens a prefill instance handed off count as loaded, not computed.
        handed = request.handoff_tokens if not request.admitted_once else 0
        request.prefill_pos = min(max(hit_tokens, handed), len(request.tokens) - 1)
        if not request.admitted_once:
            request.admitted_once = True
            request.cached_tokens = min(hit_tokens, request.num_prompt_tokens)
            self.counters.prompt_tokens += request.num_prompt_tokens
            self.counters.cached_prompt_tokens += request.cached_tokens
            self.counters.handoff_tokens += max(0, request.prefill_pos - hit_tokens)
        return True

    def _complete(self, step: _Step) -> None:
        """Emit what a step produced (requests aborted meanwhile are skipped)."""
        for request, chunk in step.prefill:
            if request.finish_reason is not None or request.request_id not in self.blocks:
                continue
            request.prefill_pos += chunk
            self.counters.prefill_tokens += chunk
            self.blocks.mark_computed(request.request_id, request.prefill_pos)
            if request.prefill_pos < len(request.tokens):
                continue
            request.prefilling = False
            token = self._next_token(request)
            # Its slot was reserved at admission (reserve_tokens=1): this never preempts.
            if self._reserve_slot(request, token[0]):
                self._emit(request, token)
        for request, token in step.decode:
            if request.finish_reason is not None or request.request_id not in self.blocks:
                continue
            self._emit(request, token)

    def _next_token(self, request: MockRequest) -> tuple[int, str]:
        pieces = self.tokenizer.pieces
        return pieces[(request.offset + request.num_output_tokens) % len(pieces)]

    def _emit(self, request: MockRequest, token: tuple[int, str]) -> None:
        """Hand out the request's next token (its KV slot is reserved); finish it if due."""
        token_id, text = token
        request.output_ids.append(token_id)
        request.tokens.append(token_id)
        self.counters.generated_tokens += 1
        n = request.num_output_tokens
        params = request.params
        reason: FinishReason | None = None
        if n >= params.max_tokens:
            reason = "length"
        elif not params.ignore_eos and n >= max(request.answer_tokens, params.min_tokens):
            reason = "stop"
        if reason is None:
            request.queue.put_nowait(TokenOut(token_id, text))
            return
        self._running.remove(request)
        self.blocks.free(request.request_id)
        request.queue.put_nowait(TokenOut(token_id, text, reason))
        self._finish(request, reason)

    def _finish(self, request: MockRequest, reason: FinishReason) -> None:
        self._requests.pop(request.request_id, None)
        if request.finish_reason is not None:
            return
        request.finish_reason = reason
        self.counters.requests_finished[reason] += 1
        if reason == "abort":
            request.queue.put_nowait(TokenOut(-1, "", "abort"))
