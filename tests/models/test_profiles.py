"""Tuned profiles: where they live, how they are written, and when one is not used (and why)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from innkeeper.models import profiles
from innkeeper.models.profiles import (
    Profile,
    ProfileError,
    find_profile,
    fingerprint_mismatch,
    hardware_fingerprint,
    model_identity,
    profile_path,
    read_profile,
    save_profile,
)

BUILD = "llama-cpp-python 0.3.36; CPU : AVX2 = 1 |"


@pytest.fixture()
def model(tmp_path: Path) -> Path:
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    return path


def _profile(model: Path, **changes: object) -> Profile:
    values: dict[str, object] = {
        "model_path": str(model.resolve()),
        "model": model_identity(model),
        "fingerprint": hardware_fingerprint(BUILD),
        "settings": {"threads": 1, "ubatch_size": 256},
        "ctx_size": 2048,
        "parallel": 1,
        "speed": {"prompt_tps": 100.0, "decode_tps": 20.0},
        "tuned_at": "2026-12-06T23:00:00+00:00",
    }
    values.update(changes)
    return Profile(**values)  # type: ignore[arg-type]


def test_config_dir_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("INNKEEPER_CONFIG", str(tmp_path / "cfg"))
    assert profiles.config_dir() == tmp_path / "cfg"
    monkeypatch.delenv("INNKEEPER_CONFIG")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert profiles.config_dir() == tmp_path / "xdg" / "innkeeper"


def test_save_read_round_trip_leaves_only_the_profile(model: Path, tmp_path: Path) -> None:
    root = tmp_path / "profiles"
    saved = save_profile(_profile(model), root)
    assert saved == profile_path(model, root)
    assert [p.name for p in root.iterdir()] == [saved.name]  # no temporary file left
    back = read_profile(model, root)
    assert back is not None and back.to_json() == _profile(model).to_json()
    assert json.loads(saved.read_text())["settings"] == {"threads": 1, "ubatch_size": 256}


def test_profile_path_is_per_model_file(model: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF")
    assert profile_path(model, tmp_path) != profile_path(other, tmp_path)
    assert profile_path(model, tmp_path) == profile_path(tmp_path / "." / "m.gguf", tmp_path)


def test_interrupted_write_leaves_no_file(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failure (Ctrl-C included) between writing and renaming removes the temporary file."""
    root = tmp_path / "profiles"

    def interrupted(src: str, dst: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(profiles.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_profile(_profile(model), root)
    assert list(root.iterdir()) == []


def test_matching_profile_is_found(model: Path, tmp_path: Path) -> None:
    save_profile(_profile(model), tmp_path)
    match = find_profile(model, BUILD, tmp_path)
    assert match.profile is not None and match.reason == ""
    assert match.profile.settings == {"threads": 1, "ubatch_size": 256}


def test_no_profile_is_no_reason(model: Path, tmp_path: Path) -> None:
    match = find_profile(model, BUILD, tmp_path)
    assert match.profile is None and match.reason == ""


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("gpus", [["NVIDIA GeForce RTX 4090", 24 * 2**30]], "GPUs changed"),
        ("driver", "999.99", "GPU driver changed"),
        ("cpu", "Some Other CPU", "CPU changed"),
        ("cores", [64, 128], "core count changed"),
        ("build", "llama-cpp-python 0.0.1; CPU : AVX2 = 1 |", "llama.cpp build changed"),
    ],
)
def test_other_hardware_is_ignored_with_the_reason(
    model: Path, tmp_path: Path, key: str, value: object, words: str
) -> None:
    fingerprint = {**hardware_fingerprint(BUILD), key: value}
    save_profile(_profile(model, fingerprint=fingerprint), tmp_path)
    match = find_profile(model, BUILD, tmp_path)
    assert match.profile is None
    assert match.reason.startswith("tuned on other hardware: ") and words in match.reason


def test_gpu_change_names_both_sides() -> None:
    before = {**hardware_fingerprint(BUILD), "gpus": [["RTX 3090", 24 * 2**30]]}
    after = {**before, "gpus": []}
    assert fingerprint_mismatch(before, after) == "GPUs changed (RTX 3090 24 GiB -> none)"
    assert fingerprint_mismatch(before, before) is None


def test_changed_model_file_is_ignored(model: Path, tmp_path: Path) -> None:
    save_profile(_profile(model), tmp_path)
    model.write_bytes(b"GGUF" + b"\x01" * 100)
    match = find_profile(model, BUILD, tmp_path)
    assert match.profile is None and "model file changed" in match.reason


@pytest.mark.parametrize("text", ["{not json", '{"version": 99}', '{"version": 1}'])
def test_unreadable_profile_is_a_reason_not_a_crash(model: Path, tmp_path: Path, text: str) -> None:
    path = profile_path(model, tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    with pytest.raises(ProfileError):
        read_profile(model, tmp_path)
    match = find_profile(model, BUILD, tmp_path)
    assert match.profile is None and match.reason
