"""The KV cache, recurrent state and context checkpoints, to the byte, as llama.cpp lays them out.

KV cache (src/llama-context.cpp, llama-kv-cache*.cpp): n_ctx padded to 256; with several
sequences and a non-unified cache each stream gets pad256(n_ctx / n_seq) cells; sliding-window
layers get pad256(min(cells, n_swa * streams_sharing + n_ubatch)) cells unless `swa_full`
(llama-cpp-python's library default is swa_full=True; llama-server's and innkeeper's engine's is
False, so EngineConfig's default is False too); per-layer KV heads and head dims; MLA models
(`key_length_mla` present) cache K only; without flash attention V is stored transposed at the
widest layer's width; q8_0 is 34 B per 32 values, q4_0 18 B per 32 (settings/engine.py's
CACHE_TYPES).

Recurrent state (llama-memory-recurrent.cpp): each recurrent layer (Mamba, RWKV, LFM2
short-conv; the layers without KV heads of hybrids) holds n_embd_r + n_embd_s f32 values per
sequence, max(1, n_seq_max) sequences, whatever the context size.

Context checkpoints (RAM, not llama.cpp): per slot up to --ctx-checkpoints copies of the part of
the memory that cannot be rolled back (the sliding-window cells, the recurrent state).
"""

from __future__ import annotations

from dataclasses import dataclass

from innkeeper.models.memory.settings import MemorySettings, flash_attn_enabled
from innkeeper.models.spec import ModelSpec
from innkeeper.settings import ConfigError
from innkeeper.settings.engine import CACHE_TYPES, check_v_cache


def pad256(n: int) -> int:
    return -(-n // 256) * 256


def kv_row_bytes(cache_type: str, n_values: int) -> int:
    """Bytes of one cache row of `n_values` values in `cache_type` (ggml_row_size)."""
    t = CACHE_TYPES[cache_type]
    return -(-n_values // t.block) * t.block_bytes


@dataclass(frozen=True)
class KVPlan:
    """The KV cache as llama.cpp lays it out: cells per stream for each cache, bytes per layer."""

    n_ctx: int
    n_stream: int
    cells: int
    swa_cells: int | None
    k_bytes: int
    v_bytes: int
    layer_bytes: tuple[int, ...]  # KV and recurrent state of each layer
    state_bytes: int = 0  # recurrent state (Mamba/RWKV/short-conv layers), f32
    checkpoint_bytes: int = 0  # one context checkpoint of one slot (0: none needed)
    flash_attn: bool = True  # as llama.cpp resolves --flash-attn for this model

    @property
    def total(self) -> int:
        return self.k_bytes + self.v_bytes + self.state_bytes


def plan_kv(spec: ModelSpec, s: MemorySettings) -> KVPlan:
    """Exact KV cache bytes for `spec` under settings `s` (llama.cpp's allocation, to the byte).

    Raises ConfigError for settings llama.cpp would refuse (a quantized V cache without flash
    attention, a context too small for its sequences).
    """
    e = s.engine
    fa = flash_attn_enabled(e.flash_attn, spec.architecture)
    check_v_cache(e.cache_type_v, fa)
    if s.ctx_size < 1:
        raise ConfigError(f"context size must be positive, got {s.ctx_size}")
    n_ctx = pad256(s.ctx_size)
    if s.kv_unified:
        n_stream, per_stream = 1, n_ctx
    else:
        per_stream = pad256(n_ctx // e.parallel)
        if per_stream == 0:
            raise ConfigError(f"context {s.ctx_size} is too small for {e.parallel} sequences")
        n_ctx = per_stream * e.parallel
        n_stream = e.parallel
    n_batch = min(n_ctx, e.batch_size)
    n_ubatch = min(n_batch, e.ubatch_size)
    has_swa = bool(spec.sliding_window) and any(spec.is_swa(i) for i in range(spec.n_layer))
    swa_cells = None
    if has_swa:
        window = spec.sliding_window or 0
        sharing = e.parallel if s.kv_unified else 1
        swa_cells = pad256(min(per_stream, window * sharing + n_ubatch))
        if e.swa_full:
            swa_cells = per_stream
    kv_layers = [il for il in range(spec.n_layer) if spec.has_kv(il)]
    v_width_max = max((spec.head_dims(il)[1] * spec.kv_heads(il) for il in kv_layers), default=0)
    k_total = v_total = 0
    per_layer: list[int] = []
    for il in range(spec.n_layer):
        if il not in kv_layers:
            per_layer.append(0)
            continue
        hk, hv = spec.head_dims(il)
        kvh = spec.kv_heads(il)
        cells = swa_cells if (swa_cells is not None and spec.is_swa(il)) else per_stream
        k = kv_row_bytes(e.cache_type_k, hk * kvh) * cells * n_stream
        v = 0
        if not spec.mla:
            width = hv * kvh if fa else v_width_max  # without FA, V is stored transposed
            v = kv_row_bytes(e.cache_type_v, width) * cells * n_stream
        k_total += k
        v_total += v
        per_layer.append(k + v)
    # Recurrent layers: one row of n_embd_r + n_embd_s f32 per sequence (at least one).
    n_rs = max(1, e.parallel)
    state_row = (spec.n_embd_r + spec.n_embd_s) * 4
    state_total = ckpt = 0
    for il in range(spec.n_layer):
        if spec.is_recurrent(il):
            per_layer[il] += state_row * n_rs
            state_total += state_row * n_rs
            ckpt += state_row
    if swa_cells is not None and not e.swa_full:
        # A slot's checkpoint holds the cells its window still sees: n_swa of them (llama.cpp
        # writes no masked cell; 7.5 MiB per checkpoint measured on Gemma 3 270M).
        seq_cells = min(swa_cells, spec.sliding_window or 0)
        for il in kv_layers:
            if spec.is_swa(il):
                hk, hv = spec.head_dims(il)
                kvh = spec.kv_heads(il)
                row = kv_row_bytes(e.cache_type_k, hk * kvh)
                row += 0 if spec.mla else kv_row_bytes(e.cache_type_v, hv * kvh)
                ckpt += row * seq_cells
    return KVPlan(
        n_ctx,
        n_stream,
        per_stream,
        swa_cells,
        k_total,
        v_total,
        tuple(per_layer),
        state_total,
        ckpt,
        fa,
    )


def checkpoint_ram_bytes(kv: KVPlan, s: MemorySettings) -> int:
    """RAM the context checkpoints can take: --ctx-checkpoints per slot, every slot."""
    return kv.checkpoint_bytes * s.engine.ctx_checkpoints * s.engine.parallel
