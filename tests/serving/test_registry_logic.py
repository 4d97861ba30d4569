"""The registry's rules without a model: eviction, the admin rule, failed loads put back what
they evicted, keep_alive, path redaction, rescans and symlinked names.

Models here are sparse GGUFs with real shapes (tests/models/gguf_factory.py), so the memory
plan is the real one; only the step that would hand the file to llama.cpp (`_build`) is
replaced by a fake service. The real-model tests in tests/api/ cover that step.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from innkeeper.engine.backend import ModelLoadError
from innkeeper.models.hardware import Hardware
from innkeeper.serving import residency
from innkeeper.serving.catalog import ModelState
from innkeeper.serving.errors import (
    AdminRequired,
    BadLoadRequest,
    InsufficientMemory,
    ModelNotLoaded,
    ParamError,
)
from innkeeper.serving.load_settings import parse_keep_alive
from innkeeper.serving.policy import Caller, keep_alive_allowed, redact_paths
from innkeeper.serving.registry import ModelRegistry
from innkeeper.settings.engine import EngineConfig
from innkeeper.settings.server import ServerConfig
from tests.models.gguf_factory import TINY_LLAMA, write_shape

ADMIN = Caller(admin=True)
USER = Caller(admin=False)
GIB = 2**30


class FakeService:
    """What the registry reads of a loaded model's service."""

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id
        self.users = 0
        self.running: dict[str, Any] = {}
        self.last_used = 0.0
        self.closed = False
        self.n_ctx = 512
        self.settings = {"ctx_size": 512, "gpu_layers": 0, "cache_type_k": "f16"}
        self.settings |= {"cache_type_v": "f16", "flash_attn": "auto", "parallel": 1}

    @property
    def busy(self) -> bool:
        return bool(self.users)

    def touch(self) -> None:
        self.last_used = asyncio.get_event_loop().time()

    def abort(self) -> int:
        return 0

    def cancel_all(self) -> int:
        return 0

    def close(self) -> None:
        self.closed = True


def make_registry(
    folder: Path, *, ram: int = 64 * GIB, models_max: int = 1, **server: Any
) -> ModelRegistry:
    for name in ("alpha", "beta", "gamma"):
        write_shape(folder / f"{name}.gguf", TINY_LLAMA)
    config = ServerConfig(
        engine=EngineConfig(model_path=folder / "alpha.gguf", ctx_size=512, parallel=1),
        models_dirs=(str(folder),),
        models_max=models_max,
        **server,
    )
    hardware = Hardware(ram, ram, (), "pretended")
    registry = ModelRegistry(config, folder / "alpha.gguf", hardware=hardware)
    registry._build = lambda e: (FakeService(e.id), registry.plan_of(e).plan)  # type: ignore[method-assign]
    return registry


def run(coro_fn: Callable[[], Any]) -> Any:
    return asyncio.run(coro_fn())


@pytest.fixture(autouse=True)
def _empty_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INNKEEPER_MODELS", str(tmp_path / "store"))


def test_a_client_without_the_admin_key_never_loads_or_unloads(tmp_path: Path) -> None:
    registry = make_registry(tmp_path)

    async def go() -> None:
        await registry.load("alpha", caller=ADMIN)
        with pytest.raises(ModelNotLoaded, match="only an admin"):
            await registry.service_for("beta", caller=USER)
        with pytest.raises(AdminRequired):
            await registry.load("beta", caller=USER)
        with pytest.raises(AdminRequired):
            await registry.unload("alpha", caller=USER)
        assert registry.resolve("alpha").state is ModelState.LOADED  # nothing was evicted
        assert registry.resolve("beta").state is ModelState.UNLOADED
        # What is loaded serves them; an admin's request may switch.
        assert (await registry.service_for("alpha", caller=USER)).model_id == "alpha"
        assert (await registry.service_for("beta", caller=ADMIN)).model_id == "beta"
        assert registry.resolve("alpha").state is ModelState.UNLOADED

    run(go)


def test_keep_alive_from_a_client_without_the_admin_key_never_shortens(tmp_path: Path) -> None:
    registry = make_registry(tmp_path)

    async def go() -> None:
        await registry.load(None, caller=ADMIN)
        await registry.service_for(None, 0, caller=USER)
        assert registry.default.keep_alive is None  # ignored: the server keeps it
        await registry.service_for(None, -1, caller=USER)
        assert registry.default.keep_alive == -1  # longer than the server's: allowed
        await registry.service_for(None, "0s", caller=ADMIN)
        assert registry.default.keep_alive == 0

    run(go)
    assert not keep_alive_allowed(USER, 60, server_idle=300)
    assert keep_alive_allowed(USER, 600, server_idle=300)
    assert not keep_alive_allowed(USER, 600, server_idle=0)  # 0: the server never unloads


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_keep_alive_must_be_finite(value: float) -> None:
    with pytest.raises(ParamError, match="finite"):
        parse_keep_alive(value)


def test_a_load_llamacpp_refuses_puts_back_what_it_evicted(tmp_path: Path) -> None:
    registry = make_registry(tmp_path, models_max=2)

    async def go() -> None:
        await registry.load("alpha", caller=ADMIN)
        await registry.load("beta", caller=ADMIN)
        built = registry._build

        def refuse_gamma(e: Any) -> Any:
            if e.id == "gamma":
                raise ModelLoadError("llama.cpp could not load gamma: unknown architecture")
            return built(e)

        registry._build = refuse_gamma  # type: ignore[method-assign]
        with pytest.raises(BadLoadRequest, match="unknown architecture"):
            await registry.load("gamma", caller=ADMIN)
        states = {e.id: e.state for e in registry.entries() if e.source == "dir"}
        assert states == {
            "alpha": ModelState.LOADED,
            "beta": ModelState.LOADED,
            "gamma": ModelState.FAILED,
        }

    run(go)


def test_memory_refusal_is_not_a_failure_and_says_what_stays(tmp_path: Path) -> None:
    registry = make_registry(tmp_path, models_max=3)
    plan = registry.plan_of(registry.resolve("beta")).plan
    ram = next(d for d in plan.devices if d.kind == "ram")
    # Room for one model and a half: the second load must evict the first (idle).
    registry.hardware = Hardware(
        ram.margin_bytes + ram.total_bytes * 3 // 2, ram.margin_bytes + ram.total_bytes * 3 // 2
    )
    for e in registry.entries():
        e.plan_cache = None

    async def go() -> None:
        await registry.load("alpha", caller=ADMIN)
        registry.resolve("alpha").service.users = 1  # busy: may not be evicted for memory
        with pytest.raises(InsufficientMemory) as err:
            await registry.load("beta", caller=ADMIN)
        assert "alpha stay loaded: in use" in err.value.message
        assert registry.resolve("beta").state is ModelState.UNLOADED  # refused, not failed
        registry.resolve("alpha").service.users = 0
        await registry.load("beta", caller=ADMIN)
        assert registry.resolve("alpha").state is ModelState.UNLOADED

    run(go)
    message = residency.fit_problem([plan, plan, plan], others=0)
    assert message is None or "beside" not in message


def test_paths_are_shown_only_to_admins(tmp_path: Path) -> None:
    registry = make_registry(tmp_path)
    beta = registry.resolve("beta")
    beta.error = f"cannot read {beta.path}: Permission denied"
    assert str(tmp_path) in registry.entry_json(beta, ADMIN)["path"]
    shown = registry.entry_json(beta, USER)
    assert shown["path"] == "beta.gguf" and str(tmp_path) not in shown["error"]
    assert redact_paths(f"x {tmp_path}/beta.gguf y", [beta.path]) == "x beta.gguf y"


def test_rescan_finds_files_copied_in_later_and_symlinks_keep_both_names(
    tmp_path: Path,
) -> None:
    registry = make_registry(tmp_path)
    write_shape(tmp_path / "delta.gguf", TINY_LLAMA)
    (tmp_path / "smol.gguf").symlink_to(tmp_path / "beta.gguf")
    registry._scanned = 0.0
    run(registry.rescan)
    assert registry.resolve("delta").path.name == "delta.gguf"
    assert registry.resolve("smol") is registry.resolve("beta")  # one entry, both names
    assert registry.resolve("smol.gguf") is registry.resolve("beta")
