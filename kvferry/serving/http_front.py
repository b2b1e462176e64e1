"""What every kvferry HTTP server (``serve mock``, ``serve router``) does around its handlers.

:func:`front_middleware` is one aiohttp middleware with the shared rules: a Bearer token on every
path but ``/health`` when a token is set (compared in constant time), OpenAI-style JSON errors
for :class:`~kvferry.serving.openai_api.HttpError` and for aiohttp's own 404/405/413, a 500 for
this request only when a handler has a bug, and a count of responses per (path, status).
:func:`listen` binds the server's socket (a clear error naming the config keys) and
:func:`serve_app` runs an app on it.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import socket
from collections.abc import Awaitable, Callable, Collection

from aiohttp import web
from aiohttp.typedefs import Middleware

from kvferry.errors import ConfigError
from kvferry.serving.openai_api import HttpError, error_body

__all__ = [
    "Handler",
    "bearer_authorized",
    "error_response",
    "front_middleware",
    "listen",
    "serve_app",
]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def listen(host: str, port: int, section: str) -> socket.socket:
    """A listening TCP socket on ``host:port`` (IPv6 when ``host`` has a colon).

    Raises:
        ConfigError: it cannot be bound; names ``<section>.port`` and ``<section>.bind_address``.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=1024)
    except OSError as e:
        raise ConfigError(
            f"{section} server cannot listen on {host}:{port}: {e.strerror or e}; choose another "
            f"{section}.port (0 picks a free one) or {section}.bind_address"
        ) from e


async def serve_app(
    app: web.Application, sock: socket.socket, shutdown_timeout: float
) -> tuple[web.AppRunner, tuple[str, int]]:
    """Serve ``app`` on ``sock``; returns the runner (``cleanup()`` stops it) and the address
    bound. The socket is closed if serving cannot start."""
    runner = web.AppRunner(
        app, access_log=None, handle_signals=False, shutdown_timeout=shutdown_timeout
    )
    try:
        await runner.setup()
        await web.SockSite(runner, sock).start()
    except BaseException:
        sock.close()
        await runner.cleanup()
        raise
    bound = sock.getsockname()
    return runner, (str(bound[0]), int(bound[1]))


def error_response(status: int, message: str, param: str | None = None) -> web.Response:
    """An OpenAI-style error body with ``status`` (and the auth challenge on a 401)."""
    headers = {"WWW-Authenticate": 'Bearer realm="kvferry"'} if status == 401 else None
    return web.json_response(error_body(status, message, param), status=status, headers=headers)


def bearer_authorized(request: web.Request, token: bytes | None) -> bool:
    """True when no token is required or the request's ``Authorization: Bearer`` matches it."""
    if token is None:
        return True
    header = request.headers.get("Authorization", "")
    if not header.startswith("Bearer "):
        return False
    # compare_digest: the time taken does not reveal how much of the token matched.
    return hmac.compare_digest(header[len("Bearer ") :].strip().encode(), token)


def front_middleware(
    name: str,
    token: bytes | None,
    paths: Collection[str],
    responses: dict[tuple[str, int], int],
    log: logging.Logger,
) -> Middleware:
    """The middleware of a server called ``name`` (in log lines).

    Args:
        token: the shared token, or None for no auth.
        paths: the paths counted by name; any other path is counted as "other".
        responses: the (path, status) -> count dict it adds to.
        log: where a handler's unexpected exception is logged.
    """

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path if request.path in paths else "other"
        response: web.StreamResponse
        try:
            if token is not None and path != "/health" and not bearer_authorized(request, token):
                response = error_response(
                    401, "missing or wrong API key: send Authorization: Bearer <token>"
                )
            else:
                response = await handler(request)
        except HttpError as e:
            response = error_response(e.status, e.message, e.param)
        except web.HTTPException as e:  # aiohttp's own: unknown path, wrong method, too large
            message = e.text or e.reason
            if e.status == 404:
                message = f"{request.method} {request.path} not found"
            elif e.status == 405:
                message = f"{request.method} is not allowed on {request.path}"
            response = error_response(e.status, message)
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception as e:  # isolation boundary: a bug is a 500 for this request only
            log.exception("%s: %s %s failed", name, request.method, request.path)
            response = error_response(500, f"internal error: {type(e).__name__}: {e}")
        key = (path, response.status)
        responses[key] = responses.get(key, 0) + 1
        return response

    return middleware
