"""`innkeeper pull` and `innkeeper models` as a user runs them, against the local stand-in hub."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import namedtuple
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from innkeeper.cli import app
from innkeeper.models.store import ModelNotFoundError, find_in_store
from tests.helpers import run_server
from tests.models import fakehub
from tests.models.fakehub import FakeHub

pytestmark = pytest.mark.slow  # starts real servers or browsers: not in `make test-fast`

fake_hub = fakehub.fake_hub  # fixtures shared with tests/models/test_hub.py
hub_sources = fakehub.hub_sources


def _env(hub: FakeHub, home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    return {**env, "HF_ENDPOINT": hub.url, "HF_HOME": str(home / "hf-home"), **extra}


def _innkeeper(
    *args: str, env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "innkeeper", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _models(store: Path, env: dict[str, str]) -> list[dict[str, object]]:
    """The store's entries (`models` also lists the embedded model, marked embedded)."""
    out = _innkeeper("models", "--json", "--models-dir", str(store), env=env)
    assert out.returncode == 0, out.stderr
    return [e for e in json.loads(out.stdout) if not e["embedded"]]


def test_pull_json_then_models_lists_it(fake_hub: FakeHub, tmp_path: Path) -> None:
    store = tmp_path / "store"
    env = _env(fake_hub, tmp_path)
    out = _innkeeper("pull", "fake/Tiny-GGUF:q4_k_m", "--json", "--models-dir", str(store), env=env)
    assert out.returncode == 0, out.stderr
    pulled = json.loads(out.stdout)
    src = fake_hub.repos["fake/Tiny-GGUF"].files["Tiny-Q4_K_M.gguf"]
    assert pulled["name"] == "Tiny:Q4_K_M"
    assert (pulled["quant"], pulled["format"], pulled["complete"]) == ("Q4_K_M", "gguf", True)
    assert (pulled["size"], pulled["downloaded_bytes"]) == (src.size, src.size)
    assert Path(pulled["path"]).read_bytes() == src.read(0, src.size)
    [listed] = _models(store, env)
    assert {k: listed[k] for k in ("name", "quant", "size", "format", "path", "complete")} == {
        "name": "Tiny:Q4_K_M",
        "quant": "Q4_K_M",
        "size": src.size,
        "format": "gguf",
        "path": pulled["path"],
        "complete": True,
    }
    human = _innkeeper("models", "--models-dir", str(store), env=env)
    assert "Tiny:Q4_K_M" in human.stdout and "yes" in human.stdout


def test_gated_repo_fails_with_one_clear_line(fake_hub: FakeHub, tmp_path: Path) -> None:
    env = _env(fake_hub, tmp_path)
    out = _innkeeper("pull", "fake/Gated-GGUF", "--models-dir", str(tmp_path / "s"), env=env)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    assert "error:" in out.stderr and "gated" in out.stderr and "HF_TOKEN" in out.stderr
    ok = _innkeeper(
        "pull",
        "fake/Gated-GGUF",
        "--json",
        "--models-dir",
        str(tmp_path / "s"),
        env={**env, "HF_TOKEN": fake_hub.good_token},
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["complete"] is True


def test_kill_9_mid_download_leaves_nothing_complete_and_resumes(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    env = _env(fake_hub, tmp_path)
    key = fake_hub.key("fake/Big-GGUF", "Big-Q8_0.gguf")
    size = fake_hub.repos["fake/Big-GGUF"].files["Big-Q8_0.gguf"].size
    fake_hub.stalls[key] = 15 * 1024 * 1024  # the hub stops sending here until released
    cmd = [sys.executable, "-m", "innkeeper", "pull", "fake/Big-GGUF:Q8_0"]
    proc = subprocess.Popen(
        [*cmd, "--models-dir", str(store)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert fake_hub.stalled.wait(timeout=60), "the pull never reached the stall point"
        deadline = time.monotonic() + 30
        while not (partials := list(store.rglob("*.incomplete"))) or not partials[0].stat().st_size:
            assert time.monotonic() < deadline, "no bytes reached the disk"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    kept = partials[0].stat().st_size
    assert 0 < kept < size
    assert not list(store.rglob("Big-Q8_0.gguf"))
    [listed] = _models(store, env)
    assert (listed["name"], listed["complete"]) == ("Big:Q8_0", False)
    with pytest.raises(ModelNotFoundError, match="incomplete"):  # what `serve Big:Q8_0` says
        find_in_store("Big:Q8_0", store)

    fake_hub.reset_faults()
    fake_hub.reset_counters()
    again = _innkeeper("pull", "fake/Big-GGUF:Q8_0", "--json", "--models-dir", str(store), env=env)
    assert again.returncode == 0, again.stderr
    result = json.loads(again.stdout)
    assert result["complete"] is True
    assert (result["resumed_from_bytes"], result["downloaded_bytes"]) == (kept, size - kept)
    assert fake_hub.range_starts[key] == [kept]
    assert fake_hub.bytes_served[key] == size - kept


# --- in-process (CliRunner): the OS boundary and the choice -----------------------------------


def test_no_disk_space(fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 10**12 - 1000, 1000))
    result = CliRunner().invoke(
        app, ["pull", "fake/Tiny-GGUF:Q8_0", "--models-dir", str(tmp_path / "s")]
    )
    assert result.exit_code == 1
    assert "not enough disk space" in result.output and "1000 B free" in result.output
    assert sum(fake_hub.bytes_served.values()) == 0


def test_auto_choice_follows_pretend_hardware(fake_hub: FakeHub, tmp_path: Path) -> None:
    runner = CliRunner()
    store = str(tmp_path / "s")
    big = runner.invoke(
        app,
        [
            "pull",
            "fake/Tiny-GGUF",
            "--ram",
            "64GiB",
            "--vram",
            "0",
            "--json",
            "--models-dir",
            store,
        ],
    )
    assert big.exit_code == 0, big.output
    assert json.loads(big.stdout)["quant"] == "F16"  # everything fits: the least quantized
    tiny = runner.invoke(
        app, ["pull", "fake/Tiny-GGUF", "--ram", "1KiB", "--vram", "0", "--models-dir", store]
    )
    assert tiny.exit_code == 0, tiny.output  # nothing fits: the stated default, and why
    assert "chose Q4_K_M: the default Q4_K_M: none fits" in tiny.output
    assert "Tiny:Q4_K_M" in tiny.output


def test_models_on_an_empty_store(tmp_path: Path) -> None:
    runner = CliRunner()
    empty = str(tmp_path / "none")
    human = runner.invoke(app, ["models", "--models-dir", empty])
    assert human.exit_code == 0 and "is empty: `innkeeper pull owner/name`" in human.output
    as_json = runner.invoke(app, ["models", "--json", "--models-dir", empty])
    assert as_json.exit_code == 0
    assert [e for e in json.loads(as_json.stdout) if not e["embedded"]] == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["pull", "not-a-repo"], "not a hub reference"),
        (["pull", "fake/Tiny-GGUF:Q8_0", "--quant", "Q4_0"], "two quantizations"),
        (["pull", "fake/Tiny-GGUF:Q5_K_S"], "has no Q5_K_S file"),
        (["pull", "fake/Nope-GGUF"], "not found"),
        (["pull", "fake/Broken-GGUF:Q8_0"], "shard(s) 2 are missing"),
        (["pull", "fake/Tiny-GGUF", "--ram", "lots"], "not a size"),
    ],
)
def test_bad_requests_get_one_error_line(
    fake_hub: FakeHub, tmp_path: Path, args: list[str], message: str
) -> None:
    result = CliRunner().invoke(app, [*args, "--models-dir", str(tmp_path / "s")])
    assert result.exit_code == 1
    assert "error:" in result.output and message in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


# --- end to end: pull the real tiny model, then serve it by its store name ---------------------


def test_pull_then_serve_by_store_name(fake_hub: FakeHub, tmp_path: Path) -> None:
    repo = fakehub.add_smollm2(fake_hub)
    store = tmp_path / "store"
    env = _env(fake_hub, tmp_path)
    out = _innkeeper("pull", repo, "--json", "--models-dir", str(store), env=env)
    assert out.returncode == 0, out.stderr
    pulled = json.loads(out.stdout)
    assert pulled["name"] == "SmolLM2-135M-Instruct:Q4_1"
    with run_server(pulled["name"], env={"INNKEEPER_MODELS": str(store)}, name="pull-e2e") as srv:
        models = httpx.get(f"{srv.url}/v1/models", timeout=10)
        assert models.status_code == 200
        assert models.json()["data"], models.text
