"""`innkeeper serve owner/repo[:QUANT]` from an empty store, against the local stand-in hub:
pulled exactly as `innkeeper pull` would, then served; from the store, without network, after."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import ctrl_c_reaches_it, free_port, run_server
from tests.models import fakehub
from tests.models.fakehub import FakeHub

pytestmark = pytest.mark.slow  # starts real servers: not in `make test-fast`

fake_hub = fakehub.fake_hub
hub_sources = fakehub.hub_sources

BIG = 64 * 2**30  # pretend RAM on which every fake variant fits: the choice is the largest


def _env(hub_url: str, home: Path, store: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    return {
        **env,
        "HF_ENDPOINT": hub_url,
        "HF_HOME": str(home / "hf-home"),
        "INNKEEPER_MODELS": str(store),
        "PYTHONUNBUFFERED": "1",
    }


def _serve(
    *args: str, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """`serve` that is expected to stop by itself (an error, or a fake GGUF that cannot load)."""
    cmd = [sys.executable, "-m", "innkeeper", "serve", "--port", str(free_port()), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _pulled(store: Path) -> list[str]:
    """The files under the store's final names (no partial downloads, no manifests)."""
    return sorted(p.name for p in store.rglob("*.gguf") if p.is_file())


def test_serve_pulls_then_serves_and_next_start_needs_no_network(
    fake_hub: FakeHub, tmp_path: Path
) -> None:
    repo = fakehub.add_smollm2(fake_hub)
    store = tmp_path / "store"
    env = _env(fake_hub.url, tmp_path, store)
    with run_server(repo, env=env, timeout=120, name="serve-pull") as srv:
        models = httpx.get(f"{srv.url}/v1/models", timeout=10).json()
        ids = [m["id"] for m in models["data"]]
        assert "SmolLM2-135M-Instruct:Q4_1" in ids, ids
        log = srv.log()
    file = store / "fake__SmolLM2-135M-Instruct-GGUF" / "Q4_1" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert file.is_file()
    # One line before the download: the repo, the file, its quant and size, and why.
    said = next(line for line in log.splitlines() if line.startswith("pulling "))
    assert f"{repo}: SmolLM2-135M-Instruct.Q4_1.gguf (Q4_1, " in said
    assert "the largest that fits" in said or "the default" in said or "named" in said
    assert "sha256 verified" in log
    banner = log[log.index("innkeeper is serving") :]
    row = banner[banner.index("file ") : banner.index("context ")]
    assert str(file) in "".join(part.strip() for part in row[5:].splitlines())  # stored here

    # The next start: the hub is unreachable and --no-pull forbids downloading; the store has it.
    offline = _env(f"http://127.0.0.1:{free_port()}", tmp_path, store)
    with run_server(repo, "--no-pull", env=offline, name="serve-pull-2") as srv:
        ids = [m["id"] for m in httpx.get(f"{srv.url}/v1/models", timeout=10).json()["data"]]
        assert "SmolLM2-135M-Instruct:Q4_1" in ids
        assert "from the store" in srv.log() and "pulling " not in srv.log()


def test_auto_choice_is_pulls_choice(fake_hub: FakeHub, tmp_path: Path) -> None:
    """Without a quant, serve pulls what `pull` chooses on the same (pretend) machine."""
    store = tmp_path / "store"
    out = _serve(
        "fake/Tiny-GGUF", "--ram", "64GiB", "--vram", "0", env=_env(fake_hub.url, tmp_path, store)
    )
    said = next(line for line in out.stdout.splitlines() if line.startswith("pulling "))
    assert said.startswith("pulling fake/Tiny-GGUF: Tiny-F16.gguf (F16, ")
    assert "the largest that fits: " in said and " of 64.00 GiB RAM (" in said
    assert _pulled(store) == ["Tiny-F16.gguf"]  # the fake GGUF then fails to load: no matter


@pytest.mark.parametrize(
    ("ref", "file"),
    [
        ("fake/Tiny-GGUF:q2_k", "Tiny-Q2_K.gguf"),
        ("fake/Tiny-GGUF/Tiny-Q6_K.gguf", "Tiny-Q6_K.gguf"),
        ("https://huggingface.co/fake/Tiny-GGUF/blob/main/Tiny-Q4_K_M.gguf", "Tiny-Q4_K_M.gguf"),
    ],
)
def test_quant_or_file_wins_over_the_choice(
    fake_hub: FakeHub, tmp_path: Path, ref: str, file: str
) -> None:
    store = tmp_path / "store"
    out = _serve(ref, "--ram", "64GiB", "--vram", "0", env=_env(fake_hub.url, tmp_path, store))
    assert f"pulling fake/Tiny-GGUF: {file} " in out.stdout, out.stdout + out.stderr
    assert _pulled(store) == [file]  # not F16, which the choice would take on 64 GiB


def test_offline_is_one_line_fast_and_leaves_nothing(tmp_path: Path) -> None:
    store = tmp_path / "store"
    nowhere = f"http://127.0.0.1:{free_port()}"
    env = _env(nowhere, tmp_path, store)
    started = time.monotonic()
    out = _serve("fake/Tiny-GGUF:Q2_K", env=env)
    took = time.monotonic() - started
    assert out.returncode == 1
    errors = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error:") and nowhere in errors[0]
    assert "Traceback" not in out.stderr
    assert took < 10, took  # the interpreter's start included; the refusal comes at once
    assert _pulled(store) == []


def test_no_pull_refuses_to_download(fake_hub: FakeHub, tmp_path: Path) -> None:
    store = tmp_path / "store"
    out = _serve("fake/Tiny-GGUF:Q2_K", "--no-pull", env=_env(fake_hub.url, tmp_path, store))
    assert out.returncode == 1
    assert "error:" in out.stderr and "--no-pull" in out.stderr
    assert sum(fake_hub.bytes_served.values()) == 0 and not store.exists()


def test_ctrl_c_mid_download_leaves_a_resumable_partial(fake_hub: FakeHub, tmp_path: Path) -> None:
    store = tmp_path / "store"
    env = _env(fake_hub.url, tmp_path, store)
    key = fake_hub.key("fake/Big-GGUF", "Big-Q8_0.gguf")
    size = fake_hub.repos["fake/Big-GGUF"].files["Big-Q8_0.gguf"].size
    fake_hub.stalls[key] = 15 * 1024 * 1024  # the hub stops sending here until released
    cmd = [sys.executable, "-m", "innkeeper", "serve", "fake/Big-GGUF:Q8_0"]
    proc = subprocess.Popen(
        [*cmd, "--port", str(free_port())],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=ctrl_c_reaches_it,
    )
    try:
        assert fake_hub.stalled.wait(timeout=60), "the download never reached the stall point"
        deadline = time.monotonic() + 30
        while not (partials := list(store.rglob("*.incomplete"))) or not partials[0].stat().st_size:
            assert time.monotonic() < deadline, "no bytes reached the disk"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        fake_hub.release.set()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    kept = partials[0].stat().st_size
    assert 0 < kept < size
    assert _pulled(store) == []  # never a file under the final name

    fake_hub.reset_faults()
    fake_hub.reset_counters()
    again = subprocess.run(
        [sys.executable, "-m", "innkeeper", "pull", "fake/Big-GGUF:Q8_0", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr
    result = json.loads(again.stdout)
    assert (result["resumed_from_bytes"], result["downloaded_bytes"]) == (kept, size - kept)


@pytest.mark.parametrize(
    ("text", "repo"),
    [
        ("owner/Repo-GGUF", "owner/Repo-GGUF"),
        ("owner/Repo-GGUF:Q6_K", "owner/Repo-GGUF"),
        ("owner/Repo-GGUF/sub/file.gguf", "owner/Repo-GGUF"),
        ("https://huggingface.co/owner/Repo-GGUF/blob/main/f.gguf", "owner/Repo-GGUF"),
        ("models/typo.gguf", None),  # a missing file, not a repo named typo.gguf
        ("Tiny:Q4_K_M", None),  # a store name
    ],
)
def test_what_serve_takes_for_a_hub_model(text: str, repo: str | None) -> None:
    from innkeeper.cli.serve import hub_ref

    parsed = hub_ref(text)
    assert (parsed.repo_id if parsed else None) == repo


def test_a_path_under_an_existing_folder_is_a_missing_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from innkeeper.cli.serve import hub_ref

    monkeypatch.chdir(tmp_path)
    assert hub_ref("models/llama/typo.gguf") is not None  # no such folder here: a hub file
    (tmp_path / "models" / "llama").mkdir(parents=True)
    assert hub_ref("models/llama/typo.gguf") is None
    assert hub_ref("models/llama") is not None  # a folder named like a repo: still the hub's
    assert hub_ref("models/llama:Q4_K_M") is not None
