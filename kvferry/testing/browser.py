"""A real headless browser for tests and docs: open a local HTML file in Chromium and say what
a reader would see.

Owns starting Debian's ``chromium`` (``apt-get install chromium``; nothing is downloaded at run
time) headless, in a fresh profile of its own, and driving it over the Chrome DevTools Protocol
on a websocket (aiohttp, already a dependency): load the page, collect what it logged as an
error (``console.error``, uncaught exceptions, resources that failed to load), read the DOM's
text, headings and images, list every request that left the machine, and take a PNG screenshot
of the whole page. It judges nothing: callers assert on the :class:`PageSnapshot`.

:func:`find_chromium` says whether a browser is here; a test skips with
:data:`MISSING_REASON` when it is not. ``python -m kvferry.testing.browser PAGE.html -o
shot.png`` takes a screenshot from the shell (the README's picture of the report).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from kvferry.errors import KvferryError
from kvferry.launcher import LaunchError, launch

__all__ = [
    "CANDIDATES",
    "MISSING_REASON",
    "BrowserError",
    "BrowserUnavailable",
    "PageSnapshot",
    "find_chromium",
    "open_page",
]

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
"""Browser commands looked for on PATH, in order (Debian's package installs ``chromium``)."""

MISSING_REASON = (
    "no headless browser: install Debian's chromium (apt-get install chromium, or make system-deps)"
)

READY_PREFIX = "DevTools listening on "
"""Chromium's line on stderr once its DevTools endpoint accepts connections."""

LOCAL_SCHEMES = ("file", "data", "about", "blob", "chrome", "devtools")
"""Schemes of requests that stay on the machine; any other is listed as external."""

_FLAGS = (
    "--headless",
    # The sandbox needs user namespaces, which containers and root often lack; the pages opened
    # are local files a test or the lab wrote.
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",  # a container's /dev/shm may be 64 MiB
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-extensions",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--mute-audio",
    "--hide-scrollbars",
    "--remote-debugging-port=0",
)

_READ_PAGE = """JSON.stringify({
  title: document.title,
  text: document.body ? document.body.innerText : "",
  headings: Array.from(document.querySelectorAll("h1, h2, h3, h4"),
                       h => h.innerText.trim()),
  images: document.images.length,
  loaded: Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0).length,
  width: Math.max(document.documentElement.scrollWidth,
                  document.body ? document.body.scrollWidth : 0),
  height: Math.max(document.documentElement.scrollHeight,
                   document.body ? document.body.scrollHeight : 0),
})"""


class BrowserUnavailable(KvferryError):
    """No Chromium to run (see :data:`MISSING_REASON`)."""


class BrowserError(KvferryError):
    """The browser did not start, the page did not load in time, or the protocol failed."""


@dataclass(frozen=True)
class PageSnapshot:
    """What the browser saw of one page once it had loaded."""

    url: str
    title: str
    text: str
    """The body's rendered text (``innerText``: what is visible, as laid out)."""
    headings: list[str]
    """The text of every h1..h4, in document order."""
    images: int
    """``<img>`` elements."""
    images_loaded: int
    """Of those, the ones that loaded and decoded (``naturalWidth > 0``)."""
    console_errors: list[str]
    """``console.error`` calls, uncaught exceptions and resources that failed to load."""
    external_requests: list[str] = field(default_factory=list)
    """URLs the page asked for that are not local (file:, data: ...): a self-contained page
    has none."""
    screenshot_png: bytes = b""
    """The whole page (up to ``max_height`` CSS pixels) at the given width, as PNG."""
    page_width: int = 0
    page_height: int = 0
    """The page's scroll size in CSS pixels."""

    def save_screenshot(self, path: str | Path) -> Path:
        out = Path(path)
        out.write_bytes(self.screenshot_png)
        return out


def find_chromium() -> str | None:
    """The path of the first of :data:`CANDIDATES` on PATH, or None."""
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


class _Cdp:
    """One DevTools websocket: numbered calls answered by id, and the events seen so far."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.next_id = 0
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.changed = asyncio.Event()
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            if "id" in data:
                future = self.pending.pop(data["id"], None)
                if future is not None and not future.done():
                    future.set_result(data)
            else:
                self.events.append((data.get("method", ""), data.get("params", {})))
                self.changed.set()
        for future in self.pending.values():  # the browser went away
            if not future.done():
                future.set_exception(BrowserError("the browser closed the DevTools connection"))

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[self.next_id] = future
        await self.ws.send_str(json.dumps({"id": self.next_id, "method": method, "params": params}))
        reply = await future
        if "error" in reply:
            raise BrowserError(f"{method}: {reply['error'].get('message', reply['error'])}")
        result: dict[str, Any] = reply.get("result", {})
        return result

    async def wait_for(self, method: str) -> dict[str, Any]:
        seen = 0
        while True:
            for name, params in self.events[seen:]:
                if name == method:
                    return params
            seen = len(self.events)
            self.changed.clear()
            await self.changed.wait()

    async def close(self) -> None:
        self.reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.reader
        await self.ws.close()


def _console_errors(events: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
    errors = []
    for method, p in events:
        if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            args = p.get("args", [])
            errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in args))
        elif method == "Runtime.exceptionThrown":
            details = p.get("exceptionDetails", {})
            exc = details.get("exception", {})
            errors.append(str(exc.get("description") or details.get("text", "exception")))
        elif method == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            entry = p["entry"]
            where = f" ({entry['url']})" if entry.get("url") else ""
            errors.append(f"{entry.get('text', '')}{where}")
    return errors


def _external(events: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
    urls = []
    for method, p in events:
        if method == "Network.requestWillBeSent":
            url = str(p.get("request", {}).get("url", ""))
            if urlsplit(url).scheme not in LOCAL_SCHEMES:
                urls.append(url)
    return urls


async def _snapshot(
    port: int, url: str, *, width: int, max_height: int, settle_s: float
) -> PageSnapshot:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/json/list") as r:
            targets = await r.json()
        page = next((t for t in targets if t.get("type") == "page"), None)
        if page is None:
            raise BrowserError("the browser has no page to drive")
        # max_msg_size 0: a full-page screenshot is one message of many megabytes
        ws = await http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
        cdp = _Cdp(ws)
        try:
            for domain in ("Page", "Runtime", "Log", "Network"):
                await cdp.call(f"{domain}.enable")
            await cdp.call(
                "Emulation.setDeviceMetricsOverride",
                width=width,
                height=900,
                deviceScaleFactor=1,
                mobile=False,
            )
            nav = await cdp.call("Page.navigate", url=url)
            if nav.get("errorText"):
                raise BrowserError(f"cannot open {url}: {nav['errorText']}")
            await cdp.wait_for("Page.loadEventFired")
            await asyncio.sleep(settle_s)  # a script's errors after load still count
            found = await cdp.call("Runtime.evaluate", expression=_READ_PAGE, returnByValue=True)
            info = json.loads(found["result"]["value"])
            height = max(1, min(int(info["height"]), max_height))
            await cdp.call(
                "Emulation.setDeviceMetricsOverride",
                width=width,
                height=height,
                deviceScaleFactor=1,
                mobile=False,
            )
            shot = await cdp.call("Page.captureScreenshot", format="png")
            events = list(cdp.events)
        finally:
            await cdp.close()
    return PageSnapshot(
        url=url,
        title=str(info["title"]),
        text=str(info["text"]),
        headings=[str(h) for h in info["headings"]],
        images=int(info["images"]),
        images_loaded=int(info["loaded"]),
        console_errors=_console_errors(events),
        external_requests=_external(events),
        screenshot_png=base64.b64decode(shot["data"]),
        page_width=int(info["width"]),
        page_height=int(info["height"]),
    )


def open_page(
    path: str | Path,
    *,
    width: int = 1280,
    max_height: int = 16000,
    timeout_s: float = 60.0,
    settle_s: float = 0.2,
    chromium: str | None = None,
) -> PageSnapshot:
    """Open the local HTML file ``path`` in headless Chromium and return what it saw.

    Args:
        path: an HTML file on this machine (opened as ``file://``).
        width: the viewport's width in CSS pixels; the screenshot is this wide.
        max_height: the screenshot's height is the page's, at most this (CSS pixels).
        timeout_s: for the browser to start and the page to load and be read.
        settle_s: seconds after the load event before reading (late script errors count).
        chromium: the browser command (default: :func:`find_chromium`).

    Raises:
        BrowserUnavailable: no Chromium on PATH.
        BrowserError: ``path`` is not a file, the browser did not start, or the page did
            not load within ``timeout_s``.
    """
    page = Path(path)
    if not page.is_file():
        raise BrowserError(f"cannot open {str(page)!r}: no such file")
    command = chromium or find_chromium()
    if command is None:
        raise BrowserUnavailable(MISSING_REASON)
    url = page.resolve().as_uri()
    with tempfile.TemporaryDirectory(prefix="kvferry-browser-") as profile:
        log = Path(profile) / "chromium.log"
        argv = [command, *_FLAGS, f"--user-data-dir={profile}/data", "about:blank"]
        try:
            child, line = launch(
                argv, READY_PREFIX, timeout_s, what="chromium", output="log", log=log
            )
        except (LaunchError, OSError) as e:
            raise BrowserError(f"chromium did not start: {e}") from e
        with child:
            port = urlsplit(line[len(READY_PREFIX) :].strip()).port
            if port is None:
                raise BrowserError(f"chromium's DevTools line names no port: {line!r}")
            try:
                return asyncio.run(
                    asyncio.wait_for(
                        _snapshot(port, url, width=width, max_height=max_height, settle_s=settle_s),
                        timeout_s,
                    )
                )
            except TimeoutError as e:
                raise BrowserError(f"{url} did not load within {timeout_s:g} s") from e
            except aiohttp.ClientError as e:
                raise BrowserError(f"the DevTools connection failed: {e}") from e


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kvferry.testing.browser PAGE.html [-o shot.png]``: print what the browser
    saw (title, headings, images, errors) and save the screenshot."""
    parser = argparse.ArgumentParser(prog="python -m kvferry.testing.browser")
    parser.add_argument("page", help="a local HTML file")
    parser.add_argument("-o", "--screenshot", metavar="PNG", help="write the screenshot here")
    parser.add_argument("--width", type=int, default=1280, help="viewport width (CSS px)")
    parser.add_argument("--max-height", type=int, default=16000, help="screenshot height cap")
    args = parser.parse_args(argv)
    try:
        snap = open_page(args.page, width=args.width, max_height=args.max_height)
    except KvferryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"title: {snap.title}")
    print(f"page: {snap.page_width} x {snap.page_height} CSS px")
    print(f"images: {snap.images_loaded} of {snap.images} loaded")
    for heading in snap.headings:
        print(f"heading: {heading}")
    for error in snap.console_errors:
        print(f"console error: {error}")
    for url in snap.external_requests:
        print(f"external request: {url}")
    if args.screenshot:
        print(f"screenshot: {snap.save_screenshot(args.screenshot)}")
    return 1 if snap.console_errors else 0


if __name__ == "__main__":
    sys.exit(main())
