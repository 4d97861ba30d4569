"""scripts/gpu-build.sh (`make serve GPU=...`): toolkit checks, the pip command, idempotency.

Nothing is built here: `--check` stops after the toolkit check and `--dry-run` prints the pip
command; the "already built" path runs against a stand-in `innkeeper` that reports a CUDA build.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO

SCRIPT = REPO / "scripts" / "gpu-build.sh"
VENV_BIN = Path(sys.executable).parent
PINNED = re.search(r'"llama-cpp-python==([^"]+)"', (REPO / "pyproject.toml").read_text())


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60, env=env
    )


def bare_path(tmp_path: Path) -> dict[str, str]:
    """An environment whose PATH has only the shell tools the script needs: no nvcc, no glslc."""
    tools = tmp_path / "tools"
    tools.mkdir()
    for name in ("bash", "sed", "head", "dirname", "cat", "uname", "printf"):
        found = shutil.which(name)
        if found:
            (tools / name).symlink_to(found)
    return {"PATH": str(tools), "HOME": str(tmp_path), "CUDA_HOME": str(tmp_path / "no-cuda")}


def test_missing_cuda_toolkit_says_what_to_install(tmp_path: Path) -> None:
    proc = run("cuda", str(VENV_BIN), "--check", env=bare_path(tmp_path))
    assert proc.returncode == 1
    assert "nvcc" in proc.stderr and "sudo apt install nvidia-cuda-toolkit" in proc.stderr
    assert "CUDACXX=/usr/local/cuda/bin/nvcc" in proc.stderr
    assert "developer.nvidia.com/cuda-downloads" in proc.stderr


def fake_nvcc(tmp_path: Path) -> dict[str, str]:
    env = bare_path(tmp_path)
    nvcc = tmp_path / "tools" / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 12.4, V12.4.131'\n")
    nvcc.chmod(0o755)
    return env


def test_dry_run_prints_the_pinned_rebuild(tmp_path: Path) -> None:
    assert PINNED is not None
    proc = run("cuda", str(VENV_BIN), "--dry-run", env=fake_nvcc(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "CUDA toolkit:" in proc.stdout and "(12.4)" in proc.stdout
    command = proc.stdout.strip().splitlines()[-1]
    assert command.startswith('CMAKE_ARGS="-DGGML_CUDA=on" ')
    assert "--force-reinstall --no-deps" in command
    assert "--no-binary llama-cpp-python" in command
    assert command.endswith(f"llama-cpp-python=={PINNED.group(1)}")


def test_nothing_is_rebuilt_when_the_build_already_has_the_backend(tmp_path: Path) -> None:
    assert PINNED is not None
    env = fake_nvcc(tmp_path)
    venv = tmp_path / "venv-bin"
    venv.mkdir()
    report = f'{{"backends": ["CUDA", "CPU"], "llama_cpp_python": "{PINNED.group(1)}"}}'
    (venv / "innkeeper").write_text(f"#!/bin/sh\necho '{report}'\n")
    (venv / "pip").write_text(f"#!/bin/sh\ntouch {tmp_path}/pip-ran\nexit 1\n")
    for exe in ("innkeeper", "pip"):
        (venv / exe).chmod(0o755)
    (venv / "python").symlink_to(sys.executable)
    proc = run("cuda", str(venv), env=env)
    assert proc.returncode == 0, proc.stderr
    assert "already built with CUDA: nothing to do" in proc.stdout
    assert not (tmp_path / "pip-ran").exists()


@pytest.mark.parametrize(
    ("backend", "needle"),
    [
        ("rocm", "GPU must be cuda, vulkan or metal"),
        ("vulkan", "sudo apt install libvulkan-dev glslc"),
    ],
)
def test_bad_backend_and_missing_vulkan(backend: str, needle: str, tmp_path: Path) -> None:
    env = {**bare_path(tmp_path), "VULKAN_SDK": str(tmp_path / "no-sdk")}
    proc = run(backend, str(VENV_BIN), "--check", env=env)
    assert proc.returncode == 1 and needle in proc.stderr


@pytest.mark.skipif(sys.platform == "darwin", reason="Metal is available on macOS")
def test_metal_outside_macos(tmp_path: Path) -> None:
    proc = run("metal", str(VENV_BIN), "--check", env=bare_path(tmp_path))
    assert proc.returncode == 1 and "macOS only" in proc.stderr


@pytest.mark.skipif(
    not (shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc")),
    reason="no CUDA toolkit on this machine",
)
def test_real_cuda_toolkit_passes_the_check() -> None:
    proc = run("cuda", str(VENV_BIN), "--check", env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("CUDA toolkit: ")


def test_plain_make_serve_stays_cpu() -> None:
    dry = subprocess.run(
        ["make", "-n", "serve"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert dry.returncode == 0, dry.stderr
    assert 'if [ -n "" ]' in dry.stdout  # no GPU given: the build script is not run
    gpu = subprocess.run(
        ["make", "-n", "serve", "GPU=cuda"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert './scripts/gpu-build.sh "cuda"' in gpu.stdout
