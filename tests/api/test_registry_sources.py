"""Where the registry finds models and how names resolve, without loading any (fast)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from innkeeper.api.errors import from_serving
from innkeeper.models.store import default_model_path
from innkeeper.serving.catalog import find_in_models_dirs
from innkeeper.serving.errors import ModelNotFound
from innkeeper.serving.registry import ModelRegistry
from innkeeper.settings.engine import EngineConfig
from innkeeper.settings.server import ServerConfig

SMOL = default_model_path()


def gguf(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF" + b"\x00" * 60)
    return path


@pytest.fixture()
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("INNKEEPER_MODELS", str(tmp_path / "store"))  # an empty store
    d = tmp_path / "models"
    gguf(d / "Mistral-7B.Q4_K_M.gguf")
    gguf(d / "big-model-Q8_0-00001-of-00002.gguf")
    gguf(d / "big-model-Q8_0-00002-of-00002.gguf")
    gguf(d / "mmproj-vision-f16.gguf")  # a projector, not a model
    gguf(d / "Llama-3-8B" / "whatever.Q5_K_M.gguf")  # a one-model subfolder: its name
    (d / "notes.txt").write_text("not a model")
    return d


@pytest.fixture()
def registry(folder: Path) -> Iterator[ModelRegistry]:
    config = ServerConfig(
        engine=EngineConfig(model_path=SMOL), models_dirs=(str(folder),), model_alias="house"
    )
    reg = ModelRegistry(config, SMOL)
    yield reg
    reg.close()


def test_sources_and_names(registry: ModelRegistry) -> None:
    entries = registry.entries()
    assert [e.id for e in entries] == [
        "house",  # the default (serve's model, under --alias), first
        "Mistral-7B.Q4_K_M",
        "big-model-Q8_0",
        "Llama-3-8B",
    ]
    by_id = {e.id: e for e in entries}
    assert by_id["house"].source == "embedded" and by_id["Mistral-7B.Q4_K_M"].source == "dir"
    assert by_id["big-model-Q8_0"].path.name.endswith("-00001-of-00002.gguf")
    assert by_id["big-model-Q8_0"].size_bytes == 128  # both parts
    assert by_id["Llama-3-8B"].quantization == "Q5_K_M"
    assert all(e.status == "unloaded" for e in entries)


@pytest.mark.parametrize(
    "name", ["house", SMOL.name, SMOL.name.removesuffix(".gguf"), "innkeeper/house", "HOUSE"]
)
def test_the_alias_and_the_file_name_of_the_default_resolve(
    registry: ModelRegistry, name: str
) -> None:
    assert registry.resolve(name).id == "house"
    assert registry.resolve(None).id == "house"


@pytest.mark.parametrize(
    "name", ["../models/Mistral-7B.Q4_K_M", "/etc/passwd", "Llama-3-8B/whatever.Q5_K_M", "x"]
)
def test_paths_and_unknown_names_are_404_listing_models(registry: ModelRegistry, name: str) -> None:
    with pytest.raises(ModelNotFound) as err:
        registry.resolve(name)
    assert from_serving(err.value).status == 404 and "Mistral-7B.Q4_K_M" in err.value.message


def test_refresh_picks_up_new_files_and_keeps_state(registry: ModelRegistry, folder: Path) -> None:
    registry.entries_by_id["Mistral-7B.Q4_K_M"].overrides = {"ctx_size": 2048}
    gguf(folder / "new-one.gguf")
    (folder / "big-model-Q8_0-00001-of-00002.gguf").unlink()
    registry.refresh()
    ids = [e.id for e in registry.entries()]
    assert "new-one" in ids and "big-model-Q8_0" not in ids
    assert registry.entries_by_id["Mistral-7B.Q4_K_M"].overrides == {"ctx_size": 2048}


def test_serve_name_finds_a_models_dir_model(folder: Path) -> None:
    found = find_in_models_dirs("llama-3-8b", [str(folder)])
    assert found is not None and found.name == "whatever.Q5_K_M.gguf"
    assert find_in_models_dirs("nope", [str(folder)]) is None
