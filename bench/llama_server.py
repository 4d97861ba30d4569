"""Find or build llama.cpp's `llama-server` from the llama.cpp that llama-cpp-python vendors.

Why this exact copy: innkeeper runs on llama-cpp-python, so comparing against a llama-server
built from the same llama.cpp sources (same kernels, same CPU features) measures the server
around the kernels, not a version difference. The llama-cpp-python sdist on PyPI carries the
sources in `vendor/llama.cpp`; we build the `llama-server` target once into a cache folder
outside the repo and reuse it.

Run `python -m bench.llama_server` to print the binary's path (building it if needed).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
CMAKE_FLAGS = [
    "-DLLAMA_BUILD_SERVER=ON",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_CURL=OFF",
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    # RPC on, as innkeeper's own wheel: `llama-server --rpc` is the peer for the split bench.
    "-DGGML_RPC=ON",
]


class LlamaServerError(RuntimeError):
    """The llama-server binary could not be found or built; the message says what to do."""


def cache_root() -> Path:
    """Where the bench keeps big downloads and builds: never inside the repo."""
    env = os.environ.get("INNKEEPER_BENCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "innkeeper-bench"


def build_dir(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    """The folder holding the sdist, its sources and the CMake builds of one version."""
    return cache_root() / f"llama.cpp-{version}"


def cmake_build_dir(version: str = LLAMA_CPP_PYTHON_VERSION, variant: str = "cpu") -> Path:
    """One CMake build of the shared sources: `build` for the CPU one, `build-cuda`..."""
    return build_dir(version) / ("build" if variant == "cpu" else f"build-{variant}")


def cached_binary(version: str = LLAMA_CPP_PYTHON_VERSION, variant: str = "cpu") -> Path:
    """Where the built binary lands (it may not exist yet); its shared libraries sit beside it."""
    return cmake_build_dir(version, variant) / "bin" / "llama-server"


def _check_executable(path: Path, origin: str) -> Path:
    if not path.is_file() or not os.access(path, os.X_OK):
        raise LlamaServerError(f"{origin} names {path}, which is not an executable file")
    return path


def find_llama_server(explicit: str | None = None, *, build: bool = True, jobs: int = 2) -> Path:
    """The llama-server to use: `--llama-server PATH`, then $LLAMA_SERVER, then the cache.

    With `build`, a missing cached binary is built (about 10 minutes on 2 cores).
    """
    if explicit:
        return _check_executable(Path(explicit).expanduser(), "--llama-server")
    env = os.environ.get("LLAMA_SERVER")
    if env:
        return _check_executable(Path(env).expanduser(), "$LLAMA_SERVER")
    binary = cached_binary()
    if binary.is_file():
        return binary
    if not build:
        raise LlamaServerError(
            f"no llama-server at {binary}; run `python -m bench.llama_server` to build it"
        )
    return build_llama_server(jobs=jobs)


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """One build at a time, even if two bench runs start together."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(cmd: list[str], log: Path, cwd: Path | None = None) -> None:
    """Run one build step, its output appended to `log`; fail with the log's tail."""
    with log.open("a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.run(cmd, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise LlamaServerError(f"`{' '.join(cmd)}` failed ({proc.returncode}); log {log}:\n{tail}")


def _download_sdist(root: Path, version: str, log: Path) -> Path:
    sdist_dir = root / "sdist"
    found = sorted(sdist_dir.glob(f"llama_cpp_python-{version}.tar.gz"))
    if found:
        return found[0]
    sdist_dir.mkdir(parents=True, exist_ok=True)
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            f"llama-cpp-python=={version}",
            "-d",
            str(sdist_dir),
        ],
        log,
    )
    found = sorted(sdist_dir.glob(f"llama_cpp_python-{version}.tar.gz"))
    if not found:
        raise LlamaServerError(
            f"pip download left no llama-cpp-python {version} sdist in {sdist_dir}"
        )
    return found[0]


def _extract_sources(root: Path, sdist: Path, version: str) -> Path:
    """Unpack the sdist once; return its `vendor/llama.cpp` folder."""
    src = root / "src" / f"llama_cpp_python-{version}" / "vendor" / "llama.cpp"
    if (src / "CMakeLists.txt").is_file():
        return src
    (root / "src").mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist) as tar:
        tar.extractall(root / "src", filter="data")
    if not (src / "CMakeLists.txt").is_file():
        raise LlamaServerError(f"{sdist} has no vendor/llama.cpp/CMakeLists.txt")
    return src


def build_llama_server(
    version: str = LLAMA_CPP_PYTHON_VERSION,
    jobs: int = 2,
    variant: str = "cpu",
    extra_flags: tuple[str, ...] = (),
) -> Path:
    """Download the llama-cpp-python sdist, build its vendored llama-server, return the binary.

    `variant` names a build with `extra_flags` (e.g. "cuda" with -DGGML_CUDA=ON) beside the
    CPU one, from the same downloaded sources.
    """
    if shutil.which("cmake") is None:
        raise LlamaServerError("cmake is not installed (`apt-get install cmake g++`)")
    root = build_dir(version)
    root.mkdir(parents=True, exist_ok=True)
    with _lock(root / ".build.lock"):
        binary = cached_binary(version, variant)
        if binary.is_file():
            return binary
        log = root / f"build-bench-{variant}.log"
        print(
            f"building llama-server ({variant}) from llama-cpp-python {version} (log: {log})",
            flush=True,
        )
        sdist = _download_sdist(root, version, log)
        src = _extract_sources(root, sdist, version)
        out = cmake_build_dir(version, variant)
        _run(["cmake", "-S", str(src), "-B", str(out), *CMAKE_FLAGS, *extra_flags], log)
        _run(["cmake", "--build", str(out), "--target", "llama-server", f"-j{jobs}"], log)
        if not binary.is_file():
            raise LlamaServerError(f"the build finished but {binary} is missing; see {log}")
        return binary


def server_version(binary: Path) -> str:
    """`llama-server --version`'s first useful line (version and commit), for the report."""
    try:
        proc = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    lines = [ln.strip() for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    version = [ln for ln in lines if ln.startswith("version")]
    return (version or lines or ["unknown"])[0]


def main(argv: list[str] | None = None) -> int:
    """Print the llama-server path, building it when missing."""
    parser = argparse.ArgumentParser(prog="python -m bench.llama_server", description=__doc__)
    parser.add_argument("--llama-server", help="use this binary instead of the cached build")
    parser.add_argument("--jobs", type=int, default=2, help="parallel compile jobs (default 2)")
    args = parser.parse_args(argv)
    try:
        binary = find_llama_server(args.llama_server, jobs=args.jobs)
    except LlamaServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(binary)
    print(server_version(binary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
