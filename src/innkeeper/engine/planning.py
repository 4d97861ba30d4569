"""The settings a model is loaded with: what was given, the memory plan's choices for the rest.

`innkeeper serve` (cli/server.py) and the model registry (serving/registry.py) both load through
these two functions, so a model loaded by name gets exactly the defaults `serve` would give it.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from innkeeper.engine.backend import supports_gpu_offload
from innkeeper.models.hardware import Hardware, detect_hardware, format_size
from innkeeper.models.memory import AutoSettings, MemoryPlan, auto_settings
from innkeeper.models.safety import is_pickle_weights
from innkeeper.settings import ALL_LAYERS, ConfigError
from innkeeper.settings.engine import EngineConfig

log = logging.getLogger("innkeeper")

GGUF_MAGIC = b"GGUF"


class ModelFileError(ValueError):
    """A file llama.cpp cannot or must not load; the message says why and what to do."""


def model_id_for(path: Path) -> str:
    """The name a model file is served under: its file name without `.gguf`."""
    name = path.name
    return name[: -len(".gguf")] if name.lower().endswith(".gguf") else name


def checked_model_file(path: Path, allow_pickle: bool = False) -> Path:
    """The GGUF file to load for `path` (a file, or a folder holding one model); refuses what
    llama.cpp cannot or must not load with a ModelFileError that says why."""
    if is_pickle_weights(path):
        if not allow_pickle:
            raise ModelFileError(
                f"{path.name} holds PyTorch pickle weights, which can run arbitrary code when "
                "loaded; innkeeper refuses them (see `innkeeper inspect` for a scan; pass "
                "--allow-pickle only if you trust the file)"
            )
        raise ModelFileError(f"{path.name} is a PyTorch checkpoint: convert it to GGUF to serve it")
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        firsts = [p for p in ggufs if "-00001-of-" in p.name]
        if len(ggufs) == 1 or len(firsts) == 1:
            return checked_model_file((firsts or ggufs)[0], allow_pickle)
        if not ggufs:
            raise ModelFileError(
                f"{path} holds no GGUF file: innkeeper serves GGUF models "
                f"(see `innkeeper inspect {path}`)"
            )
        raise ModelFileError(f"{path} holds {len(ggufs)} GGUF files: name the one to serve")
    if path.exists() and not path.is_file():  # a FIFO would block open() forever
        raise ModelFileError(
            f"{path} is not a regular file (a FIFO, device or socket): serve a GGUF file"
        )
    try:
        with path.open("rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise ModelFileError(f"cannot read {path}: {exc.strerror}") from None
    if magic != GGUF_MAGIC:
        if path.suffix.lower() == ".safetensors":
            raise ModelFileError(
                f"{path.name} is a safetensors file: innkeeper serves GGUF models "
                "(convert it, or pull a GGUF build)"
            )
        raise ModelFileError(
            f"{path} is not a GGUF model file (it does not start with the GGUF magic bytes)"
        )
    return path


def plan_settings(cfg: EngineConfig, hardware: Hardware | None = None) -> AutoSettings | None:
    """Context size and GPU layers from the memory plan (`ctx_size`/`gpu_layers` given win).

    A file that is not a readable model raises ModelFormatError. Settings the plan cannot
    place on this machine (ConfigError: --main-gpu 2 on one GPU…) or a file it cannot read
    (OSError) are only logged: the plan is advice, and llama.cpp has the last word on those.
    Anything else is a bug in the plan and propagates; so does WorkerTooSmall (a share more
    than its RPC worker has free), which nothing after it could fix.
    """
    if cfg.rpc:  # the workers' devices join the plan (one that does not answer: the load says)
        from innkeeper.engine.rpc import RpcError, with_workers

        try:
            hardware = with_workers(hardware or detect_hardware(), cfg.rpc)
        except RpcError as exc:
            log.warning("memory plan unavailable: %s", exc)
            return None
    try:
        auto = auto_settings(cfg, hardware)
    except (ConfigError, OSError) as exc:
        log.warning("memory plan unavailable: %s", exc)
        return None
    if cfg.rpc:
        check_worker_shares(auto.plan)
    return auto


def check_worker_shares(plan: MemoryPlan) -> None:
    """Refuse a plan that puts more on a worker's device than the worker reports free: ggml
    would fail (or abort) mid-load, after weights have crossed the network. WorkerTooSmall
    names the worker, its free memory and the share."""
    from innkeeper.engine.rpc_probe import WorkerTooSmall

    for d in plan.devices:
        if d.endpoint and d.total_bytes > d.capacity_bytes:
            what = d.name.split(": ", 1)[-1].removeprefix("RPC ")
            raise WorkerTooSmall(
                f"RPC worker {what} has {format_size(d.capacity_bytes)} free, but its share "
                f"of the model needs {format_size(d.total_bytes)} ({d.layers} layers: weights "
                f"{format_size(d.weights_bytes)}, KV cache {format_size(d.kv_cache_bytes)}, "
                f"compute {format_size(d.compute_bytes)}): give it a smaller --tensor-split "
                "share, fewer --gpu-layers or a smaller context"
            )


def planned_engine(cfg: EngineConfig, auto: AutoSettings | None) -> EngineConfig:
    """The engine settings to load with: what the user gave, the plan's choices for the rest.

    Several GPUs and no --tensor-split: the plan's per-GPU layer counts become the split, so
    llama.cpp places layers exactly as `fit` and the plan did.
    """
    offload = supports_gpu_offload() or bool(cfg.rpc)
    gpu_layers = cfg.gpu_layers
    if gpu_layers is None:
        gpu_layers = auto.gpu_layers if auto else (ALL_LAYERS if offload else 0)
    tensor_split = cfg.tensor_split
    if auto is not None and tensor_split is None and cfg.split_mode != "none":
        gpus = [d for d in auto.plan.devices if d.kind == "gpu"]
        if len(gpus) > 1 and any(d.layers for d in gpus):
            tensor_split = tuple(float(d.layers) for d in gpus)
    return replace(
        cfg,
        ctx_size=cfg.ctx_size or (auto.ctx_size if auto else None),
        gpu_layers=gpu_layers if offload else 0,
        tensor_split=tensor_split,
    )
