"""``kvferry.testing.browser`` against Debian's real chromium: small HTML fixtures written here,
one clean (a data-URI image, headings, a red block) and one broken on purpose (console.error, an
uncaught exception, a missing image, a request off the machine); what the browser saw is checked
through the DOM and the screenshot's pixels. Skips, with the reason, where chromium is absent
(``make test`` installs it)."""

from __future__ import annotations

import base64
import io
import os
import struct
import zlib
from pathlib import Path

import pytest

from kvferry.testing.browser import (
    MISSING_REASON,
    BrowserError,
    BrowserUnavailable,
    find_chromium,
    open_page,
)

# CI installs chromium (make test's system-deps): there a missing browser fails, not skips.
needs_browser = pytest.mark.skipif(
    find_chromium() is None and not os.environ.get("CI"), reason=MISSING_REASON
)


def _png(width: int, height: int, rgb: tuple[int, int, int]) -> bytes:
    """A solid-colour PNG, written by hand (no imaging library)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    row = b"\x00" + bytes(rgb) * width
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(row * height))
        + chunk(b"IEND", b"")
    )


GOOD = """<!doctype html>
<html><head><meta charset="utf-8"><title>kvferry fixture</title>
<style>#block {{ width: 300px; height: 120px; background: rgb(255, 0, 0); }}</style></head>
<body>
<h1>Lab run</h1>
<h2>Transfer</h2>
<p>Bandwidth 4.2 GB/s at 1 MiB blocks.</p>
<img alt="green" src="data:image/png;base64,{image}">
<div id="block"></div>
<h2>Store</h2>
</body></html>
"""

BROKEN = """<!doctype html>
<html><head><title>broken on purpose</title></head>
<body>
<h1>Broken</h1>
<img alt="missing" src="missing.png">
<img alt="remote" src="http://127.0.0.1:9/remote.png">
<script>
console.error("deliberate console error", 42);
throw new Error("deliberate exception");
</script>
</body></html>
"""


def _write_good(tmp_path: Path) -> Path:
    image = base64.b64encode(_png(40, 20, (0, 200, 0))).decode()
    page = tmp_path / "good.html"
    page.write_text(GOOD.format(image=image))
    return page


@needs_browser
def test_a_clean_page_is_read_through_the_dom_and_the_screenshot(tmp_path: Path) -> None:
    snap = open_page(_write_good(tmp_path), width=1000)
    assert snap.title == "kvferry fixture"
    assert snap.headings == ["Lab run", "Transfer", "Store"]
    assert "Bandwidth 4.2 GB/s at 1 MiB blocks." in snap.text
    assert (snap.images, snap.images_loaded) == (1, 1)
    assert snap.console_errors == [] and snap.external_requests == []
    png = snap.screenshot_png
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = struct.unpack(">II", png[16:24])
    assert width == 1000 and height >= 120
    # The pixels are the page's: the red block and the green data-URI image were painted.
    image = pytest.importorskip("PIL.Image")
    with image.open(io.BytesIO(png)) as shot:
        colours = {rgb for _, rgb in shot.convert("RGB").getcolors(maxcolors=1 << 20)}
    assert (255, 0, 0) in colours and (0, 200, 0) in colours


@needs_browser
def test_errors_missing_images_and_remote_requests_are_reported(tmp_path: Path) -> None:
    page = tmp_path / "broken.html"
    page.write_text(BROKEN)
    snap = open_page(page)
    assert snap.headings == ["Broken"]
    assert (snap.images, snap.images_loaded) == (2, 0)
    errors = "\n".join(snap.console_errors)
    assert "deliberate console error 42" in errors
    assert "Error: deliberate exception" in errors
    assert "missing.png" in errors
    assert snap.external_requests == ["http://127.0.0.1:9/remote.png"]


@needs_browser
def test_the_command_line_saves_the_screenshot_and_fails_on_console_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kvferry.testing.browser import main

    shot = tmp_path / "shot.png"
    assert main([str(_write_good(tmp_path)), "-o", str(shot)]) == 0
    assert shot.read_bytes().startswith(b"\x89PNG")
    assert "images: 1 of 1 loaded" in capsys.readouterr().out
    broken = tmp_path / "broken.html"
    broken.write_text(BROKEN)
    assert main([str(broken)]) == 1
    assert "console error: deliberate console error 42" in capsys.readouterr().out


def test_a_missing_page_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BrowserError, match="no such file"):
        open_page(tmp_path / "nope.html")


def test_no_browser_on_path_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert find_chromium() is None
    with pytest.raises(BrowserUnavailable, match="apt-get install chromium"):
        open_page(_write_good(tmp_path))


def test_a_browser_that_does_not_start_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BrowserError, match="chromium did not start"):
        open_page(_write_good(tmp_path), chromium="/bin/false", timeout_s=10)
