"""--api-key: Bearer keys as SillyTavern sends them; a few routes stay public."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.helpers import ServerProcess, run_server


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
    assert httpx.post(f"{keyed.url}/api/extra/abort").status_code == 200  # ST sends it bare
    assert httpx.get(f"{keyed.url}/api/extra/version").json()["protected"] is True
