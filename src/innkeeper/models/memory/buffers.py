"""llama.cpp's compute and output buffers, and the runtime cost it does not count.

The compute buffer is a closed form calibrated against llama.cpp's own no_alloc dry runs (see
`compute_buffer_bytes`): the one approximate term of the plan, typically within a few MiB. The
overhead is llama.cpp's output (logits) buffer plus what the process needs besides llama.cpp's
allocations: the CUDA context (~400 MiB per GPU) and Python, the server and llama.cpp's code
(~150 MiB of RAM). `fit --measure` shows llama.cpp's own numbers, without that runtime part.
"""

from __future__ import annotations

from innkeeper.models.memory.kv import KVPlan
from innkeeper.models.memory.settings import MemorySettings
from innkeeper.models.spec import ModelSpec

MIB = 1024**2

CUDA_CONTEXT_BYTES = 400 * MIB  # CUDA context + cuBLAS workspace, not counted by llama.cpp
RUNTIME_RAM_BYTES = 150 * MIB  # Python, the server and llama.cpp's code


def compute_buffer_bytes(spec: ModelSpec, s: MemorySettings, kv: KVPlan) -> int:
    """llama.cpp's worst-case graph buffer (one ubatch against the full cache), closed form.

    ggml-alloc reserves the peak of three phases, each measured with llama.cpp's no_alloc dry
    run on real shapes (Llama-3-8B, Mistral-7B, Gemma-2/3, Mixtral-style MoE, DeepSeek-V2-Lite,
    SmolLM2) at 512-32768 context, FA on and off, ubatch 256-2048:
    - logits: (n_vocab + 2·n_embd)·u·4 — the vocabulary projection of every token in the ubatch;
    - FFN: (3·n_ff + 4·n_embd)·u·4 — gate, up, fused activation and the residual stream;
    - attention without FA: the f32 KQ scores n_kv·u·n_head·4 plus ~5.5 rows of Q width.
    The KQ masks (f32 without FA, f16 with FA; one per cache, base and SWA) stay alive through
    the layers, so they add to the FFN and attention phases.
    """
    u = ubatch(s, kv)
    f32 = 4
    n_embd = spec.n_embd
    n_q = max(n_embd, spec.n_head * spec.head_dim_k)
    logits = (spec.n_vocab + 2 * n_embd) * u * f32
    n_ff = spec.n_ff or 4 * n_embd
    ffn = (3 * n_ff + 4 * n_embd) * u * f32
    mask_elem = 2 if kv.flash_attn else 4
    n_kv = kv.cells  # a stream's cells: the whole cache when unified
    masks = n_kv * u * mask_elem
    if kv.swa_cells is not None:
        masks += kv.swa_cells * u * mask_elem
    attn = int(5.5 * n_q * u * f32)
    if not kv.flash_attn:
        attn += n_kv * u * spec.n_head * f32
    return max(logits, ffn + masks, attn + masks)


def ubatch(s: MemorySettings, kv: KVPlan) -> int:
    """The tokens of one physical batch, as llama.cpp clamps them (n_ubatch ≤ n_batch ≤ n_ctx)."""
    return min(s.engine.ubatch_size, s.engine.batch_size, kv.n_ctx)


def output_buffer_bytes(spec: ModelSpec, s: MemorySettings) -> int:
    """llama.cpp's logits buffer at context creation: one row of n_vocab floats per sequence."""
    return spec.n_vocab * 4 * s.engine.parallel
