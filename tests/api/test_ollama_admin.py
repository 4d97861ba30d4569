"""The admin rule through Ollama's routes on a server with `--admin-key`: pull and delete need
the key; without it, keep_alive 0 (in a request or an empty load request) never unloads,
naming an unloaded model never loads it, num_ctx never reloads, and status reads
(/api/tags, /api/show, /api/ps) never load anything."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator

import httpx
import ollama
import pytest

from innkeeper.models.store import default_model_path
from tests.helpers import ServerProcess, run_server

pytestmark = pytest.mark.slow  # starts real servers or browsers: not in `make test-fast`

SMOL = default_model_path().name.removesuffix(".gguf") + ":latest"
OTHER = "smol-copy:latest"  # a second file: a second model, never loaded here without the key
ADMIN = "adm-ollama"
CTX = 512


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    models = tmp_path_factory.mktemp("ollama-models")
    shutil.copyfile(default_model_path(), models / "smol-copy.gguf")
    store = tmp_path_factory.mktemp("ollama-store")
    with run_server(
        "--ctx-size", str(CTX), "--parallel", "1", "--models-dir", str(models),
        "--admin-key", ADMIN, env={"INNKEEPER_MODELS": str(store)}, name="ollama-keyed",
    ) as srv:  # fmt: skip
        yield srv


def loaded(srv: ServerProcess) -> dict[str, int]:
    rows = httpx.get(f"{srv.url}/api/ps", timeout=30).json()["models"]
    return {m["name"]: m["context_length"] for m in rows}


def generate(srv: ServerProcess, **body: object) -> httpx.Response:
    return httpx.post(
        f"{srv.url}/api/generate",
        json={
            "model": SMOL,
            "prompt": "Hi",
            "stream": False,
            "options": {"num_predict": 2},
            **body,
        },
        timeout=60,
    )


def test_status_reads_never_load(keyed: ServerProcess) -> None:
    names = [m["name"] for m in httpx.get(f"{keyed.url}/api/tags").json()["models"]]
    assert names == [SMOL, OTHER]
    shown = httpx.post(f"{keyed.url}/api/show", json={"model": OTHER}, timeout=30)
    assert shown.status_code == 200 and shown.json()["details"]["family"] == "llama"
    assert loaded(keyed) == {SMOL: CTX}


def test_pull_and_delete_need_the_key(keyed: ServerProcess) -> None:
    for method, path in (("POST", "/api/pull"), ("DELETE", "/api/delete")):
        body = {"model": "innkeeper-tests/none-GGUF"}
        r = httpx.request(method, f"{keyed.url}{path}", json=body, timeout=30)
        assert r.status_code == 401 and "admin" in r.json()["error"]
    admin = ollama.Client(host=keyed.url, headers={"X-Admin-Key": ADMIN}, timeout=60)
    with pytest.raises(ollama.ResponseError) as err:
        admin.delete("innkeeper-tests-none:Q4_K_M")
    assert err.value.status_code == 404  # past the rule: the store has no such model
    with pytest.raises(ollama.ResponseError) as err:
        admin.pull("innkeeper-tests/none-GGUF")  # past the rule: no hub to pull from
    assert err.value.status_code == 500


def test_without_the_key_nothing_loads_unloads_or_reloads(keyed: ServerProcess) -> None:
    assert generate(keyed, keep_alive=0).status_code == 200
    out = generate(keyed, prompt="", keep_alive=0).json()
    assert out["done_reason"] == "load"  # not "unload": keep_alive 0 needs the key
    r = generate(keyed, options={"num_predict": 2, "num_ctx": 1024})
    assert r.status_code == 200  # served with the context it has
    r = generate(keyed, model=OTHER)
    assert r.status_code == 409 and "admin" in r.json()["error"]
    r = generate(keyed, model=OTHER, prompt="")  # Ollama's load request
    assert r.status_code == 409
    time.sleep(1.5)  # the idle check runs every 0.5 s
    assert loaded(keyed) == {SMOL: CTX}


def test_the_admin_may_load_reload_and_unload(keyed: ServerProcess) -> None:
    admin = {"X-Admin-Key": ADMIN}
    r = httpx.post(
        f"{keyed.url}/api/generate",
        json={"model": OTHER, "prompt": "", "options": {"num_ctx": 256}},
        headers=admin,
        timeout=60,
    )
    assert r.status_code == 200 and r.json()["done_reason"] == "load"
    assert loaded(keyed)[OTHER] == 256
    r = httpx.post(
        f"{keyed.url}/api/generate",
        json={"model": OTHER, "prompt": "", "keep_alive": 0},
        headers=admin,
        timeout=60,
    )
    assert r.status_code == 200 and r.json()["done_reason"] == "unload"
    assert OTHER not in loaded(keyed)
