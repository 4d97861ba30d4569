"""llama.cpp's compute and output buffers, and the runtime cost it does not count.

The compute buffer is a closed form calibrated against llama.cpp's own no_alloc dry runs (see
`compute_buffer_bytes`): the one approximate term of the plan, typically within a few MiB.
Split over several devices, each device holding layers has its own (only the output layer's
holds the logits), and with pipeline parallelism every device keeps 4 copies of its inputs
(`pipeline_copies`): measured on RPC CPU workers, each worker's total within 5%
(tests/engine/test_rpc.py); local multi-GPU splits keep the one buffer until measured so. The
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
PIPELINE_COPIES = 4  # GGML_SCHED_MAX_COPIES: input copies per device with pipeline parallelism


def pipeline_copies(s: MemorySettings, n_devices: int, ngl: int, n_layer: int) -> int:
    """Copies of each device's graph inputs (KQ masks, the hidden state handed over): 4 when
    llama.cpp turns pipeline parallelism on (llama-context.cpp: several devices, every layer
    and the output offloaded, a layer split, the KV cache with its layers, no tensor
    overrides), else 1."""
    e = s.engine
    pipelined = (
        n_devices > 1
        and ngl > n_layer
        and e.split_mode == "layer"
        and e.kv_offload
        and not (e.cpu_moe or e.n_cpu_moe)
    )
    return PIPELINE_COPIES if pipelined else 1


def compute_buffer_bytes(
    spec: ModelSpec, s: MemorySettings, kv: KVPlan, *, output: bool = True, copies: int = 1
) -> int:
    """llama.cpp's worst-case graph buffer (one ubatch against the full cache), closed form.

    ggml-alloc reserves the peak of three phases, each measured with llama.cpp's no_alloc dry
    run on real shapes (Llama-3-8B, Mistral-7B, Gemma-2/3, Mixtral-style MoE, DeepSeek-V2-Lite,
    SmolLM2) at 512-32768 context, FA on and off, ubatch 256-2048:
    - logits: (n_vocab + 2·n_embd)·u·4 — the vocabulary projection of every token in the ubatch;
    - FFN: (3·n_ff + 4·n_embd)·u·4 — gate, up, fused activation and the residual stream;
    - attention without FA: the f32 KQ scores n_kv·u·n_head·4 plus ~5.5 rows of Q width.
    The KQ masks (f32 without FA, f16 with FA; one per cache, base and SWA) stay alive through
    the layers, so they add to the FFN and attention phases.

    One device of a split: the logits only on the `output` layer's device; with pipeline
    parallelism (`copies` > 1) its inputs — the masks and the hidden state it receives — are
    kept `copies` times and stay alive through every phase, the logits' too.
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
    inputs = masks
    if copies > 1:
        inputs = copies * (masks + n_embd * u * f32)
        logits += inputs
    return max(logits if output else 0, ffn + inputs, attn + inputs)


def ubatch(s: MemorySettings, kv: KVPlan) -> int:
    """The tokens of one physical batch, as llama.cpp clamps them (n_ubatch ≤ n_batch ≤ n_ctx)."""
    return min(s.engine.ubatch_size, s.engine.batch_size, kv.n_ctx)


def output_buffer_bytes(spec: ModelSpec, s: MemorySettings) -> int:
    """llama.cpp's logits buffer at context creation: one row of n_vocab floats per sequence."""
    return spec.n_vocab * 4 * s.engine.parallel
