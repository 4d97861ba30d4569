"""This machine's ggml devices, as libllama's own ggml registry lists them.

One place for the ctypes view of ggml's backend registry: `innkeeper doctor` reports the
backends and devices, the RPC worker lends them (`--device` takes ggml's names), and a load
across workers appends the local GPUs after the workers' devices, as llama.cpp orders them.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import llama_cpp as C

from innkeeper.engine.llama_params import ggml_library

# ggml_backend_dev_type (ggml-backend.h)
DEV_CPU, DEV_GPU, DEV_IGPU = 0, 1, 2


def ggml_registry() -> ctypes.CDLL:
    """libggml, the instance libllama uses (the same registry), its registry calls typed."""
    lib = ggml_library("libggml")
    vp, size = ctypes.c_void_p, ctypes.c_size_t
    for name, restype, argtypes in (
        ("ggml_backend_reg_count", size, []),
        ("ggml_backend_reg_get", vp, [size]),
        ("ggml_backend_reg_name", ctypes.c_char_p, [vp]),
        ("ggml_backend_reg_dev_count", size, [vp]),
        ("ggml_backend_reg_dev_get", vp, [vp, size]),
        ("ggml_backend_dev_count", size, []),
        ("ggml_backend_dev_get", vp, [size]),
        ("ggml_backend_dev_name", ctypes.c_char_p, [vp]),
        ("ggml_backend_dev_description", ctypes.c_char_p, [vp]),
        ("ggml_backend_dev_type", ctypes.c_int, [vp]),
        ("ggml_backend_dev_memory", None, [vp, ctypes.POINTER(size), ctypes.POINTER(size)]),
    ):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def _text(raw: bytes | None) -> str:
    return raw.decode("utf-8", "replace") if raw else ""


def backend_names() -> tuple[str, ...]:
    """The backends this llama.cpp build registered (CPU, CUDA, RPC, ...)."""
    C.llama_backend_init()
    lib = ggml_registry()
    return tuple(
        _text(lib.ggml_backend_reg_name(lib.ggml_backend_reg_get(i)))
        for i in range(lib.ggml_backend_reg_count())
    )


@dataclass(frozen=True)
class LocalDevice:
    """A device of this machine, as ggml names it (the worker's --device takes the name)."""

    name: str
    description: str
    type: int
    free_bytes: int
    total_bytes: int
    ptr: int


def local_devices() -> list[LocalDevice]:
    """Every device of this machine's ggml backends (RPC devices are never registered)."""
    C.llama_backend_init()
    lib = ggml_registry()
    out = []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        out.append(
            LocalDevice(
                _text(lib.ggml_backend_dev_name(dev)),
                _text(lib.ggml_backend_dev_description(dev)),
                int(lib.ggml_backend_dev_type(dev)),
                int(free.value),
                int(total.value),
                int(dev),
            )
        )
    return out


def local_gpus() -> list[LocalDevice]:
    """The accelerators llama.cpp offloads layers to by default (not the CPU)."""
    return [d for d in local_devices() if d.type in (DEV_GPU, DEV_IGPU)]
