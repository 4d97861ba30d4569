"""`innkeeper serve` start-up failures: one clear error line, exit status != 0, no traceback."""

from __future__ import annotations

import pickle
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import free_port

pytestmark = pytest.mark.slow  # starts real servers or browsers: not in `make test-fast`


def serve(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "innkeeper", "serve", "--port", str(free_port()), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_one_error_line(proc: subprocess.CompletedProcess[str], needle: str) -> None:
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "Traceback" not in out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    assert needle in errors[0].lower(), errors[0]


def test_missing_model(tmp_path: Path) -> None:
    assert_one_error_line(serve(str(tmp_path / "nope.gguf")), "not found")


def test_not_a_gguf(tmp_path: Path) -> None:
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"this is not a model" * 100)
    assert_one_error_line(serve(str(bad)), "gguf")


def test_truncated_gguf(tmp_path: Path) -> None:
    from innkeeper.models.store import default_model_path

    bad = tmp_path / "cut.gguf"
    bad.write_bytes(default_model_path().read_bytes()[:5000])
    assert_one_error_line(serve(str(bad)), "truncated")


def test_pickle_refused(tmp_path: Path) -> None:
    class Evil:
        def __reduce__(self):  # never loaded: only written for the scanner to find
            return (print, ("pwned",))

    path = tmp_path / "pytorch_model.bin"
    path.write_bytes(pickle.dumps({"w": Evil()}))
    assert_one_error_line(serve(str(path)), "pickle")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--flash-attn", "maybe"], "flash-attn"),
        (["--cache-type", "q3_weird"], "cache type"),
        (["--cache-type", "q8_0", "--flash-attn", "off"], "flash attention"),
        (["--parallel", "0"], "parallel"),
        (["--ctx-size", "8"], "ctx-size"),
        (["--gpu-layers", "lots"], "gpu-layers"),
        (["--chat-template", "no-such-template"], "chat template"),
    ],
)
def test_bad_flags(args: list[str], needle: str) -> None:
    assert_one_error_line(serve(*args), needle)


def test_busy_port() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "innkeeper", "serve", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert_one_error_line(proc, "cannot listen")


def test_help_is_panels_readable_at_80_columns() -> None:
    """`serve --help` was one flat list of 47 options, 277 lines at 80 columns, with Python
    type names (`<list[str]>`) and defaults written three ways."""
    from typer.testing import CliRunner

    from innkeeper.cli import app
    from innkeeper.settings import PANELS

    out = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "80"}).output
    lines = out.splitlines()
    assert all(len(line) <= 80 for line in lines)
    assert len(lines) < 140, len(lines)
    titles = [t for t in PANELS if f"─ {t} ─" in out]
    assert titles == list(PANELS)  # every panel, in the declared order
    for python_type in ("<list[", "<str>", "<int>", "<float>", "<bool>", "INTEGER", "FLOAT"):
        assert python_type not in out, python_type
    assert "[default:" not in out  # defaults are written one way: "(default: X)"
    assert "-c, --ctx-size N" in out and "--max-body SIZE" in out
    assert "-nkvo, --no-kv-offload" in out  # the --no- form on its own line, not a column
    # each option in its panel: --port under network & security, --models-dir at runtime
    network = out.index("─ Network & security ─")
    runtime = out.index("─ Models at runtime ─")
    assert network < out.index("--port N") < runtime < out.index("--models-dir DIR")
