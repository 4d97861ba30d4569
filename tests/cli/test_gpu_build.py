"""scripts/gpu-build.sh (`make serve GPU=...`): toolkit checks, the pip command, idempotency.

Nothing is compiled here: `--check` stops after the toolkit check, `--dry-run` prints the pip
commands, and the build path runs against stand-ins for `pip` and `innkeeper` that record what
they were asked. The CUDA toolkit is a fake folder with an `nvcc` that answers `--version` and
`--dryrun` as the real one does, so each missing piece (cuBLAS, a visible GPU) can be taken away.
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
SHELL_TOOLS = ("bash", "sed", "head", "tail", "grep", "dirname", "cat", "uname", "printf", "mkdir")


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60, env=env
    )


def bare_path(tmp_path: Path) -> dict[str, str]:
    """An environment whose PATH has only the shell tools the script needs: no nvcc, no glslc."""
    tools = tmp_path / "tools"
    tools.mkdir()
    for name in SHELL_TOOLS:
        found = shutil.which(name)
        if found:
            (tools / name).symlink_to(found)
    return {"PATH": str(tools), "HOME": str(tmp_path), "CUDA_HOME": str(tmp_path / "no-cuda")}


def executable(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def fake_cuda(tmp_path: Path, *, cublas: bool = True, gpus: int | None = 1) -> dict[str, str]:
    """A CUDA 12.4 toolkit in tmp_path/cuda with nvcc on PATH through a wrapper (as some
    distributions install it), cuBLAS or not, and `nvidia-smi` listing `gpus` GPUs (None: no
    nvidia-smi at all, i.e. no driver)."""
    env = bare_path(tmp_path)
    root = tmp_path / "cuda"
    real = executable(
        root / "bin" / "nvcc",
        "#!/bin/sh\n"
        'case "$1" in --dryrun) echo "#\\$ _HERE_=$(dirname "$0")"; '
        'echo "#\\$ TOP=$(dirname "$0")/.." ;; '
        "*) echo 'Cuda compilation tools, release 12.4, V12.4.131' ;; esac\n",
    )
    executable(tmp_path / "tools" / "nvcc", f'#!/bin/sh\nexec {real} "$@"\n')
    if cublas:
        (root / "include").mkdir(parents=True)
        (root / "include" / "cublas_v2.h").write_text("")
        (root / "lib64").mkdir(parents=True)
        (root / "lib64" / "libcublas.so.12").write_text("")
    if gpus is not None:
        listing = "".join(
            f"GPU {i}: NVIDIA GeForce RTX 3060 (UUID: GPU-{i})\\n" for i in range(gpus)
        )
        executable(tmp_path / "tools" / "nvidia-smi", f"#!/bin/sh\nprintf '{listing}'\n")
    return env


def error_lines(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.strip()]


def test_missing_cuda_toolkit_says_what_to_install(tmp_path: Path) -> None:
    proc = run("cuda", str(VENV_BIN), "--check", env=bare_path(tmp_path))
    assert proc.returncode == 1
    assert "nvcc" in proc.stderr and "sudo apt install nvidia-cuda-toolkit" in proc.stderr
    assert "CUDACXX=/usr/local/cuda/bin/nvcc" in proc.stderr
    assert "developer.nvidia.com/cuda-downloads" in proc.stderr


def test_complete_toolkit_with_a_gpu_passes_the_check(tmp_path: Path) -> None:
    proc = run("cuda", str(VENV_BIN), "--check", env=fake_cuda(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("CUDA toolkit: ") and "(12.4)" in proc.stdout


def test_missing_cublas_is_one_line_with_the_package(tmp_path: Path) -> None:
    proc = run("cuda", str(VENV_BIN), "--check", env=fake_cuda(tmp_path, cublas=False))
    assert proc.returncode == 1
    [line] = error_lines(proc)
    assert line.startswith("error: nvcc (CUDA 12.4) is installed but cuBLAS is not")
    assert str(tmp_path / "cuda") in line  # the folder nvcc reported, not the wrapper's
    assert "sudo apt install libcublas-dev-12-4" in line


@pytest.mark.parametrize(
    ("gpus", "why"),
    [(None, "nvidia-smi is not installed: no NVIDIA driver"), (0, "nvidia-smi lists no GPU")],
)
def test_no_visible_gpu_is_one_line_naming_the_architecture_flag(
    gpus: int | None, why: str, tmp_path: Path
) -> None:
    env = fake_cuda(tmp_path, gpus=gpus)
    proc = run("cuda", str(VENV_BIN), "--check", env=env)
    assert proc.returncode == 1
    [line] = error_lines(proc)
    assert line.startswith("error: nvcc is installed but no NVIDIA GPU is visible")
    assert f"({why})" in line
    assert "make serve GPU=cuda CMAKE_ARGS=-DCMAKE_CUDA_ARCHITECTURES=86" in line
    # Named, the architecture needs no GPU at build time.
    named = run(
        "cuda",
        str(VENV_BIN),
        "--check",
        env={**env, "CMAKE_ARGS": "-DCMAKE_CUDA_ARCHITECTURES=89"},
    )
    assert named.returncode == 0, named.stderr


def test_both_missing_gives_both_lines(tmp_path: Path) -> None:
    proc = run("cuda", str(VENV_BIN), "--check", env=fake_cuda(tmp_path, cublas=False, gpus=None))
    assert proc.returncode == 1
    lines = error_lines(proc)
    assert len(lines) == 2
    assert "cuBLAS is not" in lines[0] and "no NVIDIA GPU is visible" in lines[1]


def test_dry_run_prints_the_pinned_rebuild(tmp_path: Path) -> None:
    assert PINNED is not None
    version = PINNED.group(1)
    env = {**fake_cuda(tmp_path), "INNKEEPER_CACHE": str(tmp_path / "cache")}
    sdist = tmp_path / "cache" / "sdist" / f"llama_cpp_python-{version}.tar.gz"
    proc = run("cuda", str(VENV_BIN), "--dry-run", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "CUDA toolkit:" in proc.stdout and "(12.4)" in proc.stdout
    download, command = proc.stdout.strip().splitlines()[-2:]
    assert " download " in download and "--no-binary :all:" in download
    assert download.endswith(f"-d {sdist.parent} llama-cpp-python=={version}")
    assert command.startswith('CMAKE_ARGS="-DGGML_CUDA=on -DGGML_RPC=ON" ')
    assert "--force-reinstall --no-deps --no-cache-dir" in command
    assert command.endswith(str(sdist))
    # Once the source is in the cache, it is not downloaded again.
    sdist.parent.mkdir(parents=True)
    sdist.write_bytes(b"")
    again = run("cuda", str(VENV_BIN), "--dry-run", env=env)
    assert " download " not in again.stdout
    assert again.stdout.strip().splitlines()[-1] == command


def stand_in_venv(tmp_path: Path, backends: str, pip_fails: bool = False) -> Path:
    """A venv bin folder whose `innkeeper doctor --json` reports `backends` and whose `pip`
    logs each call (a `download` leaves the sdist where it was asked to)."""
    assert PINNED is not None
    venv = tmp_path / "venv-bin"
    report = f'{{"backends": [{backends}], "llama_cpp_python": "{PINNED.group(1)}"}}'
    executable(venv / "innkeeper", f"#!/bin/sh\necho '{report}'\n")
    install = (
        'i=0; while [ $i -lt 160 ]; do i=$((i + 1)); echo "-- CMake noise line $i"; done; '
        "echo 'CMake Error at ggml/src/ggml-cuda/CMakeLists.txt:12 (message):'; exit 1"
        if pip_fails
        else "exit 0"
    )
    executable(
        venv / "pip",
        "#!/bin/sh\n"
        f'echo "$*" >> {tmp_path}/pip-calls\n'
        'if [ "$1" = download ]; then\n'
        '  while [ "$1" != -d ]; do shift; done\n'
        f'  : > "$2/llama_cpp_python-{PINNED.group(1)}.tar.gz"; exit 0\n'
        "fi\n"
        f"{install}\n",
    )
    (venv / "python").symlink_to(sys.executable)
    return venv


def test_nothing_is_rebuilt_when_the_build_already_has_the_backend(tmp_path: Path) -> None:
    venv = stand_in_venv(tmp_path, '"CUDA", "RPC", "CPU"')
    proc = run("cuda", str(venv), env=fake_cuda(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "already built with CUDA and RPC: nothing to do" in proc.stdout
    assert not (tmp_path / "pip-calls").exists()


def test_a_gpu_build_without_rpc_is_rebuilt_with_it(tmp_path: Path) -> None:
    env = {**fake_cuda(tmp_path), "INNKEEPER_CACHE": str(tmp_path / "cache")}
    proc = run("cuda", str(stand_in_venv(tmp_path, '"CUDA", "CPU"')), env=env)
    assert proc.returncode == 0, proc.stderr
    assert 'CMAKE_ARGS="-DGGML_CUDA=on -DGGML_RPC=ON"' in proc.stdout
    assert (tmp_path / "pip-calls").read_text().splitlines()[-1].split()[0] == "install"


def test_the_source_is_downloaded_once_and_reused(tmp_path: Path) -> None:
    env = {**fake_cuda(tmp_path), "INNKEEPER_CACHE": str(tmp_path / "cache")}
    venv = stand_in_venv(tmp_path, '"CPU"')
    first = run("cuda", str(venv), env=env)
    assert first.returncode == 0, first.stderr
    assert "downloading the llama-cpp-python" in first.stdout
    second = run("cuda", str(venv), env=env)
    assert second.returncode == 0, second.stderr
    assert "(downloaded before)" in second.stdout
    calls = (tmp_path / "pip-calls").read_text().splitlines()
    assert [c.split()[0] for c in calls] == ["download", "install", "install"]
    assert calls[1] == calls[2] and calls[1].endswith(".tar.gz")


def test_a_failed_build_shows_the_cmake_error_not_the_whole_log(tmp_path: Path) -> None:
    env = {**fake_cuda(tmp_path), "INNKEEPER_CACHE": str(tmp_path / "cache")}
    proc = run("cuda", str(stand_in_venv(tmp_path, '"CPU"', pip_fails=True)), env=env)
    assert proc.returncode == 1
    lines = error_lines(proc)
    assert lines[0].startswith("error: the CUDA build of llama-cpp-python failed")
    assert str(tmp_path / "cache" / "sdist" / "build-cuda.log") in lines[0]
    assert any(line.startswith("CMake Error at ggml/src/ggml-cuda") for line in lines)
    assert len(lines) < 12 and "noise" not in proc.stderr


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
def test_real_cuda_toolkit_passes_or_says_what_is_missing_in_one_line_each() -> None:
    """On this machine's real toolkit: either ready, or one `error:` line per missing piece."""
    proc = run("cuda", str(VENV_BIN), "--check", env=dict(os.environ))
    assert proc.stdout.startswith("CUDA toolkit: ")
    if proc.returncode != 0:
        lines = error_lines(proc)
        assert 1 <= len(lines) <= 2, proc.stderr
        assert all(line.startswith("error: nvcc ") for line in lines), proc.stderr


def test_plain_make_serve_stays_cpu() -> None:
    dry = subprocess.run(
        ["make", "--no-print-directory", "-n", "serve"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert dry.returncode == 0, dry.stderr
    assert 'if [ -n "" ]' in dry.stdout  # no GPU given: the build script is not run
    gpu = subprocess.run(
        ["make", "--no-print-directory", "-n", "serve", "GPU=cuda"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert './scripts/gpu-build.sh "cuda"' in gpu.stdout


def test_make_says_what_the_first_install_does_and_has_bench_gpu() -> None:
    """`make serve` no longer compiles llama.cpp for minutes without a word."""
    assert PINNED is not None
    dry = subprocess.run(
        ["make", "--no-print-directory", "-n", "install"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert dry.returncode == 0, dry.stderr
    assert f'"{PINNED.group(1)}"' in dry.stdout  # the pin, read from pyproject.toml
    assert "the first install builds llama.cpp" in dry.stdout
    bench = subprocess.run(
        ["make", "--no-print-directory", "-n", "bench-gpu", "ARGS=--rounds 1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bench.stdout.strip().splitlines()[-1].endswith("python -m bench.gpu --rounds 1")
