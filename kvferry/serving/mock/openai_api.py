"""The OpenAI-compatible request and response layer of the simulated engine.

Owns validating ``/v1/completions`` and ``/v1/chat/completions`` bodies against one engine's
tokenizer and limits (:class:`RequestParser`: every problem is an :class:`HttpError` with a
status, a message naming the field, the value and what is valid, and the offending ``param``),
and formatting OpenAI objects: error bodies, whole responses and streaming chunks
(:class:`CompletionFormatter`). The formats are documented in :mod:`kvferry.serving.mock.server`;
they
follow OpenAI's and vLLM's (``finish_reason`` on the last token's chunk, a usage chunk with empty
``choices``, ``prompt_tokens_details.cached_tokens``). No sockets and no engine state here.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from kvferry.config.models import MockConfig
from kvferry.serving.mock.scheduler import MockRequest, SamplingParams
from kvferry.serving.mock.tokenizer import MockTokenizer

__all__ = [
    "COMPLETIONS_DEFAULT_MAX_TOKENS",
    "CompletionFormatter",
    "HttpError",
    "ParsedRequest",
    "RequestParser",
    "bad_request",
    "check_text",
    "data_line",
    "error_body",
    "prompt_chars",
]

COMPLETIONS_DEFAULT_MAX_TOKENS: Final = 16
"""OpenAI's and vLLM's default ``max_tokens`` for /v1/completions."""


class HttpError(Exception):
    """A request the server answers with an error: HTTP status, message, offending parameter."""

    def __init__(self, status: int, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


_ERROR_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    500: "server_error",
    503: "service_unavailable",
}


def error_body(status: int, message: str, param: str | None = None) -> dict[str, object]:
    """OpenAI's error object: ``{"error": {"message", "type", "param", "code"}}``."""
    return {
        "error": {
            "message": message,
            "type": _ERROR_TYPES.get(status, "invalid_request_error"),
            "param": param,
            "code": status,
        }
    }


@dataclass(frozen=True)
class ParsedRequest:
    chat: bool
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool
    return_token_ids: bool
    cache_salt: str
    remote_decode: bool = False
    """P/D: ``kv_transfer_params.do_remote_decode``; the answer carries a hand-off."""
    handoff_tokens: int = 0
    """P/D: prompt tokens whose KV a mock prefill instance handed off (not computed here)."""


def bad_request(message: str, param: str | None = None) -> HttpError:
    """A 400 error."""
    return HttpError(400, message, param=param)


def check_text(text: str, param: str) -> None:
    """Text from a request must be valid Unicode: JSON can carry a lone UTF-16 surrogate
    (``"\\ud800"``), which no tokenizer or hash can encode.

    Raises:
        HttpError: 400 naming ``param`` when ``text`` holds a lone surrogate.
    """
    if text.isascii():
        return
    try:
        text.encode()
    except UnicodeEncodeError as e:
        raise bad_request(
            f"{param} is not valid Unicode: it holds {e.object[e.start : e.end]!r}, a lone "
            "UTF-16 surrogate (a \\ud800-\\udfff escape without its pair); send UTF-8 text",
            param,
        ) from e


def request_object(body: object, *, chat: bool, max_prompt_chars: int, key: str) -> dict[str, Any]:
    """``body`` as a request object whose prompt is within ``max_prompt_chars`` (the config
    key ``key`` sets it; the message names it).

    Raises:
        HttpError: 400 for a body that is not a JSON object or a prompt over the limit.
    """
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(body).__name__}")
    chars = prompt_chars(body, chat=chat)
    if chars > max_prompt_chars:
        raise bad_request(
            f"the prompt is {chars} characters; {key} is {max_prompt_chars}",
            "messages" if chat else "prompt",
        )
    return body


def prompt_chars(body: Mapping[str, Any], *, chat: bool) -> int:
    """Characters of a request's prompt text: ``prompt`` when it is a string, or the text of
    every message's ``content`` (strings and text parts); 0 for anything else."""
    if not chat:
        prompt = body.get("prompt")
        return len(prompt) if isinstance(prompt, str) else 0
    messages = body.get("messages")
    if not isinstance(messages, list):
        return 0
    total = 0
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            for part in content:
                text = part.get("text") if isinstance(part, dict) else None
                total += len(text) if isinstance(text, str) else 0
    return total


def _opt_bool(body: Mapping[str, Any], key: str) -> bool:
    value = body.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_request(f"{key} must be true or false, got {value!r}", key)
    return value


def _opt_int(body: Mapping[str, Any], key: str, minimum: int) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"{key} must be an integer, got {value!r}", key)
    if value < minimum:
        raise bad_request(f"{key} must be at least {minimum}, got {value}", key)
    return value


class RequestParser:
    """Validates request bodies against one engine's tokenizer and limits."""

    def __init__(self, config: MockConfig, tokenizer: MockTokenizer) -> None:
        self.config = config
        self.tokenizer = tokenizer

    def parse(self, body: object, *, chat: bool) -> ParsedRequest:
        """Validate a decoded JSON body of /v1/completions (``chat`` False) or
        /v1/chat/completions and tokenize its prompt.

        Raises:
            HttpError: 400 for an invalid body (the message names the field, the value and what
                is valid), 404 for a model this server does not serve.
        """
        body = request_object(
            body,
            chat=chat,
            max_prompt_chars=self.config.max_prompt_chars,
            key="mock.max_prompt_chars",
        )
        model = body.get("model")
        if model is not None and model != self.config.model:
            raise HttpError(
                404,
                f"the model {model!r} does not exist; this server serves {self.config.model!r}",
                param="model",
            )
        n = body.get("n")
        if n is not None and n != 1:
            raise bad_request(f"n must be 1 (one choice per request), got {n!r}", "n")
        for key in ("echo", "best_of", "logprobs", "top_logprobs"):
            value = body.get(key)
            if value not in (None, False) and not (key == "best_of" and value == 1):
                raise bad_request(f"{key} is not supported by the mock engine, got {value!r}", key)
        prompt_ids = self._chat_prompt(body) if chat else self._completion_prompt(body)
        prompt_len = len(prompt_ids)
        limit = self.config.model_len
        if prompt_len >= limit:
            raise self._too_long(prompt_len, "messages" if chat else "prompt")
        max_key = "max_completion_tokens" if chat and "max_completion_tokens" in body else None
        max_tokens = _opt_int(body, max_key or "max_tokens", 1)
        if max_tokens is None:
            max_tokens = limit - prompt_len if chat else COMPLETIONS_DEFAULT_MAX_TOKENS
            max_tokens = min(max_tokens, limit - prompt_len)
        elif prompt_len + max_tokens > limit:
            raise bad_request(
                f"max_model_len is {limit} tokens, but the request asks for "
                f"{prompt_len + max_tokens} ({prompt_len} in the prompt, {max_tokens} in the "
                "completion); lower max_tokens or shorten the prompt",
                max_key or "max_tokens",
            )
        min_tokens = _opt_int(body, "min_tokens", 0) or 0
        if min_tokens > max_tokens:
            raise bad_request(
                f"min_tokens ({min_tokens}) must not exceed max_tokens ({max_tokens})",
                "min_tokens",
            )
        stream = _opt_bool(body, "stream")
        options = body.get("stream_options")
        include_usage = False
        if options is not None:
            if not stream:
                raise bad_request(
                    "stream_options is only allowed with stream: true", "stream_options"
                )
            if not isinstance(options, dict):
                raise bad_request(
                    f"stream_options must be an object, got {options!r}", "stream_options"
                )
            include_usage = _opt_bool(options, "include_usage")
        salt = body.get("cache_salt")
        if salt is not None and (not isinstance(salt, str) or not salt):
            raise bad_request(f"cache_salt must be a non-empty string, got {salt!r}", "cache_salt")
        if salt is not None:
            check_text(salt, "cache_salt")
        remote_decode, handoff = _handoff(body.get("kv_transfer_params"), len(prompt_ids))
        return ParsedRequest(
            chat=chat,
            prompt_ids=prompt_ids,
            params=SamplingParams(
                max_tokens=max_tokens,
                min_tokens=min_tokens,
                ignore_eos=_opt_bool(body, "ignore_eos"),
            ),
            stream=stream,
            include_usage=include_usage,
            return_token_ids=_opt_bool(body, "return_token_ids"),
            cache_salt=salt or "",
            remote_decode=remote_decode,
            handoff_tokens=handoff,
        )

    def _too_long(self, prompt_len: int, param: str) -> HttpError:
        return bad_request(
            f"the prompt is {prompt_len} tokens; max_model_len is {self.config.model_len}, "
            "which must also leave room for at least one output token",
            param,
        )

    def _completion_prompt(self, body: Mapping[str, Any]) -> list[int]:
        if "prompt" not in body or body["prompt"] is None:
            raise bad_request("prompt is required: a string or a list of token ids", "prompt")
        prompt = body["prompt"]
        if isinstance(prompt, str):
            check_text(prompt, "prompt")
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, list):
            if prompt and all(isinstance(p, str | list) for p in prompt):
                raise bad_request(
                    "batched prompts (a list of strings or of token lists) are not supported; "
                    "send one prompt per request",
                    "prompt",
                )
            if len(prompt) >= self.config.model_len:  # before checking each id: it may be huge
                raise self._too_long(len(prompt), "prompt")
            vocab = self.tokenizer.vocab_size
            for i, token in enumerate(prompt):
                if isinstance(token, bool) or not isinstance(token, int):
                    raise bad_request(
                        f"prompt[{i}] must be an integer token id, got {token!r}", "prompt"
                    )
                if not 0 <= token < vocab:
                    raise bad_request(
                        f"prompt[{i}] = {token} is not a token id: ids are in [0, {vocab})",
                        "prompt",
                    )
            ids = list(prompt)
        else:
            raise bad_request(
                f"prompt must be a string or a list of token ids, got {type(prompt).__name__}",
                "prompt",
            )
        if not ids:
            raise bad_request("prompt is empty: give at least one token", "prompt")
        return ids

    def _chat_prompt(self, body: Mapping[str, Any]) -> list[int]:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise bad_request("messages is required: a non-empty list of messages", "messages")
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise bad_request(f"messages[{i}] must be an object, got {message!r}", "messages")
            role = message.get("role")
            if not isinstance(role, str) or not role:
                raise bad_request(f"messages[{i}].role must be a non-empty string", "messages")
            check_text(role, "messages")
            content = message.get("content")
            if content is None:
                continue
            if isinstance(content, str):
                check_text(content, "messages")
                continue
            if not isinstance(content, list):
                raise bad_request(
                    f"messages[{i}].content must be a string or a list of text parts",
                    "messages",
                )
            for j, part in enumerate(content):
                if (
                    not isinstance(part, dict)
                    or part.get("type") != "text"
                    or not isinstance(part.get("text"), str)
                ):
                    raise bad_request(
                        f"messages[{i}].content[{j}] must be {{'type': 'text', 'text': ...}}; "
                        "the mock engine takes text only",
                        "messages",
                    )
                check_text(part["text"], "messages")
        try:
            ids = self.tokenizer.chat_ids(messages)
        except ValueError as e:  # the model's chat template refused the conversation
            raise bad_request(str(e), "messages") from e
        if not ids:
            raise bad_request("messages render to an empty prompt", "messages")
        return ids


# --- responses -------------------------------------------------------------------------------


def _usage(request: MockRequest) -> dict[str, object]:
    prompt = request.num_prompt_tokens
    completion = request.num_output_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": request.cached_tokens},
    }


class CompletionFormatter:
    """Formats one request's OpenAI objects (completion or chat, chunk or whole)."""

    def __init__(self, parsed: ParsedRequest, request: MockRequest, model: str) -> None:
        self.parsed = parsed
        self.request = request
        self.model = model
        prefix = "chatcmpl" if parsed.chat else "cmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self._chunk_parts: tuple[str, str] | None = None

    def _head(self, obj: str) -> dict[str, object]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def chunk(self, text: str, token_ids: list[int], finish: str | None) -> dict[str, object]:
        choice: dict[str, object] = {"index": 0}
        if self.parsed.chat:
            choice["delta"] = {"content": text} if text or finish is None else {}
        else:
            choice["text"] = text
        choice["logprobs"] = None
        choice["finish_reason"] = finish
        if self.parsed.return_token_ids:
            choice["token_ids"] = token_ids
        out = self._head("chat.completion.chunk" if self.parsed.chat else "text_completion")
        out["choices"] = [choice]
        if self.parsed.include_usage:
            out["usage"] = None
        return out

    def chunk_bytes(self, text: str, token_id: int, finish: str | None) -> bytes:
        """``data_line(self.chunk(text, [token_id], finish))``, byte for byte, built from a
        prefix and suffix encoded once per request: this runs once per streamed token."""
        if self._chunk_parts is None:
            marker = "\x00kvferry\x00"
            template = data_line(self.chunk(marker, [0], None)).decode()
            before, _, after = template.partition(json.dumps(marker))
            self._chunk_parts = (before, after)
        before, after = self._chunk_parts
        parts = [before, json.dumps(text), after]
        if self.parsed.return_token_ids:
            parts[2] = parts[2].replace('"token_ids":[0]', f'"token_ids":[{token_id}]', 1)
        if finish is not None:
            if self.parsed.chat and not text:
                return data_line(self.chunk(text, [token_id], finish))
            parts[2] = parts[2].replace('"finish_reason":null', f'"finish_reason":"{finish}"', 1)
        return "".join(parts).encode()

    def role_chunk(self) -> dict[str, object]:
        choice: dict[str, object] = {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        out = self._head("chat.completion.chunk")
        out["choices"] = [choice]
        if self.parsed.return_token_ids:
            out["prompt_token_ids"] = self.request.prompt_ids
        if self.parsed.include_usage:
            out["usage"] = None
        return out

    def usage_chunk(self) -> dict[str, object]:
        out = self._head("chat.completion.chunk" if self.parsed.chat else "text_completion")
        out["choices"] = []
        out["usage"] = _usage(self.request)
        return out

    def whole(self, text: str, finish: str | None) -> dict[str, object]:
        choice: dict[str, object] = {"index": 0}
        if self.parsed.chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice["logprobs"] = None
        choice["finish_reason"] = finish
        if self.parsed.return_token_ids:
            choice["token_ids"] = list(self.request.output_ids)
        out = self._head("chat.completion" if self.parsed.chat else "text_completion")
        out["choices"] = [choice]
        out["usage"] = _usage(self.request)
        if self.parsed.return_token_ids:
            out["prompt_token_ids"] = self.request.prompt_ids
        if self.parsed.remote_decode:
            out["kv_transfer_params"] = {
                "do_remote_prefill": True,
                "do_remote_decode": False,
                "transfer_mode": MOCK_TRANSFER_MODE,
                "remote_num_tokens": len(self.request.prompt_ids),
            }
        return out


MOCK_TRANSFER_MODE = "kvferry-mock"
"""``kv_transfer_params["transfer_mode"]`` of a mock engine's P/D hand-off."""


def _handoff(params: object, prompt_len: int) -> tuple[bool, int]:
    """P/D as vLLM's pull-style connectors do it, simulated: (asked for remote decode, prompt
    tokens handed off by a mock prefill instance). Parameters of other engines are ignored,
    as vLLM ignores what its connector does not use."""
    if not isinstance(params, dict):
        return False, 0
    if params.get("do_remote_decode") is True:
        return True, 0
    tokens = params.get("remote_num_tokens")
    if (
        params.get("do_remote_prefill") is True
        and params.get("transfer_mode") == MOCK_TRANSFER_MODE
        and isinstance(tokens, int)
        and not isinstance(tokens, bool)
        and tokens > 0
    ):
        return False, min(tokens, prompt_len)
    return False, 0


def data_line(obj: Mapping[str, object]) -> bytes:
    """One SSE ``data:`` message of a JSON object."""
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
