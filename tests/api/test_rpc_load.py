"""HTTP loads across RPC workers: `rpc` is a load setting, and a client's word reaches only
loopback (where SSH tunnels land) and the server's own --rpc workers. A real worker on
loopback and a real server; the refusals come before any connection."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from innkeeper.engine import rpc, rpc_probe
from innkeeper.models.store import default_model_path
from innkeeper.serving.errors import WorkerNotAllowed
from innkeeper.serving.load_settings import check_workers_allowed, parse_load_settings
from tests.engine.test_rpc import PROMPT, run_worker
from tests.helpers import ServerProcess, free_port, run_server

ADMIN_KEY = "rpc-admin-key"
ADMIN = {"X-Admin-Key": ADMIN_KEY}
SMOL = default_model_path().name.removesuffix(".gguf")


def test_http_workers_are_loopback_or_the_servers_own() -> None:
    for endpoint in ("127.0.0.1:50052", "127.3.4.5:1", "localhost:9", "LOCALHOST:9"):
        check_workers_allowed((endpoint,), ())
    check_workers_allowed(("192.168.1.20:50052",), ("192.168.1.20:50052",))
    # not loopback as written (no name is looked up), or another worker than serve's
    for endpoint in ("10.0.0.1:50052", "127.0.0.1.nip.io:1", "0.0.0.0:50052", "gpu-box:50052"):
        with pytest.raises(WorkerNotAllowed, match=re.escape(endpoint)):
            check_workers_allowed((endpoint,), ("192.168.1.20:50052",))
    with pytest.raises(WorkerNotAllowed, match=re.escape("192.168.1.21:50052")):
        parse_load_settings({"rpc": "127.0.0.1:1,192.168.1.21:50052"})
    assert parse_load_settings({"rpc": ["127.0.0.1:1"]}) == {"rpc": ("127.0.0.1:1",)}
    assert parse_load_settings({"rpc": []}) == {"rpc": ()}  # none, over serve's --rpc


@pytest.fixture(scope="module")
def worker() -> Iterator[str]:
    if not rpc.available():
        pytest.skip("this llama-cpp-python has no RPC backend (no libggml-rpc.so)")
    port = free_port()
    with run_worker(port):
        yield f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def server(worker: str) -> Iterator[ServerProcess]:
    """SmolLM2 loaded here alone; an admin key (loads stay an admin action)."""
    args = ("--ctx-size", "512", "--parallel", "1", "--admin-key", ADMIN_KEY)
    with run_server(*args, name="rpc-load") as srv:
        yield srv


def complete(c: httpx.Client) -> str:
    body = {"prompt": PROMPT, "max_tokens": 24, "temperature": 0}
    r = c.post("/v1/completions", json=body, headers=ADMIN)
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["text"])


def load(c: httpx.Client, settings: dict[str, Any]) -> httpx.Response:
    return c.post(
        "/api/innkeeper/models/load", json={"model": SMOL, "settings": settings}, headers=ADMIN
    )


@pytest.mark.slow
def test_a_load_with_a_loopback_worker_answers_as_the_local_model(
    server: ServerProcess, worker: str
) -> None:
    free = rpc_probe.probe(worker).devices[0].free_bytes  # asked before the server holds it
    with httpx.Client(base_url=server.url, timeout=180, headers=ADMIN) as c:
        local = complete(c)
        r = load(c, {"rpc": [worker], "gpu_layers": "all"})
        assert r.json() == {"success": True, "model": SMOL}, r.text
        entry = next(m for m in c.get("/api/innkeeper/models").json()["models"] if m["id"] == SMOL)
        assert entry["settings"]["rpc"] == [worker] and entry["status"] == "loaded"
        gpus = [d for d in entry["plan"]["devices"] if d["kind"] == "gpu"]
        assert [g["name"] for g in gpus] == [f"GPU 0: RPC {worker}"] and gpus[0]["layers"] > 0
        assert complete(c) == local
        # a share beyond what the worker has free: 400 before anything is unloaded
        # (a 1M context: its KV cache and KQ scores are over 40 GiB)
        if free < 40 * 2**30:
            huge = {"rpc": [worker], "gpu_layers": "all", "ctx_size": 2**20, "flash_attn": "off"}
            r = load(c, huge)
            assert r.status_code == 400, r.text
            message = r.json()["detail"]["msg"]
            assert f"RPC worker {worker} has" in message and "free" in message, message
            assert complete(c) == local  # still loaded across the worker, as it was
        # [] loads it here alone again (the worker is free for the next load)
        assert load(c, {"rpc": [], "gpu_layers": "all"}).status_code == 200
        assert complete(c) == local
        if free < 40 * 2**30:  # unloaded, the same refusal blames the settings, not the file
            unload = c.post("/api/innkeeper/models/unload", json={"model": SMOL})
            assert unload.status_code == 200, unload.text
            assert load(c, huge).status_code == 400
            models = c.get("/api/innkeeper/models").json()["models"]
            entry = next(m for m in models if m["id"] == SMOL)
            assert entry["status"] == "unloaded" and entry["error"] is None, entry
            assert load(c, {"rpc": []}).status_code == 200


@pytest.mark.slow
@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("10.1.2.3:50052", "not on loopback"),
        (["127.0.0.1:50052", "gpu-box:50052"], "gpu-box:50052 is not on loopback"),
        (True, "list of texts"),
        ([1, 2], "list of texts"),
        ("http://x:1", "not a URL"),
        ("h:0", "port must be"),
        (":5", "HOST:PORT"),
    ],
)
def test_bad_or_unlisted_workers_are_refused_and_the_server_keeps_serving(
    server: ServerProcess, value: object, why: str
) -> None:
    with httpx.Client(base_url=server.url, timeout=180, headers=ADMIN) as c:
        # the page's route and llama-server's: typed bodies, so pydantic refuses a wrong JSON
        # type first (422 on the page's route, 400 on llama-server's), naming the field
        r = load(c, {"rpc": value})
        assert r.status_code in (400, 422), r.text
        assert "rpc" in r.json()["detail"]["msg"], r.text
        if r.status_code == 400:
            assert why in r.json()["detail"]["msg"], r.text
        r = c.post("/models/load", json={"model": SMOL, "rpc": value})
        assert r.status_code == 400 and "rpc" in r.json()["error"]["message"], r.text
        r = c.post(
            "/v1/internal/model/load",
            json={"model_name": SMOL, "args": {"rpc": value}},
        )
        assert r.status_code == 400 and why in r.json()["detail"], r.text
        anyone = {"X-Admin-Key": ""}  # the client's header, blanked: loads stay admin-only
        r = c.post("/api/innkeeper/models/load", json={"model": SMOL}, headers=anyone)
        assert r.status_code == 401
        assert complete(c)  # still serving
