"""What this machine has: RAM (psutil) and NVIDIA GPUs (nvidia-ml-py), or what the user pretends.

GPU detection degrades quietly: no driver, no library or no device all mean "no GPU", never an
error, because most users asking "will it fit?" simply have none. `--vram`/`--ram` replace the
detected numbers so a user can plan a purchase.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, replace

import psutil

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int | float) -> int:
    """Parse `12GiB`, `12GB`, `12G`, `12000MiB`, `1.5 GiB` or a plain byte count into bytes.

    A bare `G`/`M`/`K` is read as the binary unit (GiB, MiB, KiB), as `free -h` and most users
    mean it; `GB`/`MB` are decimal, as disk vendors mean it.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"size must not be negative: {text}")
        return int(text)
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"not a size: {text!r} (try 12GiB, 12GB, 12G or 12000MiB)")
    number, unit = float(m.group(1)), m.group(2).lower()
    if unit in ("g", "m", "k", "t"):
        unit += "ib"
    if unit not in _UNITS:
        raise ValueError(
            f"unknown size unit {m.group(2)!r} in {text!r} (use B, KiB, MiB, GiB, GB…)"
        )
    return int(number * _UNITS[unit])


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


@dataclass(frozen=True)
class Hardware:
    """RAM and GPUs available for a model; `source` says whether detected or pretended."""

    ram_total_bytes: int
    ram_available_bytes: int
    gpus: tuple[GPU, ...] = ()
    source: str = "detected"

    @property
    def vram_total_bytes(self) -> int:
        return sum(g.total_bytes for g in self.gpus)

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
    """NVIDIA GPUs through NVML; an empty tuple whenever anything is missing or fails."""
    try:
        import pynvml
    except Exception:
        return ()
    try:
        pynvml.nvmlInit()
    except Exception:
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
    except Exception:
        return tuple(gpus)
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()
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
