"""Browser fixtures: Debian's Chromium driven by Playwright, against real innkeeper servers.

Playwright's own browser download cannot work offline, so the tests use the system
`chromium` (`apt-get install chromium`) and skip with a clear reason when it is missing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import ARTIFACTS, ServerProcess, run_server

SHOTS = ARTIFACTS / "web"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}


def chromium_path() -> str | None:
    """The system Chromium: $INNKEEPER_CHROMIUM, /usr/bin/chromium, or one on PATH."""
    for candidate in (
        os.environ.get("INNKEEPER_CHROMIUM"),
        "/usr/bin/chromium",
        shutil.which("chromium"),
        shutil.which("chromium-browser"),
    ):
        if candidate and Path(candidate).is_file():
            return candidate
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    exe = chromium_path()
    if exe is None:
        pytest.skip("no Chromium found: install it with `apt-get install -y chromium`")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the `playwright` package is not installed")
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def web_server() -> Iterator[ServerProcess]:
    with run_server("--parallel", "2", "--ctx-size", "2048", name="web") as srv:
        yield srv


@contextlib.contextmanager
def open_page(browser: Any, url: str, ready: str) -> Iterator[Any]:
    """A fresh browser profile (empty storage) on `url`, once `ready` matches; the test fails
    if the page threw a JavaScript error meanwhile."""
    context = browser.new_context(viewport=DESKTOP)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.goto(url)
    pg.wait_for_selector(ready)
    yield pg
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"
