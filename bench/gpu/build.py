"""One CUDA llama.cpp for both servers: llama-server, and the same libraries under innkeeper.

The build is the CPU bench's (bench/llama_server.py: the llama.cpp that the pinned
llama-cpp-python vendors, built once into the cache) with -DGGML_CUDA=ON, beside the CPU build.
It makes shared libraries (llama.cpp's default), and innkeeper runs on exactly those: the bench
puts a copy of the installed `llama_cpp` package whose `lib` folder points at the build first
on innkeeper's PYTHONPATH. So both sides run the same kernels from one compile, and the
user's own install (CPU or GPU) is neither needed nor touched.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

from bench.gpu import nvml
from bench.llama_server import (
    LlamaServerError,
    build_dir,
    build_llama_server,
    cached_binary,
)

LIBLLAMA = {"win32": "llama.dll", "darwin": "libllama.dylib"}.get(sys.platform, "libllama.so")


def cuda_llama_server(arch: str | None, jobs: int) -> Path:
    """The CUDA llama-server from the cache, built first when missing (minutes).

    `arch` is CMAKE_CUDA_ARCHITECTURES; None: the GPUs' own, read from the driver.
    """
    binary = cached_binary(variant="cuda")
    if binary.is_file():
        return binary
    nvcc = find_nvcc()
    if nvcc is None:
        raise LlamaServerError(
            "nvcc (the CUDA toolkit) was not found on PATH, at $CUDACXX or in /usr/local/cuda; "
            "install it, or pass --llama-server PATH to a llama-server built with CUDA"
        )
    if arch is None:
        found = nvml.gpus()
        if not found:
            raise LlamaServerError(
                "no NVIDIA GPU is visible (NVML found none): this bench needs one; to only "
                "build here, name the architecture with --cuda-arch (e.g. 90 for an H100)"
            )
        arch = nvml.cuda_architectures(found)
    flags: tuple[str, ...] = ("-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={arch}")
    if shutil.which("nvcc") is None and not os.environ.get("CUDACXX"):
        flags += (f"-DCMAKE_CUDA_COMPILER={nvcc}",)  # CMake looks on PATH and at $CUDACXX
    return build_llama_server(jobs=jobs, variant="cuda", extra_flags=flags)


def find_nvcc() -> str | None:
    """The CUDA compiler where `innkeeper doctor` looks: $CUDACXX, PATH, /usr/local/cuda."""
    for candidate in (os.environ.get("CUDACXX"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def installed_llama_cpp() -> Path:
    """The folder of the installed llama_cpp package (found without importing it)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise LlamaServerError("llama-cpp-python is not installed: run `make install`")
    return Path(spec.origin).parent


def innkeeper_site(lib_dir: Path) -> Path:
    """A folder holding `llama_cpp` (the installed Python package) with `lib` -> `lib_dir`.

    Put first on PYTHONPATH, it makes innkeeper load llama.cpp from `lib_dir`; innkeeper's own
    early load of libllama (src/innkeeper/__init__.py) finds the package the same way.
    """
    if not (lib_dir / LIBLLAMA).is_file():
        raise LlamaServerError(f"{lib_dir} holds no {LIBLLAMA}: not a shared-library build")
    key = hashlib.sha256(str(lib_dir.resolve()).encode()).hexdigest()[:12]
    site = build_dir() / f"innkeeper-site-{key}"
    package = site / "llama_cpp"
    if package.exists():
        shutil.rmtree(package)
    ignore = shutil.ignore_patterns("lib", "__pycache__")
    shutil.copytree(installed_llama_cpp(), package, ignore=ignore)
    (package / "lib").symlink_to(lib_dir.resolve(), target_is_directory=True)
    return site


def with_site(site: Path) -> dict[str, str]:
    """The environment for innkeeper processes: `site` first on PYTHONPATH."""
    rest = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": str(site) + (os.pathsep + rest if rest else "")}


def loaded_llama() -> tuple[Path, bool]:
    """The libllama that innkeeper loads in this environment, and whether it can use a GPU."""
    code = (  # innkeeper's own answer: llama.cpp says yes for any RPC build, GPU or not
        "import innkeeper, llama_cpp\n"
        "from innkeeper.engine.backend import supports_gpu_offload\n"
        "print(int(supports_gpu_offload()), llama_cpp.llama_cpp._lib._name)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    if proc.returncode != 0:
        raise LlamaServerError(f"llama_cpp does not load from the bench's build:\n{proc.stderr}")
    offload, path = proc.stdout.strip().splitlines()[-1].split(" ", 1)
    return Path(path).resolve(), offload == "1"
