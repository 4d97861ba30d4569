"""The CLI's rough edges (issues 10 and 15), each through the real command.

FIFOs and other non-regular files are refused before they are opened; an unreachable hub fails
at once with `pull`'s message; the embedded model is listed and accepted by its served name;
`fit` plans with serve's defaults and exits 2 when the model does not fit; the serve banner
shows the real parameter count and warns about a GGUF without a chat template; `--version`
exists and `--help` shows no `<bool>` after flags.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from innkeeper.models.gguf_meta import read_gguf_spec
from innkeeper.models.spec import format_params
from innkeeper.models.store import default_model_path
from tests.cli.test_serve_cli import assert_one_error_line, serve
from tests.helpers import free_port, run_server
from tests.models import gguf_factory as factory

SMOL = default_model_path()
# A Gemma 3 shaped GGUF small enough to serve, without a chat template (like Gemma 3 base).
GEMMA3_TINY = factory.Shape(
    "gemma3", 2, 256, 4, 2, 64, 512, 4096, 2048, tied=True, window=128, qk_norm=True,
    post_norms=True,
)  # fmt: skip


def innkeeper(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """The real CLI in a child process (a hang shows as TimeoutExpired, not a stuck suite)."""
    return subprocess.run(
        [sys.executable, "-m", "innkeeper", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def error_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("error:")]


# ---- defect 7: a FIFO named like a model -----------------------------------------------------


@pytest.mark.parametrize("command", ["inspect", "fit"])
def test_fifo_is_refused_not_opened(command: str, tmp_path: Path) -> None:
    fifo = tmp_path / "f.gguf"
    os.mkfifo(fifo)
    proc = innkeeper(command, str(fifo), timeout=30)  # before the fix: blocked in open()
    assert proc.returncode == 1
    assert "Traceback" not in proc.stdout + proc.stderr
    [line] = error_lines(proc)
    assert "FIFO" in line and str(fifo) in line


def test_serve_refuses_a_fifo(tmp_path: Path) -> None:
    fifo = tmp_path / "f.gguf"
    os.mkfifo(fifo)
    assert_one_error_line(serve(str(fifo), timeout=30), "not a regular file")


# ---- defect 10: the hub unreachable --------------------------------------------------------------


def test_unreachable_hub_fails_fast_with_pulls_message(tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = {"HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"}
    lines = {}
    for command in ("pull", "inspect", "fit"):
        extra = ["--models-dir", str(tmp_path / "store")] if command == "pull" else []
        start = time.monotonic()
        proc = innkeeper(command, "someone/Some-Model-GGUF", *extra, env=env)
        elapsed = time.monotonic() - start
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert elapsed < 5, f"{command} took {elapsed:.1f}s to give up (retries?)"
        [lines[command]] = error_lines(proc)
    assert f"network error talking to {endpoint}" in lines["pull"]
    assert lines["inspect"] == lines["fit"] == lines["pull"]


# ---- defect 10: the embedded model by its served name ------------------------------------------


def served_name() -> str:
    from innkeeper.engine.planning import model_id_for

    return model_id_for(SMOL)


def test_models_lists_the_embedded_model(tmp_path: Path) -> None:
    store = str(tmp_path / "empty-store")
    listed = json.loads(innkeeper("models", "--json", "--models-dir", store).stdout)
    [entry] = listed
    assert entry["embedded"] is True
    assert entry["name"] == served_name() and entry["path"] == str(SMOL)
    human = " ".join(innkeeper("models", "--models-dir", store).stdout.split())
    assert "embedded" in human
    # The embedded model is listed, so the empty store must not read as "no models".
    assert "no models" not in human
    assert f"the store {store} is empty: `innkeeper pull owner/name`" in human


@pytest.mark.parametrize("command", ["inspect", "fit"])
def test_inspect_and_fit_accept_the_served_name(command: str) -> None:
    proc = innkeeper(command, served_name(), "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data.get("format") == "gguf"
    if command == "inspect":
        assert data["parameters"] == read_gguf_spec(SMOL).parameters


# ---- defect 10: fit's exit status and defaults ---------------------------------------------------


def test_fit_exits_2_when_the_model_does_not_fit() -> None:
    small = innkeeper("fit", str(SMOL), "--ram", "100MiB", "--vram", "0", "--json")
    assert small.returncode == 2, small.stderr
    assert json.loads(small.stdout)["fits"] is False  # the plan is still printed
    human = innkeeper("fit", str(SMOL), "--ram", "100MiB", "--vram", "0")
    assert human.returncode == 2 and "would swap" in human.stdout
    roomy = innkeeper("fit", str(SMOL), "--ram", "8GiB", "--vram", "0", "--json")
    assert roomy.returncode == 0 and json.loads(roomy.stdout)["fits"] is True
    assert "2 does not fit" in innkeeper("fit", "--help").stdout


def test_fit_with_no_flags_plans_what_serve_plans() -> None:
    from innkeeper.engine.planning import plan_settings
    from innkeeper.settings.engine import EngineConfig

    fit = json.loads(innkeeper("fit", str(SMOL), "--json").stdout)
    auto = plan_settings(EngineConfig(model_path=SMOL))  # serve's defaults, serve's planner
    assert auto is not None
    served = auto.plan.to_json()
    assert fit["ctx_size"] == auto.ctx_size
    for key in ("kv_cache_bytes", "compute_bytes", "output_buffer_bytes", "total_bytes"):
        assert fit[key] == served[key], key
    assert fit["settings"]["flash_attn"] == served["settings"]["flash_attn"]
    assert fit["settings"]["parallel"] == served["settings"]["parallel"]


# ---- defect 10: the banner ----------------------------------------------------------------------


def test_banner_shows_real_parameters_and_warns_without_template(tmp_path: Path) -> None:
    gguf = factory.write_shape(tmp_path / "gemma3-base.gguf", GEMMA3_TINY)
    spec = read_gguf_spec(gguf)
    assert not spec.chat_template
    with run_server(str(gguf), "--ctx-size", "512", "--parallel", "1", name="banner") as srv:
        log = srv.log()
    assert f"{format_params(spec.parameters)} parameters" in log  # what `inspect` prints
    assert re.search(r"chat template\s+gemma", log), log
    warning = " ".join(log[log.index("warning:") :].split())
    assert "no chat template" in warning and "gemma3" in warning, log


# ---- issue 15: --version, and no `<bool>` after flags in --help ---------------------------------


def test_version_names_innkeeper_and_llama_cpp_python() -> None:
    import importlib.metadata

    import innkeeper as package

    proc = innkeeper("--version")
    assert proc.returncode == 0, proc.stderr
    llama = importlib.metadata.version("llama_cpp_python")
    assert proc.stdout.strip() == f"innkeeper {package.__version__} (llama-cpp-python {llama})"


@pytest.mark.parametrize("command", [[], ["models"], ["serve"], ["fit"], ["doctor"]])
def test_help_shows_no_type_after_flags(command: list[str]) -> None:
    """typer's help printed `--help <bool>`: flags take no value, so no type is shown."""
    proc = innkeeper(*command, "--help", env={"COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    assert "<bool>" not in proc.stdout
    [help_row] = [line for line in proc.stdout.splitlines() if "--help" in line]
    assert "Show this message and exit." in help_row
    if command == ["models"]:  # options that take a value keep their type
        assert "<path>" in proc.stdout
