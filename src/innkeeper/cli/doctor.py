"""`innkeeper doctor`: is llama.cpp built for this machine's GPU, and if not, the exact fix.

Two kinds of facts, gathered separately so the judgement between them is a pure function
(`find_problems`) that tests feed with made-up machines and `serve`'s banner reuses:
  - the build: llama-cpp-python's version, llama.cpp's system info, the ggml backends compiled
    in and the devices they see, whether layers can be offloaded;
  - the hardware: NVIDIA GPUs seen by NVML (the driver), the OS and CPU, the CUDA toolkit.

Load order: on CUDA builds, numpy's bundled libraries loaded before llama.cpp's crash model
loading, so this module imports nothing numpy-based at top level and `gather_build` loads
llama.cpp before anything else it needs.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import typer
from rich.table import Table

from innkeeper.cli.app import app, console
from innkeeper.models.hardware import GPU, detect_gpus, format_size

# ggml_backend_dev_type (ggml-backend.h)
_DEVICE_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel"}
# `make serve GPU=...` name -> the ggml backend registry name a build with it has
GPU_BACKENDS = {"cuda": "CUDA", "vulkan": "Vulkan", "metal": "Metal"}
# problems that mean "there is a GPU and the model will not use it" (serve's banner warns)
GPU_UNUSED_CODES = ("nvidia-gpu-unused", "metal-unused")
CUDA_TOOLKIT_HINT = (
    "install the NVIDIA CUDA toolkit (https://developer.nvidia.com/cuda-downloads, or "
    "`sudo apt install nvidia-cuda-toolkit`) and put nvcc on PATH, or set "
    "CUDACXX=/usr/local/cuda/bin/nvcc"
)


@dataclass(frozen=True)
class Device:
    """One device a ggml backend can run on."""

    name: str
    description: str
    type: str  # cpu | gpu | igpu | accel
    free_bytes: int
    total_bytes: int


@dataclass(frozen=True)
class BuildFacts:
    """What the installed llama.cpp can do."""

    llama_cpp_python: str
    system_info: str
    backends: tuple[str, ...]
    devices: tuple[Device, ...]
    gpu_offload: bool

    @property
    def cpu_features(self) -> tuple[str, ...]:
        """The `NAME = 1` entries of the CPU part of llama.cpp's system info."""
        feats: list[str] = []
        for part in self.system_info.split("|"):
            name, _, value = part.rpartition("=")
            name = name.split(":")[-1].strip()
            if name and value.strip() == "1":
                feats.append(name)
        return tuple(feats)

    def has_backend(self, name: str) -> bool:
        return any(b.lower() == name.lower() for b in self.backends)

    @property
    def rpc(self) -> bool:
        """Built with llama.cpp's RPC backend: `innkeeper worker` and `serve --rpc` work."""
        return self.has_backend("RPC")

    @property
    def gpu_devices(self) -> tuple[Device, ...]:
        return tuple(d for d in self.devices if d.type in ("gpu", "igpu"))


@dataclass(frozen=True)
class HardwareFacts:
    """What the machine has, independent of llama.cpp."""

    nvidia_gpus: tuple[GPU, ...]
    system: str  # platform.system(): Linux, Darwin, Windows
    machine: str  # platform.machine(): x86_64, arm64…
    nvcc: str | None = None  # the CUDA compiler, if installed


@dataclass(frozen=True)
class Problem:
    """Something that makes innkeeper slower than this machine allows, and how to fix it."""

    code: str
    message: str
    fix: str


@dataclass
class Report:
    """Everything `doctor` prints."""

    build: BuildFacts
    hardware: HardwareFacts
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        b, h = self.build, self.hardware
        return {
            "llama_cpp_python": b.llama_cpp_python,
            "system_info": b.system_info,
            "backends": list(b.backends),
            "devices": [asdict(d) for d in b.devices],
            "cpu_features": list(b.cpu_features),
            "gpu_offload": b.gpu_offload,
            "rpc": b.rpc,
            "nvidia_gpus": [asdict(g) for g in h.nvidia_gpus],
            "vram_free_bytes": sum(g.free_bytes for g in h.nvidia_gpus)
            or sum(d.free_bytes for d in b.gpu_devices),
            "system": h.system,
            "machine": h.machine,
            "nvcc": h.nvcc,
            "problems": [asdict(p) for p in self.problems],
            "notes": self.notes,
        }


# ---- facts --------------------------------------------------------------------------------


def _text(raw: bytes | None) -> str:
    return raw.decode("utf-8", "replace") if raw else ""


def gather_build() -> BuildFacts:
    """Ask the installed llama.cpp what it was built with (loads llama.cpp first: see above)."""
    import llama_cpp

    try:
        pkg = version("llama-cpp-python")
    except PackageNotFoundError:
        pkg = getattr(llama_cpp, "__version__", "unknown")
    from innkeeper.engine.devices import backend_names, local_devices

    backends = backend_names()
    devices = [
        Device(
            d.name, d.description, _DEVICE_TYPES.get(d.type, "other"), d.free_bytes, d.total_bytes
        )
        for d in local_devices()
    ]
    return BuildFacts(
        llama_cpp_python=pkg,
        system_info=_text(llama_cpp.llama_print_system_info()).strip(),
        backends=backends,
        devices=tuple(devices),
        # llama.cpp also says yes for any build with RPC: offload here means a local GPU.
        gpu_offload=bool(llama_cpp.llama_supports_gpu_offload())
        and any(d.type in ("gpu", "igpu") for d in devices),
    )


def find_nvcc() -> str | None:
    """nvcc on PATH, at $CUDACXX, or in the default toolkit folder."""
    for candidate in (os.environ.get("CUDACXX"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def gather_hardware() -> HardwareFacts:
    """NVIDIA GPUs through NVML, the OS and CPU, and the CUDA compiler."""
    return HardwareFacts(detect_gpus(), platform.system(), platform.machine(), find_nvcc())


# ---- judgement (pure) ---------------------------------------------------------------------


def find_problems(build: BuildFacts, hw: HardwareFacts) -> list[Problem]:
    """What keeps this machine's accelerator unused, each with the one command that fixes it."""
    problems: list[Problem] = []
    if hw.nvidia_gpus:
        names = ", ".join(sorted({g.name for g in hw.nvidia_gpus}))
        gpu = f"NVIDIA GPU found ({names})"
        if not build.has_backend("CUDA") and not build.has_backend("Vulkan"):
            fix = "run `make serve GPU=cuda` (rebuilds llama-cpp-python with CUDA)"
            if hw.nvcc is None:
                fix = f"{CUDA_TOOLKIT_HINT}, then {fix}"
            problems.append(
                Problem(
                    "nvidia-gpu-unused",
                    f"{gpu} but this llama.cpp build has no CUDA: models run on the CPU, "
                    "many times slower",
                    fix,
                )
            )
        elif not build.gpu_devices:
            problems.append(
                Problem(
                    "gpu-not-visible",
                    f"{gpu} and llama.cpp is built with "
                    f"{'CUDA' if build.has_backend('CUDA') else 'Vulkan'}, but it sees no GPU",
                    "check the driver with `nvidia-smi` (and CUDA_VISIBLE_DEVICES); a driver "
                    "older than the CUDA toolkit the build used cannot run it: update the driver",
                )
            )
    if hw.system == "Darwin" and hw.machine == "arm64" and not build.has_backend("Metal"):
        problems.append(
            Problem(
                "metal-unused",
                "Apple Silicon Mac but this llama.cpp build has no Metal: the GPU is not used",
                "run `make serve GPU=metal`",
            )
        )
    if build.gpu_devices and not build.gpu_offload:
        problems.append(
            Problem(
                "no-offload",
                "llama.cpp sees a GPU but reports that it cannot offload layers",
                "reinstall the GPU build: `make serve GPU=cuda` (or vulkan, metal)",
            )
        )
    return problems


def notes_for(build: BuildFacts, hw: HardwareFacts) -> list[str]:
    """Plain facts worth a line when nothing is wrong."""
    notes = []
    if not hw.nvidia_gpus and not build.gpu_devices:
        notes.append(
            "no GPU found: models run on the CPU (fine for small models; `innkeeper fit` "
            "tells what fits in RAM)"
        )
    for d in build.gpu_devices:
        notes.append(
            f"llama.cpp uses {d.name} ({d.description}): {format_size(d.free_bytes)} free "
            f"of {format_size(d.total_bytes)}"
        )
    return notes


def diagnose(build: BuildFacts, hw: HardwareFacts) -> Report:
    return Report(build, hw, find_problems(build, hw), notes_for(build, hw))


# ---- command ------------------------------------------------------------------------------


@app.command("doctor")
def doctor_command(
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """Is llama.cpp built for this machine's GPU? Backends, devices, free VRAM, and fixes."""
    build = gather_build()  # llama.cpp before anything else (see the module docstring)
    report = diagnose(build, gather_hardware())
    if as_json:
        print(json.dumps(report.to_json(), indent=2))
        return
    b, h = report.build, report.hardware
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_column(style="bold cyan", no_wrap=True)
    t.add_column()
    t.add_row("llama-cpp-python", b.llama_cpp_python)
    t.add_row("backends", ", ".join(b.backends) or "-")
    t.add_row("GPU offload", "[green]yes[/]" if b.gpu_offload else "no")
    t.add_row(
        "RPC (worker, --rpc)",
        "[green]yes[/]" if b.rpc else "no: `make install` rebuilds llama.cpp with it",
    )
    for d in b.devices:
        mem = f", {format_size(d.free_bytes)} free" if d.type != "cpu" else ""
        t.add_row(f"device {d.name}", f"{d.description} ({d.type}{mem})")
    gpus = ", ".join(f"{g.name} ({format_size(g.free_bytes)} free)" for g in h.nvidia_gpus)
    t.add_row("NVIDIA GPUs (NVML)", gpus or "none")
    t.add_row("CPU features", " ".join(b.cpu_features) or "?")
    t.add_row("system", f"{h.system} {h.machine}")
    t.add_row("nvcc", h.nvcc or "not found")
    console.print(t)
    for note in report.notes:
        console.print(f"[dim]· {note}[/]")
    if not report.problems:
        console.print("[green]no problems found[/]")
    for p in report.problems:
        console.print(f"[bold yellow]problem:[/] {p.message}\n  [bold]fix:[/] {p.fix}")
