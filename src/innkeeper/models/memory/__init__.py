"""The memory plan: what a model needs in RAM and on each GPU for a set of settings.

- settings.py: the plan's view of EngineConfig (the settings are declared once, there);
- kv.py: the KV cache, recurrent state and context checkpoints, to the byte;
- buffers.py: llama.cpp's compute and output buffers, and the runtime it does not count;
- placement.py: which device holds what, for a number of offloaded layers;
- plan.py: the sums per device, the verdict, and the context and layers `serve` picks.

The names below are the package's interface; the modules are its parts.
"""

from __future__ import annotations

from innkeeper.models.memory.buffers import (
    CUDA_CONTEXT_BYTES,
    RUNTIME_RAM_BYTES,
    compute_buffer_bytes,
    output_buffer_bytes,
)
from innkeeper.models.memory.kv import KVPlan, checkpoint_ram_bytes, kv_row_bytes, plan_kv
from innkeeper.models.memory.placement import DevicePlan, gpu_splits
from innkeeper.models.memory.plan import (
    AutoSettings,
    MemoryPlan,
    Verdict,
    auto_settings,
    default_ctx_candidates,
    plan_for_files,
    plan_memory,
)
from innkeeper.models.memory.settings import MemorySettings, flash_attn_enabled, memory_settings

__all__ = [
    "CUDA_CONTEXT_BYTES",
    "RUNTIME_RAM_BYTES",
    "AutoSettings",
    "DevicePlan",
    "KVPlan",
    "MemoryPlan",
    "MemorySettings",
    "Verdict",
    "auto_settings",
    "checkpoint_ram_bytes",
    "compute_buffer_bytes",
    "default_ctx_candidates",
    "flash_attn_enabled",
    "gpu_splits",
    "kv_row_bytes",
    "memory_settings",
    "output_buffer_bytes",
    "plan_for_files",
    "plan_kv",
    "plan_memory",
]
