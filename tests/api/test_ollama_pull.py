"""Ollama's /api/pull and /api/delete with the real `ollama` client, against the local
stand-in hub (tests/models/fakehub.py, reached through HF_ENDPOINT as the real hub would be):
progress lines, success, the model listed under its store name, then deleted."""

from __future__ import annotations

from collections.abc import Iterator

import ollama
import pytest

from tests.helpers import ServerProcess, run_server
from tests.models.fakehub import FakeHub, build_repos

pytestmark = pytest.mark.slow  # starts real servers or browsers: not in `make test-fast`

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    h = FakeHub()
    build_repos(h, tmp_path_factory.mktemp("fakehub-src"))
    with h:
        yield h


@pytest.fixture(scope="module")
def srv(hub: FakeHub, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    store = tmp_path_factory.mktemp("store")
    env = {
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(store.parent / "hf-home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_TOKEN": "",
        "INNKEEPER_MODELS": str(store),
    }
    with run_server("--ctx-size", "512", env=env, name="ollama-pull") as s:
        yield s


def test_pull_streams_progress_then_lists_and_deletes(hub: FakeHub, srv: ServerProcess) -> None:
    client = ollama.Client(host=srv.url, timeout=60)
    hub.rates[hub.key("fake/Big-GGUF", "Big-Q8_0.gguf")] = 8 * MIB  # a few seconds
    statuses = list(client.pull("fake/Big-GGUF:Q8_0", stream=True))
    assert statuses[0].status == "pulling manifest" and statuses[-1].status == "success"
    progress = [s for s in statuses if s.total]
    assert len(progress) >= 2
    done = [s.completed for s in progress]
    assert done == sorted(done) and done[-1] == progress[-1].total
    names = [m.model for m in client.list().models]
    assert "Big:Q8_0" in names
    assert client.show("Big:Q8_0").details is not None
    client.delete("Big:Q8_0")
    assert "Big:Q8_0" not in [m.model for m in client.list().models]
    with pytest.raises(ollama.ResponseError) as err:
        client.delete("Big:Q8_0")
    assert err.value.status_code == 404


def test_pull_without_streaming_waits_for_success(srv: ServerProcess) -> None:
    client = ollama.Client(host=srv.url, timeout=60)
    assert client.pull("fake/Tiny-GGUF:Q2_K").status == "success"
    assert "Tiny:Q2_K" in [m.model for m in client.list().models]
    with pytest.raises(ollama.ResponseError) as err:
        client.pull("fake/Does-Not-Exist")
    assert err.value.status_code == 500 and err.value.error
