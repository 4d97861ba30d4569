"""--api-key: Bearer keys as SillyTavern sends them; a few routes stay public."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.helpers import ServerProcess, run_server

pytestmark = pytest.mark.slow  # starts real servers or browsers: not in `make test-fast`


@pytest.fixture(scope="module")
def keyed(tmp_path_factory) -> Iterator[ServerProcess]:
    key_file = tmp_path_factory.mktemp("keys") / "keys.txt"
    key_file.write_text("# comment\nsecond-key\n")
    with run_server(
        "--ctx-size",
        "1024",
        "--parallel",
        "1",
        "--api-key",
        "first-key",
        "--api-key-file",
        str(key_file),
        name="auth",
    ) as srv:
        yield srv


def test_requests_without_a_key_are_refused(keyed: ServerProcess) -> None:
    r = httpx.post(f"{keyed.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 1})
    assert r.status_code == 401
    assert "api key" in r.json()["error"]["message"].lower()
    r = httpx.get(f"{keyed.url}/api/v1/model")
    assert r.status_code == 401 and "detail" in r.json()
    r = httpx.get(f"{keyed.url}/v1/models", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401


def test_every_configured_key_works(keyed: ServerProcess) -> None:
    for key in ("first-key", "second-key"):
        r = httpx.get(f"{keyed.url}/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200
    client = openai.OpenAI(base_url=f"{keyed.url}/v1", api_key="second-key")
    assert client.completions.create(model="x", prompt="Hi", max_tokens=2).choices


def test_public_routes(keyed: ServerProcess) -> None:
    assert httpx.get(f"{keyed.url}/health").status_code == 200
    assert httpx.get(f"{keyed.url}/api/extra/version").json()["protected"] is True


KEY = {"Authorization": "Bearer first-key"}
LONG = {"prompt": "Tell me a story.", "ignore_eos": True, "temperature": 0.8, "stream": True}


def perf(url: str) -> dict:
    return httpx.get(f"{url}/api/extra/perf", headers=KEY, timeout=30).json()


@pytest.mark.parametrize("path", ["/api/extra/abort", "/v1/internal/stop-generation"])
def test_abort_routes_need_the_key(keyed: ServerProcess, path: str) -> None:
    """Nobody without the key stops other users' generations, cross-site pages included."""
    assert httpx.post(f"{keyed.url}{path}").status_code == 401
    r = httpx.post(
        f"{keyed.url}{path}",
        content=b"{}",
        headers={"Origin": "http://evil.com", "Content-Type": "text/plain"},
    )
    assert r.status_code in (401, 403)
    # the Origin check applies to the abort routes even with a key
    r = httpx.post(f"{keyed.url}{path}", headers={**KEY, "Origin": "http://evil.com"})
    assert r.status_code == 403
    assert httpx.post(f"{keyed.url}{path}", headers=KEY).status_code == 200


def test_unkeyed_abort_does_not_stop_an_authenticated_stream(keyed: ServerProcess) -> None:
    tokens, finish = 0, None
    body = {**LONG, "max_length": 40}
    with (
        httpx.Client(base_url=keyed.url, timeout=60, headers=KEY) as c,
        c.stream("POST", "/api/extra/generate/stream", json=body) as r,
    ):
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            tokens += 1
            if tokens == 3:  # mid-stream, a cross-site page and a keyless client abort
                for headers in ({"Origin": "http://evil.com"}, {}):
                    bad = httpx.post(f"{keyed.url}/api/extra/abort", headers=headers)
                    assert bad.status_code in (401, 403)
            if event["finish_reason"] != "null":
                finish = event["finish_reason"]
    assert finish == "length"
    assert perf(keyed.url)["last_token_count"] == 40  # ran to its full length


def test_closing_the_stream_stops_it_on_a_keyed_server(keyed: ServerProcess) -> None:
    """SillyTavern's Stop sends /api/extra/abort without the key (a 401 now), but it also
    closes the stream, and that alone frees the slot."""
    before = perf(keyed.url)["total_aborted"]
    with httpx.Client(base_url=keyed.url, timeout=60, headers=KEY) as c:
        with c.stream("POST", "/api/extra/generate/stream", json={**LONG, "max_length": 800}) as r:
            seen = 0
            for line in r.iter_lines():
                seen += line.startswith("data: ")
                if seen >= 5:
                    break
        assert httpx.post(f"{keyed.url}/api/extra/abort").status_code == 401
    t0 = time.monotonic()
    while (p := perf(keyed.url))["busy_slots"]:
        assert time.monotonic() - t0 < 2, p
        time.sleep(0.05)
    assert p["total_aborted"] == before + 1
