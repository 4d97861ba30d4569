"""An OpenAI request naming an unpulled `owner/repo[:QUANT]`: pulled as `innkeeper pull` would
(a PullJobs job), then loaded and answered; an admin action, refused to other callers and
with --no-autoload; a download longer than the wait is a 503 naming the job. Against the
local stand-in hub, with an empty store per server."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.testclient import TestClient

from innkeeper.api.app import create_app
from innkeeper.models.store import DEFAULT_MODEL_FILE, default_model_path
from innkeeper.serving import store_jobs
from innkeeper.serving.registry import ModelRegistry
from innkeeper.settings.engine import EngineConfig
from innkeeper.settings.server import ServerConfig
from tests.helpers import run_server
from tests.models.fakehub import FakeHub, add_smollm2, build_repos

pytestmark = pytest.mark.slow  # starts real servers: not in `make test-fast`

PULLED = "SmolLM2-135M-Instruct:Q4_1"  # the store name of the stand-in hub's SmolLM2 repo


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    h = FakeHub()
    build_repos(h, tmp_path_factory.mktemp("fakehub-src"))
    with h:
        yield h


@pytest.fixture
def repo(hub: FakeHub) -> Iterator[str]:
    yield add_smollm2(hub)
    hub.reset_faults()
    hub.reset_counters()


def _env(hub: FakeHub, tmp_path: Path) -> dict[str, str]:
    return {
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_TOKEN": "",
        "INNKEEPER_MODELS": str(tmp_path / "store"),
    }


def _chat(model: str) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


def test_request_naming_a_hub_repo_pulls_then_answers(
    hub: FakeHub, repo: str, tmp_path: Path
) -> None:
    with run_server("--ctx-size", "512", env=_env(hub, tmp_path), name="autopull") as srv:
        r = httpx.post(f"{srv.url}/v1/chat/completions", json=_chat(repo), timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == PULLED
        ids = [m["id"] for m in httpx.get(f"{srv.url}/v1/models", timeout=10).json()["data"]]
        assert PULLED in ids
        hub.reset_counters()
        again = httpx.post(f"{srv.url}/v1/completions", json={**_chat(f"{repo}:q4_1")}, timeout=60)
        assert again.status_code == 200, again.text
        assert again.json()["model"] == PULLED
        assert sum(hub.bytes_served.values()) == 0  # from the store: the hub is not asked
        nope = httpx.post(f"{srv.url}/v1/chat/completions", json=_chat("fake/Nope-GGUF"))
        assert nope.status_code == 404 and "not found" in nope.text
    file = tmp_path / "store" / "fake__SmolLM2-135M-Instruct-GGUF" / "Q4_1" / DEFAULT_MODEL_FILE
    assert file.is_file()


# --- in process: the refusals and the 503, without a server process -----------------------


@pytest.fixture
def app_with(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A TestClient factory on the real app over an empty store and the stand-in hub."""
    for k, v in _env(hub, tmp_path).items():
        monkeypatch.setenv(k, v)
    clients: list[TestClient] = []

    def make(**settings: Any) -> TestClient:
        engine = EngineConfig(model_path=default_model_path(), ctx_size=512, threads=1)
        config = ServerConfig(engine=engine, port=5001, **settings).validate()
        client = TestClient(
            create_app(ModelRegistry(config, default_model_path()), config),
            base_url="http://127.0.0.1:5001",
        )
        clients.append(client.__enter__())  # one event loop for the jobs' registry refresh
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def test_not_an_admin_is_refused_before_any_download(
    app_with: Any, hub: FakeHub, repo: str, tmp_path: Path
) -> None:
    client = app_with(admin_keys=("ADMIN",))
    r = client.post("/v1/chat/completions", json=_chat(repo))
    assert r.status_code == 403 and "admin" in r.json()["error"]["message"]
    assert sum(hub.bytes_served.values()) == 0 and not (tmp_path / "store").exists()


def test_no_autoload_is_a_409_before_any_download(
    app_with: Any, hub: FakeHub, repo: str, tmp_path: Path
) -> None:
    client = app_with(autoload=False)
    r = client.post("/v1/chat/completions", json=_chat(f"{repo}:Q4_1"))
    assert r.status_code == 409 and "--no-autoload" in r.json()["error"]["message"]
    assert sum(hub.bytes_served.values()) == 0


def test_a_client_model_name_on_a_one_model_server_pulls_nothing(
    app_with: Any, hub: FakeHub, repo: str
) -> None:
    """`model` picks nothing where there is one model: "openai/gpt-4o" is not a pull."""
    client = app_with()
    body = {"model": "openai/gpt-4o", "prompt": "Hi", "max_tokens": 1}
    assert client.post("/v1/completions", json=body).status_code == 200
    assert sum(hub.bytes_served.values()) == 0


def test_a_long_download_is_a_503_naming_the_job_then_served(
    app_with: Any, hub: FakeHub, repo: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_jobs, "AUTOPULL_WAIT_SECONDS", 0.3)
    hub.rates[hub.key(repo, DEFAULT_MODEL_FILE)] = 40 * 2**20  # about 2.5 s for the file
    client = app_with()
    r = client.post("/v1/chat/completions", json=_chat(repo))
    assert r.status_code == 503, r.text
    assert r.headers["Retry-After"] == "10"
    found = re.search(r"job ([0-9a-f]+)", r.json()["error"]["message"])
    assert found is not None, r.text
    job_id = found.group(1)
    deadline = time.monotonic() + 60
    while (state := client.get(f"/api/innkeeper/pull/{job_id}").json())["state"] == "running":
        assert time.monotonic() < deadline, state
        time.sleep(0.2)
    assert state["state"] == "done" and state["model"] == PULLED
    r = client.post("/v1/chat/completions", json=_chat(repo))
    assert r.status_code == 200, r.text
    assert r.json()["model"] == PULLED
