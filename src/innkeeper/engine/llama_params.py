"""The knobs of a model load and of a context, and the llama.cpp ctypes structs they fill.

Kept apart from backend.py (models, contexts, decoding): filling a struct is done once per
load, with checks (`set_fields`) that the per-token paths must not pay.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import llama_cpp as C

from innkeeper.settings.engine import CACHE_TYPES

FLASH_ATTN = {
    "auto": C.LLAMA_FLASH_ATTN_TYPE_AUTO,
    "on": C.LLAMA_FLASH_ATTN_TYPE_ENABLED,
    "off": C.LLAMA_FLASH_ATTN_TYPE_DISABLED,
}


class BackendError(Exception):
    """llama.cpp refused something (a file it cannot load, a context it cannot create)."""


SPLIT_MODES = {
    "none": C.LLAMA_SPLIT_MODE_NONE,
    "layer": C.LLAMA_SPLIT_MODE_LAYER,
    "row": C.LLAMA_SPLIT_MODE_ROW,
}


def set_fields(struct: ctypes.Structure, **values: object) -> None:
    """Assign fields of a llama.cpp ctypes struct, refusing names the struct does not have.

    ctypes quietly accepts any attribute as a plain Python one, so a field the binding renamed
    or removed (llama-cpp-python 0.3.36 replaced `use_mmap`/`use_mlock` by `load_mode`) would
    become a silent no-op. Every struct write in innkeeper goes through here instead.
    """
    known = {name for name, *_ in type(struct)._fields_}
    for name, value in values.items():
        if name not in known:
            raise BackendError(
                f"llama.cpp's {type(struct).__name__} has no field {name!r}: this innkeeper "
                "does not match the installed llama-cpp-python"
            )
        setattr(struct, name, value)


def load_mode(use_mmap: bool, use_mlock: bool) -> int:
    """llama_model_params.load_mode for the --no-mmap / --mlock pair.

    The default stays llama.cpp's AUTO (map the file unless a device cannot use mappings).
    """
    if use_mlock:
        return C.LLAMA_LOAD_MODE_MMAP_MLOCK if use_mmap else C.LLAMA_LOAD_MODE_MLOCK
    return C.LLAMA_LOAD_MODE_AUTO if use_mmap else C.LLAMA_LOAD_MODE_NONE


class TensorBuftOverride(ctypes.Structure):
    """llama.h's llama_model_tensor_buft_override (the binding declares the field void*)."""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def ggml_library(name: str) -> ctypes.CDLL:
    """A ggml library (`libggml`, `libggml-base`, `libggml-rpc`) as libllama loaded it: by
    its soname file. Wheels hold `libggml-base.so` and `libggml-base.so.0` as two copies, and
    opening the other one loads a second ggml, with registries, buffer types and hooks of its
    own (a --cpu-moe override then named a buffer type libllama had never seen)."""
    folder = Path(C.__file__).parent / "lib"
    path = folder / f"{name}.so.0"
    return ctypes.CDLL(str(path if path.is_file() else folder / f"{name}.so"))


def cpu_buffer_type() -> int:
    """ggml_backend_cpu_buffer_type(): where llama-server's --cpu-moe puts expert tensors.

    The binding does not expose ggml's backend API, so it is called from the ggml library
    libllama itself uses (`ggml_library`); llama.cpp compares an override's buffer type with
    this very pointer.
    """
    lib = ggml_library("libggml-base")
    fn = lib.ggml_backend_cpu_buffer_type
    fn.argtypes, fn.restype = [], ctypes.c_void_p
    buft = fn()
    if not buft:
        raise BackendError("llama.cpp has no CPU buffer type to keep tensors in RAM")
    return int(buft)


@dataclass(frozen=True)
class ModelParams:
    """The knobs of one model load (`EngineConfig` maps its settings here, in engine.py)."""

    gpu_layers: int = 0
    use_mmap: bool = True
    use_mlock: bool = False
    main_gpu: int = 0
    split_mode: str = "layer"
    tensor_split: tuple[float, ...] | None = None
    cpu_tensor_patterns: tuple[str, ...] = ()  # tensor-name regexes kept in RAM (MoE experts)
    rpc: tuple[str, ...] = ()  # RPC workers (HOST:PORT) whose devices join this load


def model_params_struct(params: ModelParams) -> tuple[C.llama_model_params, list[object]]:
    """Fill llama_model_params; returns it with the ctypes buffers it points into (keep them)."""
    mp = C.llama_model_default_params()
    keep: list[object] = []
    set_fields(
        mp,
        n_gpu_layers=params.gpu_layers,
        load_mode=load_mode(params.use_mmap, params.use_mlock),
        main_gpu=params.main_gpu,
        split_mode=SPLIT_MODES[params.split_mode],
    )
    if params.tensor_split is not None:
        n = int(C.llama_max_devices())
        split = (ctypes.c_float * n)(*params.tensor_split[:n])
        keep.append(split)
        set_fields(mp, tensor_split=split)
    if params.cpu_tensor_patterns:
        buft = cpu_buffer_type()
        overrides = (TensorBuftOverride * (len(params.cpu_tensor_patterns) + 1))()
        for item, pattern in zip(overrides, params.cpu_tensor_patterns, strict=False):
            set_fields(item, pattern=pattern.encode(), buft=buft)
        keep.append(overrides)  # the last entry stays zeroed: the NULL terminator
        set_fields(mp, tensor_buft_overrides=ctypes.cast(overrides, ctypes.c_void_p))
    if params.rpc:
        from innkeeper.engine.rpc import model_devices  # rpc.py builds on this module

        found = model_devices(params.rpc)
        devices = (ctypes.c_void_p * (len(found) + 1))(*found)
        keep.append(devices)  # the last entry stays zeroed: the NULL terminator
        set_fields(mp, devices=ctypes.cast(devices, ctypes.c_void_p))
    return mp, keep


@dataclass(frozen=True)
class ContextParams:
    """The knobs of one llama.cpp context (KV cache and compute)."""

    n_ctx: int
    n_seq: int = 1
    n_batch: int = 2048
    n_ubatch: int = 512
    threads: int = 0
    threads_batch: int = 0
    flash_attn: str = "auto"
    cache_type_k: str = "f16"
    cache_type_v: str = "f16"
    swa_full: bool = False  # sliding-window layers keep the whole context (llama-server: off)
    offload_kqv: bool = True  # False: the KV cache stays in RAM (--no-kv-offload)


def context_params_struct(
    params: ContextParams, threads: int, embeddings: bool, pooling_type: int | None
) -> C.llama_context_params:
    """Fill llama_context_params (`threads`: params.threads, or the default resolved)."""
    cp = C.llama_context_default_params()
    set_fields(
        cp,
        n_ctx=params.n_ctx,
        n_batch=params.n_batch,
        n_ubatch=min(params.n_ubatch, params.n_batch),
        n_seq_max=params.n_seq,
        n_threads=threads,
        n_threads_batch=params.threads_batch or threads,
        flash_attn_type=FLASH_ATTN[params.flash_attn],
        type_k=CACHE_TYPES[params.cache_type_k].ggml_type,
        type_v=CACHE_TYPES[params.cache_type_v].ggml_type,
        offload_kqv=params.offload_kqv,
        # Every slot may use the whole context: cells are shared, not split per sequence.
        kv_unified=True,
        no_perf=False,
        # Sliding-window layers keep only their window (plus a ubatch) unless asked
        # otherwise; the context checkpoints (kv_stash.py) keep prompt reuse working.
        swa_full=params.swa_full,
        embeddings=embeddings,
    )
    if pooling_type is not None:
        set_fields(cp, pooling_type=pooling_type)
    return cp
