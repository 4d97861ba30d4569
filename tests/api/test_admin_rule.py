"""The admin rule over HTTP, as an attacker tries it: with `--admin-key` set, a request without
it never loads, unloads or evicts a model (autoload, keep_alive, `model`, `?model=`); status
reads never load; cross-site pages cannot reach a keyless server blind; load settings of the
wrong JSON type are a 400, never a crash; host paths are for admins only."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from innkeeper.models.store import default_model_path
from tests.helpers import ServerProcess, run_server

pytestmark = pytest.mark.slow  # starts real servers or browsers: not in `make test-fast`

SMOL = default_model_path().name.removesuffix(".gguf")
GEMMA = "gemma-3-270m-q4_k_m"
ADMIN = "adm-1n"
KEY = "user-key"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory, gemma_path: Path) -> Path:
    d = tmp_path_factory.mktemp("models")
    (d / gemma_path.name).symlink_to(gemma_path)
    return d


def serve(models_dir: Path, *args: str, name: str) -> Iterator[ServerProcess]:
    store = models_dir.parent / f"store-{name}"
    store.mkdir(exist_ok=True)
    with run_server(
        "--ctx-size", "512", "--parallel", "1", "--models-dir", str(models_dir), *args,
        env={"INNKEEPER_MODELS": str(store)}, name=name,
    ) as srv:  # fmt: skip
        yield srv


@pytest.fixture(scope="module")
def keyed(models_dir: Path) -> Iterator[ServerProcess]:
    """An admin key, autoload on (the default): the rule, not --no-autoload, must hold."""
    yield from serve(models_dir, "--admin-key", ADMIN, name="rule-keyed")


@pytest.fixture(scope="module")
def keyless(models_dir: Path) -> Iterator[ServerProcess]:
    yield from serve(models_dir, name="rule-keyless")


def states(srv: ServerProcess) -> dict[str, str]:
    data = httpx.get(f"{srv.url}/models", timeout=30).json()["data"]
    return {m["id"]: m["status"]["value"] for m in data}


def chat(srv: ServerProcess, **extra: object) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **extra}
    return httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=60)


def test_keep_alive_zero_without_the_admin_key_does_not_unload(keyed: ServerProcess) -> None:
    assert chat(keyed, keep_alive=0).status_code == 200
    assert chat(keyed, keep_alive="0s").status_code == 200
    time.sleep(1.5)  # the idle check runs every 0.5 s
    assert states(keyed)[SMOL] == "loaded"


def test_naming_another_model_without_the_admin_key_is_a_409(keyed: ServerProcess) -> None:
    r = chat(keyed, model=GEMMA)
    assert r.status_code == 409 and "admin" in r.json()["error"]["message"]
    r = httpx.post(f"{keyed.url}/tokenize", json={"content": "hi", "model": GEMMA}, timeout=30)
    assert r.status_code == 409
    r = httpx.get(f"{keyed.url}/props", params={"model": GEMMA}, timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "unloaded"
    assert states(keyed) == {SMOL: "loaded", GEMMA: "unloaded"}
    # The admin's own request may switch.
    r = httpx.post(
        f"{keyed.url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "model": GEMMA},
        headers={"X-Admin-Key": ADMIN},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    assert states(keyed)[GEMMA] == "loaded"
    httpx.post(
        f"{keyed.url}/models/load",
        json={"model": SMOL},
        headers={"X-Admin-Key": ADMIN},
        timeout=120,
    ).raise_for_status()


@pytest.mark.parametrize(
    "args",
    [
        {"n_ctx": True},
        {"parallel": False},
        {"n_ctx": [1]},
        {"n_ctx": {"a": 1}},
        {"parallel": [1, 2]},
        {"n_gpu_layers": {"x": 1}},
    ],
)
def test_load_settings_of_the_wrong_json_type_are_a_400(
    keyless: ServerProcess, args: dict[str, object]
) -> None:
    r = httpx.post(
        f"{keyless.url}/v1/internal/model/load",
        json={"model_name": SMOL, "args": args},
        timeout=60,
    )
    assert r.status_code == 400, r.text
    name = next(iter(args))
    canonical = {"n_ctx": "ctx_size", "n_gpu_layers": "gpu_layers"}.get(name, name)
    assert name in r.json()["detail"] or canonical in r.json()["detail"]
    assert keyless.proc.poll() is None
    assert chat(keyless).status_code == 200  # still serving, with its slots


def test_status_reads_never_load_and_blind_cross_site_requests_are_refused(
    keyless: ServerProcess,
) -> None:
    before = states(keyless)
    assert before[GEMMA] == "unloaded"
    for path in ("/props", "/api/extra/perf", "/api/innkeeper/status"):
        r = httpx.get(f"{keyless.url}{path}", params={"model": GEMMA}, timeout=30)
        assert r.status_code == 200, (path, r.text)
    assert httpx.get(f"{keyless.url}/v1/internal/templates", timeout=30).status_code == 200
    assert states(keyless) == before
    # <img src="http://127.0.0.1:5001/..."> on another site: no Origin, Sec-Fetch-Site says so.
    img = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors", "Sec-Fetch-Dest": "image"}
    r = httpx.get(f"{keyless.url}/props", params={"model": GEMMA}, headers=img, timeout=30)
    assert r.status_code == 403
    r = httpx.post(f"{keyless.url}/api/extra/abort", headers=img, timeout=30)
    assert r.status_code == 403
    # Following a link to the page still works; the server's own page is same-origin.
    nav = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}
    assert httpx.get(f"{keyless.url}/", headers=nav, timeout=30).status_code == 200
    same = {"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "cors"}
    assert httpx.get(f"{keyless.url}/props", headers=same, timeout=30).status_code == 200


def test_host_paths_are_for_admins_only(models_dir: Path) -> None:
    with next_server(models_dir) as srv:
        user = {"Authorization": f"Bearer {KEY}"}
        admin = {"Authorization": f"Bearer {KEY}", "X-Admin-Key": ADMIN}
        for headers, absolute in ((user, False), (admin, True)):
            models = httpx.get(f"{srv.url}/api/innkeeper/models", headers=headers, timeout=30)
            status = httpx.get(f"{srv.url}/api/innkeeper/status", headers=headers, timeout=30)
            props = httpx.get(f"{srv.url}/props", headers=headers, timeout=30)
            paths = [m["path"] for m in models.json()["models"]]
            paths += [status.json()["model"]["path"], props.json()["model_path"]]
            assert all(p.startswith("/") == absolute for p in paths), (headers, paths)


def next_server(models_dir: Path):  # type: ignore[no-untyped-def]
    """A keyed server: an API key for clients, an admin key for the owner."""
    store = models_dir.parent / "store-paths"
    store.mkdir(exist_ok=True)
    return run_server(
        "--ctx-size", "512", "--parallel", "1", "--models-dir", str(models_dir),
        "--api-key", KEY, "--admin-key", ADMIN,
        env={"INNKEEPER_MODELS": str(store)}, name="rule-paths",
    )  # fmt: skip
