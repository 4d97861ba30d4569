"""`innkeeper doctor`, the GPU problems it finds, and the serve banner's GPU/VRAM warnings.

The command runs for real on this machine; the judgement (`find_problems`, `banner_warnings`)
is pure, so other machines (an NVIDIA card with a CPU build, a Mac without Metal) are
described to it as facts.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest

from innkeeper.cli.doctor import (
    BuildFacts,
    Device,
    HardwareFacts,
    find_problems,
)
from innkeeper.cli.server import banner_warnings
from innkeeper.engine.backend import Model, ModelInfo
from innkeeper.models.gguf_meta import read_gguf_spec
from innkeeper.models.hardware import GPU, hardware_with_overrides
from innkeeper.models.memory import MemoryPlan, memory_settings, plan_memory
from innkeeper.models.store import default_model_path
from innkeeper.settings.engine import EngineConfig

GIB = 1024**3
CPU_INFO = "CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | OPENMP = 1 | REPACK = 1 |"
CPU_DEV = Device("CPU", "AMD Ryzen 7 5800X", "cpu", 30 * GIB, 32 * GIB)
RTX = GPU(0, "NVIDIA GeForce RTX 3060", 12 * GIB, 11 * GIB)
CPU_BUILD = BuildFacts("0.3.36", CPU_INFO, ("CPU",), (CPU_DEV,), gpu_offload=False)
CUDA_BUILD = BuildFacts(
    "0.3.36",
    "CUDA : ARCHS = 860 | " + CPU_INFO,
    ("CUDA", "CPU"),
    (Device("CUDA0", "NVIDIA GeForce RTX 3060", "gpu", 11 * GIB, 12 * GIB), CPU_DEV),
    gpu_offload=True,
)
LINUX_NVIDIA = HardwareFacts((RTX,), "Linux", "x86_64", nvcc="/usr/local/cuda/bin/nvcc")


def test_doctor_json_on_this_machine() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "innkeeper", "doctor", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["llama_cpp_python"] == "0.3.36"  # the pinned build
    assert "CPU" in report["backends"] and report["system_info"].startswith(("CPU", "CUDA"))
    assert any(d["type"] == "cpu" for d in report["devices"])
    gpu_backend = any(b in report["backends"] for b in ("CUDA", "Vulkan", "Metal"))
    assert report["gpu_offload"] == gpu_backend
    assert report["rpc"] == ("RPC" in report["backends"])
    if not gpu_backend:  # this machine's CPU build: no offload, and nothing to fix unless a GPU
        assert report["gpu_offload"] is False
        codes = [p["code"] for p in report["problems"]]
        assert codes == (["nvidia-gpu-unused"] if report["nvidia_gpus"] else [])
    if not report["nvidia_gpus"] and not gpu_backend:
        assert any("no GPU found" in n for n in report["notes"])
    if platform_x86(report):
        assert "AVX2" in report["cpu_features"] or "AVX" in report["cpu_features"]


def platform_x86(report: dict[str, object]) -> bool:
    return str(report["machine"]).lower() in ("x86_64", "amd64")


def test_nvidia_gpu_with_a_cpu_build_is_a_problem_with_the_make_fix() -> None:
    [p] = find_problems(CPU_BUILD, LINUX_NVIDIA)
    assert p.code == "nvidia-gpu-unused"
    assert "RTX 3060" in p.message and "no CUDA" in p.message
    assert "make serve GPU=cuda" in p.fix and "toolkit" not in p.fix


def test_without_nvcc_the_fix_says_what_to_install() -> None:
    no_toolkit = HardwareFacts((RTX,), "Linux", "x86_64", nvcc=None)
    [p] = find_problems(CPU_BUILD, no_toolkit)
    assert "nvidia-cuda-toolkit" in p.fix and "CUDACXX" in p.fix
    assert p.fix.endswith("run `make serve GPU=cuda` (rebuilds llama-cpp-python with CUDA)")


def test_a_working_cuda_build_has_no_problems() -> None:
    assert find_problems(CUDA_BUILD, LINUX_NVIDIA) == []
    assert find_problems(CPU_BUILD, HardwareFacts((), "Linux", "x86_64")) == []


def test_cuda_build_that_sees_no_gpu_points_at_the_driver() -> None:
    blind = BuildFacts("0.3.36", CUDA_BUILD.system_info, ("CUDA", "CPU"), (CPU_DEV,), False)
    [p] = find_problems(blind, LINUX_NVIDIA)
    assert p.code == "gpu-not-visible" and "nvidia-smi" in p.fix


def test_apple_silicon_without_metal() -> None:
    mac = HardwareFacts((), "Darwin", "arm64")
    [p] = find_problems(CPU_BUILD, mac)
    assert p.code == "metal-unused" and p.fix == "run `make serve GPU=metal`"


def test_cpu_features_parsed_from_system_info() -> None:
    assert CPU_BUILD.cpu_features == ("SSE3", "AVX", "AVX2", "F16C", "FMA", "OPENMP", "REPACK")
    assert "ARCHS" not in CUDA_BUILD.cpu_features


# ---- the serve banner -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_info() -> Iterator[ModelInfo]:
    model = Model(default_model_path())
    try:
        yield model.info
    finally:
        model.close()


def _plan(vram: str, gpu_layers: int | None) -> MemoryPlan:
    hw = hardware_with_overrides(vram=vram, ram="16GiB")
    spec = read_gguf_spec(default_model_path())
    settings = memory_settings(EngineConfig(model_path=default_model_path(), ctx_size=8192))
    return plan_memory(spec, settings, hw, gpu_layers=gpu_layers)


def test_banner_warns_when_the_gpu_is_not_used(smol_info: ModelInfo) -> None:
    problems = find_problems(CPU_BUILD, LINUX_NVIDIA)
    [warning] = banner_warnings(
        info=smol_info, template_given=False, template_name="gguf", problems=problems, plan=None
    )
    assert warning.startswith("your GPU is not used:") and "make serve GPU=cuda" in warning
    quiet = banner_warnings(
        info=smol_info, template_given=False, template_name="gguf", problems=[], plan=None
    )
    assert quiet == []  # SmolLM2 has its own template, no GPU problem


def test_banner_warns_when_the_plan_needs_more_vram_than_free(smol_info: ModelInfo) -> None:
    forced = _plan("128MiB", gpu_layers=999)  # every layer on a GPU too small for them
    [warning] = banner_warnings(
        info=smol_info, template_given=False, template_name="gguf", problems=[], plan=forced
    )
    assert "spill into system RAM" in warning and "--gpu-layers" in warning
    planned = _plan("128MiB", gpu_layers=None)  # the plan's own choice fits
    assert (
        banner_warnings(
            info=smol_info, template_given=False, template_name="gguf", problems=[], plan=planned
        )
        == []
    )
