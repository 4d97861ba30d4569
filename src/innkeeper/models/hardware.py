"""What this machine has: RAM (psutil) and NVIDIA GPUs (nvidia-ml-py), or what the user pretends.

GPU detection degrades quietly: no driver, no library or no device all mean "no GPU", never an
error, because most users asking "will it fit?" simply have none (the reason is logged). `--vram`/
`--ram` replace the detected numbers so a user can plan a purchase; sizes are read by
`innkeeper.settings.parse_size`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import psutil

from innkeeper.settings import parse_size

log = logging.getLogger("innkeeper.hardware")


def format_size(n: int | float) -> str:
    """Bytes as a short human string in binary units (`4.58 GiB`)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} TiB"  # pragma: no cover


@dataclass(frozen=True)
class GPU:
    """One accelerator: `free_bytes` is what a new process can still allocate."""

    index: int
    name: str
    total_bytes: int
    free_bytes: int
    endpoint: str = ""  # an RPC worker's HOST:PORT (its device, lent over the network)


@dataclass(frozen=True)
class Hardware:
    """RAM and GPUs available for a model; `source` says whether detected or pretended."""

    ram_total_bytes: int
    ram_available_bytes: int
    gpus: tuple[GPU, ...] = ()
    source: str = "detected"

    def to_json(self) -> dict[str, object]:
        return {
            "source": self.source,
            "ram_total_bytes": self.ram_total_bytes,
            "ram_available_bytes": self.ram_available_bytes,
            "gpus": [
                {
                    "index": g.index,
                    "name": g.name,
                    "total_bytes": g.total_bytes,
                    "free_bytes": g.free_bytes,
                }
                for g in self.gpus
            ],
        }


def detect_gpus() -> tuple[GPU, ...]:
    """NVIDIA GPUs through NVML; an empty tuple whenever anything is missing or fails.

    No library or no driver is the common case (most machines have no NVIDIA GPU): logged at
    debug level. A driver that answers and then fails is logged as a warning, with the GPUs
    read before the failure kept.
    """
    try:
        import pynvml
    except ImportError as exc:
        log.debug("no NVML library (nvidia-ml-py): %s", exc)
        return ()
    try:
        pynvml.nvmlInit()
    except (pynvml.NVMLError, OSError) as exc:
        log.debug("no NVIDIA driver: %s", exc)
        return ()
    gpus: list[GPU] = []
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            name = pynvml.nvmlDeviceGetName(handle)
            if isinstance(name, bytes):
                name = name.decode(errors="replace")
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(GPU(i, str(name), int(mem.total), int(mem.free)))
    except (pynvml.NVMLError, OSError) as exc:
        log.warning("reading GPU %d through NVML failed: %s", len(gpus), exc)
    finally:
        try:
            pynvml.nvmlShutdown()
        except pynvml.NVMLError as exc:
            log.debug("nvmlShutdown failed: %s", exc)
    return tuple(gpus)


def detect_hardware() -> Hardware:
    """This machine's RAM and GPUs right now."""
    vm = psutil.virtual_memory()
    return Hardware(int(vm.total), int(vm.available), detect_gpus(), "detected")


def hardware_with_overrides(
    vram: str | int | None = None,
    ram: str | int | None = None,
    base: Hardware | None = None,
) -> Hardware:
    """Detected hardware with the user's pretend sizes applied.

    `vram` may list several GPUs separated by commas (`24GiB,12GiB`); `0` means no GPU. A
    pretended device is taken as entirely free, since it is the machine being planned for.
    """
    hw = base or detect_hardware()
    if ram is not None:
        size = parse_size(ram)
        hw = replace(hw, ram_total_bytes=size, ram_available_bytes=size, source="override")
    if vram is not None:
        parts = [p for p in str(vram).split(",") if p.strip()] if isinstance(vram, str) else [vram]
        sizes = [parse_size(p) for p in parts]
        gpus = tuple(
            GPU(i, f"GPU {i} ({format_size(s)})", s, s) for i, s in enumerate(sizes) if s > 0
        )
        hw = replace(hw, gpus=gpus, source="override")
    return hw
