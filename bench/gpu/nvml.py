"""What the NVIDIA driver says: the GPUs, their compute capability, and the memory in use.

Through NVML (nvidia-ml-py, an innkeeper dependency), so no output format is parsed. Every
function answers "nothing" (an empty list, None) on a machine without the driver, which is how
the bench's CPU smoke run goes through the same code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class GpuFacts:
    """One GPU as the report names it."""

    index: int
    name: str
    compute_capability: str  # "9.0"
    total_mib: float
    driver: str


@contextlib.contextmanager
def _nvml() -> Iterator[Any | None]:
    """pynvml, initialised; None when there is no driver (or no NVIDIA GPU)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        yield None
        return
    try:
        yield pynvml
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def gpus() -> list[GpuFacts]:
    """The GPUs the driver sees, in its order."""
    with _nvml() as nv:
        if nv is None:
            return []
        driver = _text(nv.nvmlSystemGetDriverVersion())
        out = []
        for i in range(nv.nvmlDeviceGetCount()):
            handle = nv.nvmlDeviceGetHandleByIndex(i)
            major, minor = nv.nvmlDeviceGetCudaComputeCapability(handle)
            total = nv.nvmlDeviceGetMemoryInfo(handle).total / 2**20
            out.append(
                GpuFacts(i, _text(nv.nvmlDeviceGetName(handle)), f"{major}.{minor}", total, driver)
            )
        return out


def used_mib() -> float | None:
    """GPU memory in use on all GPUs together, MiB; None without a GPU."""
    with _nvml() as nv:
        if nv is None or nv.nvmlDeviceGetCount() == 0:
            return None
        return sum(
            nv.nvmlDeviceGetMemoryInfo(nv.nvmlDeviceGetHandleByIndex(i)).used / 2**20
            for i in range(nv.nvmlDeviceGetCount())
        )


def cuda_architectures(found: list[GpuFacts]) -> str:
    """CMAKE_CUDA_ARCHITECTURES for these GPUs: "90" for an H100, "86;89" for a mixed pair."""
    return ";".join(sorted({g.compute_capability.replace(".", "") for g in found}))
