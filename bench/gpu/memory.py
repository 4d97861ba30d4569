"""GPU memory: what each server holds once a model is loaded, against `innkeeper fit`'s plan.

Each server is started alone on an otherwise idle GPU, answers one short request (cuBLAS
allocates its workspace on first use), and the driver's memory in use is read before the
start and after the answer: the difference is that server's footprint, CUDA context included.
The plan comes from `innkeeper fit --json` with serve's settings, so "plan / used" says how
well `fit` predicts what `serve` then takes.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import loadgen, servers
from bench.gpu import nvml


@dataclass
class Footprint:
    """One server's GPU memory with one model."""

    server: str
    gpu_layers: str
    used_mib: float | None  # measured; None without a GPU
    planned_mib: float | None = None  # fit's GPU total (innkeeper only)
    answered: bool = False
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def fit_plan(model: Path, ctx_size: int, flash_attn: str, gpu_layers: int | None) -> dict[str, Any]:
    """`innkeeper fit MODEL --json` with serve's settings; exit 2 (does not fit) still plans."""
    cmd = [sys.executable, "-m", "innkeeper", "fit", str(model), "--json"]
    cmd += ["--ctx-size", str(ctx_size), "--flash-attn", flash_attn]
    if gpu_layers is not None:
        cmd += ["--gpu-layers", str(gpu_layers)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    if proc.returncode not in (0, 2):
        raise RuntimeError(f"`{' '.join(cmd)}` failed ({proc.returncode}):\n{proc.stderr}")
    return dict(json.loads(proc.stdout))


def planned_gpu_mib(plan: dict[str, Any]) -> float | None:
    """The plan's bytes on GPUs, MiB; None when it puts nothing on a GPU."""
    gpus = [d for d in plan.get("devices", []) if d.get("kind") == "gpu"]
    return sum(d["total_bytes"] for d in gpus) / 2**20 if gpus else None


async def _answer(url: str, name: str) -> loadgen.RequestResult:
    async with loadgen.new_client() as client:
        return await loadgen.stream_completion(client, loadgen.Target(name, url), "Hello.", 8)


def measure(spec: servers.ServerSpec, gpu_layers: str, log_dir: Path) -> Footprint:
    """Start `spec` alone, let it answer once, read the GPU memory it added, stop it."""
    before = nvml.used_mib()
    try:
        server = servers.start(spec, log_dir)
    except servers.ServerStartError as exc:
        return Footprint(spec.name, gpu_layers, None, error=str(exc))
    try:
        result = asyncio.run(_answer(server.url, spec.name))
        after = nvml.used_mib()
    finally:
        server.stop()
    used = after - before if after is not None and before is not None else None
    return Footprint(spec.name, gpu_layers, used, answered=result.error is None, error=result.error)


def render(rows: dict[str, list[dict[str, Any]]]) -> str:
    """The memory table of every model: measured, planned, and their ratio."""

    def mib(value: float | None) -> str:
        return "n/a" if value is None else f"{value:,.0f}"

    lines = [
        "| model | server | GPU layers | GPU memory used, MiB | `fit`'s plan, MiB | plan / used | answered |",
        "|---|---|---|---|---|---|---|",
    ]
    for model, footprints in rows.items():
        for f in footprints:
            ratio = (
                f"{f['planned_mib'] / f['used_mib']:.2f}"
                if f["planned_mib"] and f["used_mib"]
                else "n/a"
            )
            first_line = (f["error"] or "?").splitlines()[0][:100] if f["error"] else "?"
            answered = "yes" if f["answered"] else f"no: {first_line}"
            lines.append(
                f"| {model} | {f['server']} | {f['gpu_layers']} | {mib(f['used_mib'])} "
                f"| {mib(f['planned_mib'])} | {ratio} | {answered} |"
            )
    return "\n".join(lines)
