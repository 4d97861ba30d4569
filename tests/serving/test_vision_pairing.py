"""Which projector (mmproj*.gguf) a model file is paired with in the catalog."""

from __future__ import annotations

from pathlib import Path

from innkeeper.serving.catalog import projector_for, scan


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"GGUF")
    return path


def test_the_projector_of_a_one_model_folder(tmp_path: Path) -> None:
    model = touch(tmp_path / "repo" / "gemma-3-4b-it-Q4_K_M.gguf")
    proj = touch(tmp_path / "repo" / "mmproj-model-f16.gguf")
    assert projector_for(model) == proj


def test_in_a_shared_folder_only_by_name(tmp_path: Path) -> None:
    gemma = touch(tmp_path / "gemma-3-4b-it-Q4_K_M.gguf")
    qwen = touch(tmp_path / "qwen2.5-7b-instruct-Q4_K_M.gguf")
    proj = touch(tmp_path / "mmproj-gemma-3-4b-it-f16.gguf")
    assert projector_for(gemma) == proj
    assert projector_for(qwen) is None
    generic = tmp_path / "other"
    touch(generic / "a-Q4_K_M.gguf")
    touch(generic / "b-Q4_K_M.gguf")
    touch(generic / "mmproj-model-f16.gguf")
    assert projector_for(generic / "a-Q4_K_M.gguf") is None  # whose would it be?


def test_no_projector(tmp_path: Path) -> None:
    assert projector_for(touch(tmp_path / "m.gguf")) is None


def test_scan_pairs_models_and_mmproj_flag_wins_for_serves_model(tmp_path: Path) -> None:
    sub = tmp_path / "dir" / "vision-model"
    model = touch(sub / "tiny-Q8_0.gguf")
    proj = touch(sub / "mmproj-tiny-f16.gguf")
    found, default = scan((str(tmp_path / "dir"),), model, None, None)
    assert default.mmproj == proj
    assert not any(e.path.name.startswith("mmproj") for e in found)  # never a model itself
    flag = touch(tmp_path / "elsewhere" / "mmproj-x.gguf")
    _, default = scan((str(tmp_path / "dir"),), model, None, None, flag)
    assert default.mmproj == flag
