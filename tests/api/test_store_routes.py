"""Pull, cancel and delete over HTTP, against a real server and the local stand-in hub.

The server runs `innkeeper pull`'s code in a worker thread; the hub is tests/models/fakehub.py,
reached through HF_ENDPOINT exactly as the real hub would be. Downloads are throttled by the
hub so progress and a cancel mid-download can be watched.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from innkeeper.models import store
from tests.helpers import ServerProcess, run_server
from tests.models.fakehub import BIG_KIB, KIB, FakeHub, add_smollm2, build_repos, make_gguf

pytestmark = pytest.mark.slow  # starts real servers or browsers: not in `make test-fast`

BIG = "fake/Big-GGUF"
BIG_FILE = "Big-Q8_0.gguf"
SLOW = "fake/Slow-GGUF"  # as big, for the cancel test, so the tests do not share a store entry
SLOW_FILE = "Slow-Q8_0.gguf"
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    h = FakeHub()
    src = tmp_path_factory.mktemp("fakehub-src")
    build_repos(h, src)
    add_smollm2(h)
    slow = make_gguf(src / SLOW_FILE, n_floats=BIG_KIB * KIB // 4, seed=99)
    h.add_repo(SLOW, {SLOW_FILE: slow, "README.md": b"# slow"})
    with h:
        yield h


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("store")


def hub_env(hub: FakeHub, store_dir: Path) -> dict[str, str]:
    """The server's environment: the stand-in hub, no token, an empty store of its own."""
    return {
        "HF_ENDPOINT": hub.url,
        "HF_HOME": str(store_dir.parent / "hf-home"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_TOKEN": "",
        "INNKEEPER_MODELS": str(store_dir),
    }


@pytest.fixture(scope="module")
def server(hub: FakeHub, store_dir: Path) -> Iterator[ServerProcess]:
    with run_server("--ctx-size", "512", env=hub_env(hub, store_dir), name="store") as srv:
        yield srv


@pytest.fixture(autouse=True)
def _clean_hub(hub: FakeHub) -> Iterator[None]:
    yield
    hub.reset_faults()
    hub.reset_counters()


def pull(server: ServerProcess, ref: str, **kw: Any) -> str:
    r = httpx.post(f"{server.url}/api/innkeeper/pull", json={"ref": ref}, timeout=10, **kw)
    assert r.status_code == 200, r.text
    return str(r.json()["job"])


def job(server: ServerProcess, job_id: str) -> dict[str, Any]:
    r = httpx.get(f"{server.url}/api/innkeeper/pull/{job_id}", timeout=10)
    assert r.status_code == 200, r.text
    return dict(r.json())


def wait_job(
    server: ServerProcess, job_id: str, until: Any = None, timeout: float = 120
) -> tuple[dict[str, Any], list[int]]:
    """Poll a job until it ends (or `until(job)`); return it and every bytes_done seen."""
    seen: list[int] = []
    deadline = time.monotonic() + timeout
    while True:
        j = job(server, job_id)
        seen.append(j["bytes_done"])
        if (until is not None and until(j)) or j["state"] != "running":
            return j, seen
        assert time.monotonic() < deadline, f"pull job still running: {j}"
        time.sleep(0.1)


def listed(server: ServerProcess) -> dict[str, dict[str, Any]]:
    r = httpx.get(f"{server.url}/api/innkeeper/models", timeout=10)
    assert r.status_code == 200, r.text
    return {m["id"]: m for m in r.json()["models"]}


def store_names(server: ServerProcess) -> set[str]:
    return {m["store_name"] for m in listed(server).values() if m.get("store_name")}


def test_pull_reports_progress_then_lists_the_model(
    hub: FakeHub, server: ServerProcess, store_dir: Path
) -> None:
    hub.rates[hub.key(BIG, BIG_FILE)] = 6 * MIB  # ~4 s for the 24 MiB file
    job_id = pull(server, f"{BIG}:Q8_0")
    again = httpx.post(f"{server.url}/api/innkeeper/pull", json={"ref": "fake/big-gguf:q8_0"})
    assert again.json() == {"job": job_id, "started": False}  # one job per ref at a time
    final, seen = wait_job(server, job_id)
    size = hub.repos[BIG].files[BIG_FILE].size
    assert final["state"] == "done", final
    assert (final["model"], final["bytes_done"], final["bytes_total"]) == ("Big:Q8_0", size, size)
    assert final["file"] == BIG_FILE and final["error"] is None
    # Progress moved through the download: values strictly between 0 and the end, rising.
    middle = sorted({b for b in seen if 0 < b < size})
    assert middle, f"no progress seen before the end: {seen}"
    assert seen == sorted(seen)
    [entry] = [e for e in store.list_models(store_dir) if e.name == "Big:Q8_0"]
    assert entry.complete and entry.size == size
    assert "Big:Q8_0" in store_names(server)


def test_cancel_keeps_a_resumable_partial_and_the_next_pull_resumes(
    hub: FakeHub, server: ServerProcess, store_dir: Path
) -> None:
    key = hub.key(SLOW, SLOW_FILE)
    hub.rates[key] = 3 * MIB  # ~8 s for 24 MiB; huggingface_hub writes in 10 MB chunks
    job_id = pull(server, SLOW)
    j, _ = wait_job(server, job_id, until=lambda j: j["bytes_done"] > 0)
    assert j["state"] == "running", j
    r = httpx.post(f"{server.url}/api/innkeeper/pull/{job_id}/cancel", timeout=10)
    assert r.status_code == 200, r.text
    final, _ = wait_job(server, job_id)
    assert final["state"] == "cancelled", final
    variant = store_dir / "fake__Slow-GGUF" / "Q8_0"
    partial = [p for p in variant.iterdir() if p.name.endswith(store.PARTIAL_SUFFIX)]
    assert len(partial) == 1 and 0 < partial[0].stat().st_size < BIG_KIB * KIB
    assert not (variant / SLOW_FILE).exists()
    assert [e.complete for e in store.list_models(store_dir) if e.name == "Slow:Q8_0"] == [False]
    assert "Slow:Q8_0" not in store_names(server)
    kept = partial[0].stat().st_size
    hub.rates.clear()
    hub.reset_counters()
    final, _ = wait_job(server, pull(server, SLOW))
    assert final["state"] == "done", final
    # Resumed from the partial file, not from zero (a first range at 0 reads the header, to
    # choose the quant).
    assert hub.range_starts[key][-1] == kept
    assert "Slow:Q8_0" in store_names(server)


def test_delete_frees_what_a_cancelled_pull_left(
    hub: FakeHub, server: ServerProcess, store_dir: Path
) -> None:
    httpx.delete(f"{server.url}/api/innkeeper/models/Slow:Q8_0", timeout=30)  # any earlier one
    hub.rates[hub.key(SLOW, SLOW_FILE)] = 3 * MIB
    job_id = pull(server, SLOW)
    wait_job(server, job_id, until=lambda j: j["bytes_done"] > 0)
    refused = httpx.delete(f"{server.url}/api/innkeeper/models/Slow:Q8_0", timeout=30)
    assert refused.status_code == 409 and "cancel" in refused.json()["detail"]["msg"]
    httpx.post(f"{server.url}/api/innkeeper/pull/{job_id}/cancel", timeout=10)
    final, _ = wait_job(server, job_id)
    assert final["state"] == "cancelled" and final["model"] == "Slow:Q8_0"
    assert any(p.name.endswith(store.PARTIAL_SUFFIX) for p in store_dir.rglob("*"))
    r = httpx.delete(f"{server.url}/api/innkeeper/models/Slow:Q8_0", timeout=30)
    assert r.status_code == 200, r.text
    assert not (store_dir / "fake__Slow-GGUF").exists()


def test_delete_unloads_a_loaded_store_model_and_removes_its_files(
    server: ServerProcess, store_dir: Path
) -> None:
    root = store_dir
    final, _ = wait_job(server, pull(server, "fake/SmolLM2-135M-Instruct-GGUF"))
    assert final["state"] == "done", final
    name = final["model"]
    [model_id] = [i for i, m in listed(server).items() if m.get("store_name") == name]
    r = httpx.post(f"{server.url}/api/innkeeper/models/load", json={"model": model_id}, timeout=120)
    assert r.status_code == 200, r.text
    assert listed(server)[model_id]["status"] == "loaded"
    r = httpx.delete(f"{server.url}/api/innkeeper/models/{name}", timeout=60)
    assert r.status_code == 200, r.text
    assert model_id not in listed(server)
    assert not (root / "fake__SmolLM2-135M-Instruct-GGUF").exists()
    assert all(e.name != name for e in store.list_models(root))
    # The server still answers with its default model.
    r = httpx.post(
        f"{server.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=60
    )
    assert r.status_code == 200, r.text


def test_delete_refuses_what_is_not_in_the_store(server: ServerProcess) -> None:
    models = listed(server)
    embedded = next(i for i, m in models.items() if m["source"] == "embedded")
    r = httpx.delete(f"{server.url}/api/innkeeper/models/{embedded}", timeout=10)
    assert r.status_code == 400 and "embedded" in r.json()["detail"]["msg"]
    r = httpx.delete(f"{server.url}/api/innkeeper/models/Nope:Q4_0", timeout=10)
    assert r.status_code == 404 and "Nope:Q4_0" in r.json()["detail"]["msg"]
    assert embedded in listed(server)


@pytest.mark.parametrize("ref", ["../etc/passwd", "fake/Tiny-GGUF/../../x.gguf", "nope"])
def test_bad_refs_are_a_clear_400(server: ServerProcess, ref: str) -> None:
    r = httpx.post(f"{server.url}/api/innkeeper/pull", json={"ref": ref}, timeout=10)
    assert r.status_code == 400, r.text
    assert "hub reference" in r.json()["detail"]["msg"] or "path" in r.json()["detail"]["msg"]


def test_unknown_repo_fails_the_job_with_the_hubs_reason(server: ServerProcess) -> None:
    final, _ = wait_job(server, pull(server, "fake/Does-Not-Exist"))
    assert final["state"] == "failed" and "not found" in final["error"]
    r = httpx.get(f"{server.url}/api/innkeeper/pull/000000000000", timeout=10)
    assert r.status_code == 404 and "detail" in r.json()


def test_pull_and_delete_need_the_admin_key(hub: FakeHub, tmp_path: Path) -> None:
    env = hub_env(hub, tmp_path / "store")
    with run_server("--ctx-size", "512", "--admin-key", "adm1n", env=env, name="store-adm") as s:
        r = httpx.post(f"{s.url}/api/innkeeper/pull", json={"ref": f"{BIG}:Q8_0"}, timeout=10)
        assert r.status_code == 401 and "admin" in r.json()["detail"]["msg"]
        r = httpx.delete(f"{s.url}/api/innkeeper/models/Big:Q8_0", timeout=10)
        assert r.status_code == 401
        r = httpx.post(f"{s.url}/api/innkeeper/pull/x/cancel", timeout=10)
        assert r.status_code == 401
        ok = httpx.post(
            f"{s.url}/api/innkeeper/pull",
            json={"ref": "fake/Tiny-GGUF:Q2_K"},
            headers={"X-Admin-Key": "adm1n"},
            timeout=10,
        )
        assert ok.status_code == 200, ok.text


def test_delete_during_a_load_is_never_a_500_and_the_server_keeps_serving(
    server: ServerProcess, store_dir: Path
) -> None:
    final, _ = wait_job(server, pull(server, "fake/SmolLM2-135M-Instruct-GGUF"))
    assert final["state"] == "done", final
    name = final["model"]
    [model_id] = [i for i, m in listed(server).items() if m.get("store_name") == name]
    outcome: dict[str, httpx.Response] = {}

    def load() -> None:
        outcome["load"] = httpx.post(
            f"{server.url}/api/innkeeper/models/load", json={"model": model_id}, timeout=120
        )

    loader = threading.Thread(target=load)
    loader.start()
    time.sleep(0.03)
    deleted = httpx.delete(f"{server.url}/api/innkeeper/models/{name}", timeout=120)
    loader.join(120)
    assert deleted.status_code == 200, deleted.text
    # The delete waited for the load (one lock for both), then unloaded what it loaded; or
    # it went first and the load found no such model. Either way: no 5xx.
    assert outcome["load"].status_code in (200, 404), outcome["load"].text
    assert model_id not in listed(server)
    r = httpx.post(
        f"{server.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=60
    )
    assert r.status_code == 200, r.text
