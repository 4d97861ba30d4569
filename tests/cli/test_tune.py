"""`innkeeper tune` on the embedded model: mechanics, not speed (the CPU is shared).

A tiny budget and a tiny prompt: a profile is written, `serve` uses it (and says so), a
profile for other hardware is ignored with the reason, `--json` keeps its keys, Ctrl-C
leaves no file and no process, and a model that does not fit is refused.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from innkeeper.models.profiles import (
    Profile,
    hardware_fingerprint,
    model_identity,
    profile_path,
    save_profile,
)
from innkeeper.models.store import default_model_path
from tests.helpers import ctrl_c_reaches_it, run_server

pytestmark = pytest.mark.slow

TINY = ["--budget", "10s", "--prompt-tokens", "16", "--gen-tokens", "4", "--ctx-size", "512"]
JSON_KEYS = {
    "model",
    "ctx_size",
    "parallel",
    "budget_s",
    "seconds",
    "stopped_by_budget",
    "trials",
    "default",
    "winner",
    "gain",
    "profile",
    "fingerprint",
}
TRIAL_KEYS = {
    "settings",
    "flags",
    "status",
    "note",
    "prompt_tps",
    "decode_tps",
    "aggregate_tps",
    "memory_bytes",
    "rss_bytes",
    "seconds",
    "error",
}


def _env(config: Path) -> dict[str, str]:
    return {**os.environ, "INNKEEPER_CONFIG": str(config), "PYTHONUNBUFFERED": "1"}


def _tune(config: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "innkeeper", "tune", *args],
        capture_output=True,
        text=True,
        env=_env(config),
        timeout=timeout,
    )


def _build() -> str:
    from innkeeper.engine.tune import build_id

    return build_id()


def test_tune_writes_a_profile_and_stable_json(tmp_path: Path) -> None:
    before = {p.pid for p in psutil.Process().children(recursive=True)}  # the session's server
    proc = _tune(tmp_path, *TINY, "--parallel", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) == JSON_KEYS
    assert out["trials"] and all(set(t) == TRIAL_KEYS for t in out["trials"])
    assert out["trials"][0]["settings"] == {} and out["trials"][0]["note"] == "default"
    assert out["default"]["status"] == "ok" and out["default"]["decode_tps"] > 0
    assert out["default"]["aggregate_tps"] is not None  # --parallel 2 measures all slots
    assert (out["ctx_size"], out["parallel"]) == (512, 2)
    assert set(out["gain"]) == {"prompt", "decode"}
    saved = Path(out["profile"]["path"])
    assert saved == profile_path(default_model_path(), tmp_path / "profiles")
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]
    data = json.loads(saved.read_text())
    assert data["settings"] == out["profile"]["settings"] == out["winner"]["settings"]
    assert data["model"] == model_identity(default_model_path())
    assert data["fingerprint"] == out["fingerprint"] == hardware_fingerprint(_build())
    # no measuring process is left behind
    left = {p.pid for p in psutil.Process().children(recursive=True)} - before
    assert not left  # no measuring child outlives the command


def _save(config: Path, **fingerprint: object) -> Path:
    model = default_model_path()
    profile = Profile(
        model_path=str(model.resolve()),
        model=model_identity(model),
        fingerprint={**hardware_fingerprint(_build()), **fingerprint},
        settings={"threads": 2, "threads_batch": 2, "ubatch_size": 128},
        ctx_size=2048,
        parallel=1,
    )
    return save_profile(profile, config / "profiles")


def test_serve_uses_the_profile_and_flags_win(tmp_path: Path) -> None:
    saved = _save(tmp_path)
    # run_server gives --threads 1: that flag wins, the profile's other settings apply
    with run_server("--ctx-size", "512", env=_env(tmp_path), name="tune-profile") as srv:
        log = srv.log()
    banner = " ".join(log.split())
    assert "tuned profile" in banner
    assert "--threads-batch 2 -ub 128" in banner and "-t 2" not in banner
    assert saved.name in banner.replace(" ", "")
    assert "1 threads (2 for prompts)" in banner  # the engine really runs with it


def test_serve_ignores_a_profile_for_other_hardware(tmp_path: Path) -> None:
    _save(tmp_path, gpus=[["NVIDIA GeForce RTX 4090", 24 * 2**30]])
    with run_server("--ctx-size", "512", env=_env(tmp_path), name="tune-other") as srv:
        banner = " ".join(srv.log().split())
    assert "tuned profile not used: tuned on other hardware: GPUs changed" in banner
    assert "1 threads (1 for prompts)" in banner


def test_ctrl_c_leaves_no_file_and_no_process(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "innkeeper", "tune", "--budget", "60s", "--ctx-size", "512"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(tmp_path),
        preexec_fn=ctrl_c_reaches_it,
    )
    cli = psutil.Process(proc.pid)
    deadline = time.monotonic() + 60
    children: list[psutil.Process] = []
    while not children and time.monotonic() < deadline and proc.poll() is None:
        children = cli.children(recursive=True)
        time.sleep(0.1)
    assert children, "no measuring process started"
    time.sleep(1.0)  # let it load the model
    for p in children:
        p.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "nothing saved" in err
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in children)
    assert not list(tmp_path.rglob("*"))  # no profile, no temporary file, not even a folder


def test_a_model_that_does_not_fit_is_refused(tmp_path: Path) -> None:
    proc = _tune(tmp_path, "--ram", "64MiB", "--budget", "5s")
    assert proc.returncode == 2
    assert "does not fit this machine" in proc.stderr and "innkeeper fit" in proc.stderr
    assert not list(tmp_path.rglob("*"))


def test_no_profile_and_a_clashing_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--no-profile` ignores the profile; one that clashes with the flags given is dropped
    with the reason (the user's flags stand), never an error of its own."""
    from innkeeper.cli.profile_use import build_with_profile

    monkeypatch.setenv("INNKEEPER_CONFIG", str(tmp_path))
    model = default_model_path()
    _save(tmp_path)
    config, note = build_with_profile(model, {"use_profile": False}, _build)
    assert note == "not used (--no-profile)" and config.engine.ubatch_size == 512
    config, note = build_with_profile(model, {}, _build)
    assert note is not None and note.startswith("-t 2 --threads-batch 2 -ub 128")
    assert "tuned at" not in note
    assert (config.engine.threads, config.engine.ubatch_size) == (2, 128)
    config, note = build_with_profile(model, {"ctx_size": 4096}, _build)
    assert note is not None and note.endswith("; tuned at context 2048, 1 parallel")

    clash = Profile.from_json({**json.loads(_save(tmp_path).read_text())})
    clash.settings = {"flash_attn": "off"}
    save_profile(clash, tmp_path / "profiles")
    config, note = build_with_profile(model, {"cache_type_v": "q8_0"}, _build)
    assert note is not None and note.startswith("not used: it conflicts with the flags given")
    assert (config.engine.flash_attn, config.engine.cache_type_v) == ("auto", "q8_0")


def test_models_shows_which_models_are_tuned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from innkeeper.cli import app

    monkeypatch.setenv("INNKEEPER_CONFIG", str(tmp_path))
    store = ["--models-dir", str(tmp_path / "store")]

    def embedded() -> dict[str, object]:
        result = CliRunner().invoke(app, ["models", "--json", *store])
        assert result.exit_code == 0, result.output
        return next(e for e in json.loads(result.output) if e["embedded"])

    assert embedded()["tuned"] is None
    saved = _save(tmp_path)
    tuned = embedded()["tuned"]
    assert tuned == {
        "used": True,
        "reason": "",
        "path": str(saved),
        "settings": {"threads": 2, "threads_batch": 2, "ubatch_size": 128},
    }
    _save(tmp_path, driver="999.99")
    tuned = embedded()["tuned"]
    assert tuned["used"] is False and "GPU driver changed" in tuned["reason"]
    table = CliRunner().invoke(app, ["models", *store], env={"COLUMNS": "200"})
    assert "not here" in table.output
