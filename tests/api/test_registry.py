"""The model registry behind every API: list, load, switch and unload two real models (the
embedded SmolLM2 and Gemma 3 270M) through each family; routing by `model` and by the default;
eviction, memory refusal, admin keys, failed loads, idle unload, streams during a load."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from innkeeper.api.admin import admin_refusal
from innkeeper.models.store import default_model_path
from innkeeper.serving.load_settings import parse_keep_alive, parse_load_settings
from tests.helpers import ServerProcess, run_server

pytestmark = pytest.mark.slow  # starts real servers or browsers: not in `make test-fast`

SMOL = default_model_path().name.removesuffix(".gguf")
GEMMA = "gemma-3-270m-q4_k_m"
BASE = ("--ctx-size", "1024", "--parallel", "1")
ADMIN_KEY = "admin-secret"


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory, gemma_path: Path) -> Path:
    """Both models by symlink (SmolLM2's is the embedded file: listed once), plus a broken
    GGUF, as a user's --models-dir would hold them."""
    d = tmp_path_factory.mktemp("models")
    (d / gemma_path.name).symlink_to(gemma_path)
    (d / default_model_path().name).symlink_to(default_model_path())
    (d / "broken.gguf").write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    return d


def serve(models_dir: Path, tmp: Path, *args: str, name: str) -> Iterator[ServerProcess]:
    store = tmp / "store"  # an empty store: the user's own pulls must not show up
    store.mkdir(exist_ok=True)
    with run_server(
        *BASE,
        "--models-dir",
        str(models_dir),
        *args,
        env={"INNKEEPER_MODELS": str(store)},
        name=name,
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def swap(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """--models-max 1 (the default): every load swaps."""
    yield from serve(models_dir, tmp_path_factory.mktemp("swap"), name="registry-swap")


@pytest.fixture(scope="module")
def pair(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """--models-max 2: both models stay loaded."""
    yield from serve(
        models_dir, tmp_path_factory.mktemp("pair"), "--models-max", "2", name="registry-pair"
    )


def client(srv: ServerProcess, **headers: str) -> httpx.Client:
    return httpx.Client(base_url=srv.url, timeout=120, headers=headers)


def statuses(c: httpx.Client) -> dict[str, str]:
    return {m["id"]: m["status"]["value"] for m in c.get("/models").json()["data"]}


def default_of(c: httpx.Client) -> str:
    return c.get("/api/v1/model").json()["result"].removeprefix("innkeeper/")


# ---- listing ---------------------------------------------------------------------------------
def test_every_family_lists_both_models_default_first(swap: ServerProcess) -> None:
    with client(swap) as c:
        c.post("/v1/internal/model/load", json={"model_name": SMOL}).raise_for_status()
        data = c.get("/v1/models").json()["data"]
        assert [m["id"] for m in data][:1] == [SMOL]
        assert {m["id"] for m in data} >= {SMOL, GEMMA, "broken"}
        assert data[0]["status"] == {"value": "loaded"}
        assert set(c.get("/v1/internal/model/list").json()["model_names"]) >= {SMOL, GEMMA}
        routed = c.get("/models").json()["data"]
        gemma = next(m for m in routed if m["id"] == GEMMA)
        assert gemma["status"]["value"] == "unloaded" and gemma["args"]["ctx_size"] == 1024
        page = c.get("/api/innkeeper/models").json()
        assert page["default"] == SMOL
        entry = next(m for m in page["models"] if m["id"] == GEMMA)
        assert entry["source"] == "dir" and entry["quantization"] == "Q4_K_M"
        assert entry["plan"]["verdict_code"] in ("ram", "vram", "partial", "swap")
        assert next(m for m in page["models"] if m["id"] == SMOL)["source"] == "embedded"


# ---- switching through each family -----------------------------------------------------------
def test_tgw_load_switches_what_sillytavern_sees(swap: ServerProcess) -> None:
    """SillyTavern's status calls name the new model after a text-generation-webui load, and
    requests without a model (KoboldCpp, Oobabooga, llama.cpp routes) go to it."""
    with client(swap) as c:
        r = c.post("/v1/internal/model/load", json={"model_name": GEMMA, "args": {"n_ctx": 512}})
        assert r.status_code == 200 and r.json() == "OK"
        assert default_of(c) == GEMMA
        assert c.get("/v1/models").json()["data"][0]["id"] == GEMMA
        assert c.get("/v1/internal/model/info").json()["model_name"] == GEMMA
        props = c.get("/props").json()
        assert props["model_alias"] == GEMMA and props["n_ctx"] == 512
        assert c.get("/api/v1/config/max_context_length").json()["value"] == 512
        r = c.post("/api/v1/generate", json={"prompt": "Hello", "max_length": 4})
        assert r.status_code == 200, r.text
        assert statuses(c)[SMOL] == "unloaded"  # --models-max 1: the load swapped
        c.post("/v1/internal/model/unload").raise_for_status()
        assert statuses(c)[GEMMA] == "unloaded" and default_of(c) == GEMMA
        c.post("/v1/internal/model/load", json={"model_name": SMOL}).raise_for_status()
        assert default_of(c) == SMOL


def test_llama_router_and_innkeeper_load_unload(swap: ServerProcess) -> None:
    with client(swap) as c:
        r = c.post("/models/load", json={"model": GEMMA})
        assert r.json() == {"success": True}
        assert statuses(c).items() >= {GEMMA: "loaded", SMOL: "unloaded"}.items()
        assert default_of(c) == SMOL  # llama-server's load names no default
        assert c.get("/props", params={"model": GEMMA}).json()["model_alias"] == GEMMA
        assert c.post("/models/unload", json={"model": GEMMA}).json() == {"success": True}
        assert statuses(c)[GEMMA] == "unloaded"
        r = c.post(
            "/api/innkeeper/models/load",
            json={"model": GEMMA, "settings": {"ctx_size": 768, "cache_type": "q8_0"}},
        )
        assert r.json() == {"success": True, "model": GEMMA}, r.text
        entry = next(m for m in c.get("/api/innkeeper/models").json()["models"] if m["is_default"])
        assert entry["id"] == GEMMA and entry["status"] == "loaded"
        assert entry["settings"]["ctx_size"] == 768 and entry["settings"]["cache_type_k"] == "q8_0"
        r = c.post("/api/innkeeper/models/unload", json={"model": GEMMA})
        assert r.json()["success"] is True and statuses(c)[GEMMA] == "unloaded"
        c.post("/api/innkeeper/models/load", json={"model": SMOL}).raise_for_status()
        r = c.post("/api/innkeeper/models/load", json={"model": SMOL, "settings": {"ctx": 1}})
        assert r.status_code == 422 and "ctx" in r.json()["detail"]["msg"]
        r = c.post(
            "/models/load", json={"model": SMOL, "cache_type_v": "q4_0", "flash_attn": "off"}
        )
        assert r.status_code == 400 and "flash attention" in r.json()["error"]["message"]
        assert statuses(c)[SMOL] == "loaded"  # refused new settings leave it as it was


def test_openai_request_naming_the_other_model_loads_it(swap: ServerProcess) -> None:
    with client(swap) as c:
        c.post("/v1/internal/model/load", json={"model_name": SMOL}).raise_for_status()
        for name in (GEMMA, f"{GEMMA}.gguf", f"innkeeper/{GEMMA}"):
            r = c.post("/v1/completions", json={"model": name, "prompt": "Hi", "max_tokens": 2})
            assert r.status_code == 200 and r.json()["model"] == GEMMA, r.text
        assert statuses(c)[GEMMA] == "loaded"
        assert default_of(c) == SMOL  # a request's model does not move the default
        r = c.post(  # SillyTavern sends back what /v1/models said: the default's id
            "/v1/chat/completions",
            json={"model": SMOL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
        )
        assert r.status_code == 200 and r.json()["model"] == SMOL
        body = {"model": SMOL + ".gguf", "prompt": "Hi", "max_tokens": 1}
        r = c.post("/v1/completions", json=body)
        assert r.status_code == 200 and r.json()["model"] == SMOL


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", f"../{GEMMA}", "nope"])
def test_unknown_and_path_names_are_refused_in_each_shape(swap: ServerProcess, name: str) -> None:
    with client(swap) as c:
        r = c.post("/v1/completions", json={"model": name, "prompt": "Hi", "max_tokens": 1})
        assert r.status_code == 404
        err = r.json()["error"]
        assert err["type"] == "not_found_error" and GEMMA in err["message"]
        r = c.post("/v1/internal/model/load", json={"model_name": name})
        assert r.status_code == 404 and "not available" in r.json()["detail"]
        r = c.post("/models/load", json={"model": name})
        assert r.status_code == 404 and r.json()["error"]["code"] == 404
        r = c.post("/api/innkeeper/models/load", json={"model": name})
        assert r.status_code == 404 and "not available" in r.json()["detail"]["msg"]


def test_failed_load_leaves_the_default_serving(swap: ServerProcess) -> None:
    with client(swap) as c:
        c.post("/v1/internal/model/load", json={"model_name": SMOL}).raise_for_status()
        r = c.post("/v1/internal/model/load", json={"model_name": "broken"})
        assert 400 <= r.status_code < 600 and "broken" in r.json()["detail"]
        assert default_of(c) == SMOL and statuses(c)[SMOL] == "loaded"
        broken = next(m for m in c.get("/models").json()["data"] if m["id"] == "broken")
        assert broken["status"]["value"] == "failed" and broken["error"]
        r = c.post("/api/v1/generate", json={"prompt": "Hello", "max_length": 2})
        assert r.status_code == 200


def stream_tokens(
    c: httpx.Client,
    body: dict[str, object],
    tokens: list[str],
    finish: list[str],
    started: threading.Event,
) -> None:
    """Read a /v1/completions stream into `tokens`; its finish reasons into `finish`."""
    with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            choice = json.loads(line[6:])["choices"][0]
            tokens.append(choice["text"])
            started.set()
            if choice["finish_reason"]:
                finish.append(choice["finish_reason"])


def test_swap_waits_for_the_running_stream(swap: ServerProcess) -> None:
    """--models-max 1: loading Gemma must unload SmolLM2, but not under its running stream."""
    with client(swap) as c:
        c.post("/v1/internal/model/load", json={"model_name": SMOL}).raise_for_status()
        tokens: list[str] = []
        finish: list[str] = []
        started = threading.Event()
        body = {"prompt": "Once", "max_tokens": 80, "ignore_eos": True}
        t = threading.Thread(target=stream_tokens, args=(c, body, tokens, finish, started))
        t.start()
        assert started.wait(60)
        r = c.post("/v1/internal/model/load", json={"model_name": GEMMA})
        assert r.status_code == 200
        t.join(60)
        assert finish == ["length"] and len(tokens) >= 80  # it ran to its end
        assert statuses(c).items() >= {GEMMA: "loaded", SMOL: "unloaded"}.items()
        c.post("/v1/internal/model/load", json={"model_name": SMOL}).raise_for_status()


def test_keep_alive_unloads_after_the_request(swap: ServerProcess) -> None:
    """Ollama's keep_alive: the model goes once idle that long, and comes back on demand."""
    with client(swap) as c:
        c.post("/v1/internal/model/load", json={"model_name": SMOL}).raise_for_status()
        r = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1, "keep_alive": "1s"})
        assert r.status_code == 200
        deadline = time.monotonic() + 10
        while statuses(c)[SMOL] != "unloaded" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert statuses(c)[SMOL] == "unloaded"
        r = c.post("/api/v1/generate", json={"prompt": "Hello", "max_length": 2})
        assert r.status_code == 200 and statuses(c)[SMOL] == "loaded"  # autoloaded


# ---- two models at once ------------------------------------------------------------------------
def test_stream_on_a_survives_b_loading(pair: ServerProcess) -> None:
    """A stream on SmolLM2 runs on while Gemma loads; a request for Gemma waits for its load."""
    with client(pair) as c:
        c.post("/models/unload", json={"model": GEMMA}).raise_for_status()
        tokens: list[str] = []
        finish: list[str] = []
        started = threading.Event()
        body = {"model": SMOL, "prompt": "Once", "max_tokens": 150, "ignore_eos": True}
        t = threading.Thread(target=stream_tokens, args=(c, body, tokens, finish, started))
        t.start()
        assert started.wait(60)
        waiter: list[httpx.Response] = []
        load = threading.Thread(
            target=lambda: waiter.append(c.post("/models/load", json={"model": GEMMA}))
        )
        load.start()
        r = c.post("/v1/completions", json={"model": GEMMA, "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 200 and r.json()["model"] == GEMMA
        load.join(120)
        t.join(120)
        assert waiter[0].json() == {"success": True}
        assert finish == ["length"] and len(tokens) >= 100
        assert statuses(c).items() >= {SMOL: "loaded", GEMMA: "loaded"}.items()


def test_metrics_and_status_per_model(pair: ServerProcess) -> None:
    with client(pair) as c:
        for name in (SMOL, GEMMA):
            c.post("/models/load", json={"model": name}).raise_for_status()
            c.post("/v1/completions", json={"model": name, "prompt": "Hi", "max_tokens": 2})
        text = c.get("/metrics").text
        for name in (SMOL, GEMMA):
            assert f'innkeeper_requests_total{{model="{name}"}}' in text
            assert f'innkeeper_model_loaded{{model="{name}"}} 1.0' in text
        status = c.get("/api/innkeeper/status").json()
        assert {m["model"]["id"] for m in status["models"]} == {SMOL, GEMMA}
        ram = next(d for d in status["memory"]["devices"] if d["kind"] == "ram")
        assert set(ram["models"]) == {SMOL, GEMMA}
        assert ram["total_bytes"] == sum(ram["models"].values())
        one = c.get("/api/innkeeper/status", params={"model": GEMMA}).json()
        assert one["model"]["id"] == GEMMA and one["context"]["size"] == 1024
        perf = c.get("/api/extra/perf", params={"model": GEMMA}).json()
        assert perf["model"] == GEMMA and perf["total_gens"] >= 1
        assert c.get("/props", params={"model": SMOL}).json()["model_alias"] == SMOL


# ---- memory, admin, idle -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def tight(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """1.2 GiB of pretend RAM: each model fits alone (SmolLM2 ~0.4, Gemma ~0.9 GiB with the
    plan's margin), not both; an admin key."""
    yield from serve(
        models_dir,
        tmp_path_factory.mktemp("tight"),
        "--models-max", "2", "--ram", "1.2GiB", "--vram", "0", "--admin-key", ADMIN_KEY,
        name="registry-tight",
    )  # fmt: skip


def test_admin_key_is_required_in_each_shape(tight: ServerProcess) -> None:
    with client(tight) as c:
        r = c.post("/v1/internal/model/load", json={"model_name": SMOL})
        assert r.status_code == 401 and "admin" in r.json()["detail"]
        r = c.post("/models/unload", json={"model": SMOL})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        r = c.post("/api/innkeeper/models/load", json={"model": SMOL})
        assert r.status_code == 401 and "admin" in r.json()["detail"]["msg"]
        r = c.post("/models/load", json={"model": SMOL}, headers={"X-Admin-Key": "wrong"})
        assert r.status_code == 401
        r = c.post("/models/load", json={"model": SMOL}, headers={"X-Admin-Key": ADMIN_KEY})
        assert r.json() == {"success": True}
        r = c.post(
            "/models/load", json={"model": SMOL}, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
        )
        assert r.json() == {"success": True}
        assert c.get("/models").status_code == 200  # listing is not an admin action


def test_admin_refused_without_key_off_loopback() -> None:
    assert admin_refusal((), True, []) is None
    status, message = admin_refusal((), False, [])  # type: ignore[misc]
    assert status == 403 and "--admin-key" in message
    assert admin_refusal(("k",), False, ["k"]) is None
    assert admin_refusal(("k",), True, [])[0] == 401  # type: ignore[index]


def test_memory_evicts_idle_then_refuses_with_numbers(tight: ServerProcess) -> None:
    with client(tight, **{"X-Admin-Key": ADMIN_KEY}) as c:
        c.post("/models/load", json={"model": SMOL}).raise_for_status()
        r = c.post(  # too big even alone: refused, and nothing was evicted for it
            "/models/load", json={"model": GEMMA, "ctx_size": 32768, "parallel": 8}
        )
        assert r.status_code == 409, r.text
        message = r.json()["error"]["message"]
        assert "not enough memory" in message and "MiB" in message and "free" in message
        assert statuses(c)[SMOL] == "loaded"
        assert c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1}).status_code == 200
        # Fits alone, not beside SmolLM2: the idle SmolLM2 is evicted though --models-max is 2.
        r = c.post("/models/load", json={"model": GEMMA, "ctx_size": 1024, "parallel": 1})
        assert r.json() == {"success": True}, r.text
        assert statuses(c).items() >= {GEMMA: "loaded", SMOL: "unloaded"}.items()


@pytest.fixture(scope="module")
def idle(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from serve(
        models_dir,
        tmp_path_factory.mktemp("idle"),
        "--idle-unload", "2", "--no-autoload",
        name="registry-idle",
    )  # fmt: skip


def test_idle_unload_and_no_autoload(idle: ServerProcess) -> None:
    with client(idle) as c:
        deadline = time.monotonic() + 10
        while statuses(c)[SMOL] != "unloaded" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert statuses(c)[SMOL] == "unloaded"
        assert default_of(c) == SMOL  # still the default: named, not loaded
        # SillyTavern's status poll reads the context without loading the model back
        assert c.get("/api/extra/true_max_context_length").json()["value"] == 1024
        assert statuses(c)[SMOL] == "unloaded"
        r = c.post("/api/v1/generate", json={"prompt": "Hi", "max_length": 2})
        assert r.status_code == 409 and "/models/load" in r.json()["detail"]["msg"]
        r = c.post("/v1/completions", json={"model": GEMMA, "prompt": "Hi", "max_tokens": 1})
        assert r.status_code == 409 and r.json()["error"]["type"] == "model_not_loaded"
        c.post("/models/load", json={"model": SMOL}).raise_for_status()
        r = c.post("/api/v1/generate", json={"prompt": "Hi", "max_length": 2})
        assert r.status_code == 200


# ---- pure parsing ------------------------------------------------------------------------------
def test_keep_alive_and_load_settings_parse_like_their_sources() -> None:
    assert parse_keep_alive("5m") == 300 and parse_keep_alive(-1) == -1
    assert parse_keep_alive("1h") == 3600 and parse_keep_alive(None) is None
    assert parse_load_settings({"n_ctx": 2048, "n_gpu_layers": -1, "cache_type": "q8_0"}) == {
        "ctx_size": 2048,
        "gpu_layers": 999,
        "cache_type_k": "q8_0",
        "cache_type_v": "q8_0",
    }
    assert parse_load_settings({"flash_attn": True, "gpu_layers": "all"}) == {
        "flash_attn": "on",
        "gpu_layers": 999,
    }
    assert parse_load_settings({"loader": "llama.cpp"}, strict=False) == {}
