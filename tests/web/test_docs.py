"""/docs and /redoc work offline: every asset comes from the server, behind its API key."""

from __future__ import annotations

import re
from collections.abc import Iterator
from html.parser import HTMLParser
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx
import pytest

from tests.helpers import ServerProcess, run_server
from tests.web.conftest import DESKTOP, SHOTS

pytestmark = pytest.mark.slow  # starts real servers or browsers: not in `make test-fast`

KEY = "docs-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
ASSET_TYPES = {".js": "javascript", ".css": "text/css"}


@pytest.fixture(scope="module")
def keyed() -> Iterator[ServerProcess]:
    with run_server("--api-key", KEY, "--ctx-size", "512", "--parallel", "1", name="docs") as srv:
        yield srv


class Links(HTMLParser):
    """Every URL an HTML page makes the browser load: src and href attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [v for k, v in attrs if k in ("src", "href") and v]


def page_urls(html: str) -> list[str]:
    parser = Links()
    parser.feed(html)
    return parser.urls


@pytest.mark.parametrize("path", ["/docs", "/redoc"])
def test_docs_pages_load_nothing_from_other_hosts(keyed: ServerProcess, path: str) -> None:
    r = httpx.get(keyed.url + path, headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    # no absolute URL at all: no CDN script, stylesheet, favicon, font or validator badge
    assert re.findall(r"https?://|//[a-z0-9.-]+\.[a-z]{2,}/", r.text, re.I) == []
    urls = page_urls(r.text)
    assets = [u for u in urls if u.endswith((".js", ".css"))]
    assert len(assets) == (2 if path == "/docs" else 1), urls
    for url in urls:
        full = urljoin(keyed.url + path, url)
        assert urlsplit(full).netloc == urlsplit(keyed.url).netloc
        got = httpx.get(full, headers=AUTH)
        assert got.status_code == 200, url
        suffix = "." + url.rsplit(".", 1)[-1]
        if suffix in ASSET_TYPES:
            assert ASSET_TYPES[suffix] in got.headers["content-type"], (url, got.headers)
            assert len(got.content) > 100_000  # the real bundle, not a stub


def test_docs_stay_behind_the_api_key(keyed: ServerProcess) -> None:
    """As before: the pages and the schema need the key; so do their assets (only the page's
    own /static/ files, the favicon here, answer without one)."""
    html = httpx.get(keyed.url + "/docs", headers=AUTH).text
    assets = [u for u in page_urls(html) if u.startswith("/") and not u.startswith("/static/")]
    for path in ("/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect", *assets):
        assert httpx.get(keyed.url + path).status_code == 401, path
        assert httpx.get(keyed.url + path, headers=AUTH).status_code == 200, path


@pytest.mark.browser
@pytest.mark.parametrize(
    ("path", "operation"),
    [
        ("/docs", ".opblock-summary-path[data-path='/v1/completions']"),
        ("/redoc", "[data-section-id='tag/OpenAI/operation/completions_v1_completions_post']"),
    ],
)
def test_docs_render_with_the_internet_blocked(
    browser: Any, keyed: ServerProcess, path: str, operation: str
) -> None:
    """In Chromium, with every request to a non-loopback host refused, the page still lists
    the API's operations, and it did not even try another host."""
    context = browser.new_context(viewport=DESKTOP, extra_http_headers=AUTH)
    outside: list[str] = []

    def only_loopback(route: Any) -> None:
        if urlsplit(route.request.url).hostname in LOOPBACK:
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    context.route("**/*", only_loopback)
    pg = context.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        pg.goto(keyed.url + path)
        pg.wait_for_selector(operation, timeout=30_000)
        pg.wait_for_load_state("networkidle")
        pg.screenshot(path=str(SHOTS / f"10-docs-{path.strip('/')}.png"))
    finally:
        context.close()
    assert outside == []
    assert errors == []
