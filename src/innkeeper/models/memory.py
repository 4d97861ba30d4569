"""ModelSpec + settings + hardware -> MemoryPlan: what a model needs, where, and whether it fits.

The exact parts follow llama.cpp (the build in llama-cpp-python 0.3.36) line by line:
- weights: the tensor table's bytes; the input embedding stays in RAM, the output layer is the
  first layer offloaded (`i_gpu_start = n_layer + 1 - n_gpu_layers`), a tied output gets its own
  GPU copy;
- KV cache (src/llama-context.cpp, llama-kv-cache*.cpp): n_ctx padded to 256; with several
  sequences and a non-unified cache each stream gets pad256(n_ctx / n_seq) cells; sliding-window
  layers get pad256(min(cells, n_swa * streams_sharing + n_ubatch)) cells unless `swa_full`
  (llama-cpp-python's library default is swa_full=True; llama-server's and innkeeper's engine's
  is False, so the default here is False too); per-layer KV heads and head dims;
  MLA models (`key_length_mla` present) cache K only; without flash attention V is stored
  transposed at the widest layer's width; q8_0 is 34 B per 32 values, q4_0 18 B per 32.
- recurrent state (llama-memory-recurrent.cpp): each recurrent layer (Mamba, RWKV, LFM2
  short-conv; the layers without KV heads of hybrids) holds n_embd_r + n_embd_s f32 values per
  sequence, max(1, n_seq_max) sequences, whatever the context size.
- context checkpoints (RAM, not llama.cpp): per slot up to --ctx-checkpoints copies of the part
  of the memory that cannot be rolled back (the sliding-window cells, the recurrent state).
- compute buffer: a closed form calibrated against llama.cpp's own no_alloc dry runs (see
  `compute_buffer_bytes`); the one approximate term, typically within a few MiB.
- overhead: llama.cpp's output (logits) buffer, plus the runtime/driver cost it does not count
  (CUDA context ~400 MiB per GPU; Python, the server and llama.cpp's code ~150 MiB of RAM).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from innkeeper.engine.config import DEFAULT_CTX, FFN_EXPS_REGEX, EngineConfig
from innkeeper.models.hardware import Hardware, detect_hardware, format_size
from innkeeper.models.spec import ByteGroups, ModelSpec

MIB = 1024**2
GIB = 1024**3

# (block size, bytes per block) of the KV cache types llama.cpp accepts.
KV_CACHE_TYPES: dict[str, tuple[int, int]] = {
    "f32": (1, 4),
    "f16": (1, 2),
    "bf16": (1, 2),
    "q8_0": (32, 34),
    "q5_1": (32, 24),
    "q5_0": (32, 22),
    "q4_1": (32, 20),
    "q4_0": (32, 18),
    "iq4_nl": (32, 18),
}

CUDA_CONTEXT_BYTES = 400 * MIB  # CUDA context + cuBLAS workspace, not counted by llama.cpp
RUNTIME_RAM_BYTES = 150 * MIB  # Python, the server and llama.cpp's code
GPU_MARGIN_BYTES = 512 * MIB  # headroom kept free on each GPU (llama.cpp --fit keeps 1 GiB)
RAM_MARGIN_BYTES = 256 * MIB
DEFAULT_CTX_CAP = 8192
MIN_DEFAULT_CTX = 2048

VERDICT_TEXT = {
    "vram": "fits in VRAM",
    "partial": "fits with {n} layers offloaded",
    "ram": "fits in RAM",
    "swap": "would swap",
    "vram_oom": "does not fit in VRAM with {n} layers offloaded",
}


def pad256(n: int) -> int:
    return -(-n // 256) * 256


def kv_row_bytes(cache_type: str, n_values: int) -> int:
    """Bytes of one cache row of `n_values` values in `cache_type` (ggml_row_size)."""
    block, size = KV_CACHE_TYPES[cache_type]
    return -(-n_values // block) * size


def normalize_cache_type(name: str) -> str:
    key = name.strip().lower()
    if key not in KV_CACHE_TYPES:
        raise ValueError(
            f"unknown KV cache type {name!r} (choose from {', '.join(KV_CACHE_TYPES)})"
        )
    return key


FLASH_ATTN_MODES = ("auto", "on", "off")


def flash_attn_enabled(mode: str, architecture: str = "") -> bool:
    """Whether llama.cpp will run with flash attention for `--flash-attn MODE`, for planning.

    llama.cpp (0c1e570, `llama_init_from_model` and `llama_context::resolve_fused_ops`) forces
    it off for Grok, and resolves `auto` by building a graph with flash attention on and
    keeping it unless some layer's attention op lands on another device than the layer
    ("usually due to missing support"). Its CPU backend supports it for every model, and the
    GPU backends for the head sizes of common models, so `auto` plans as on: `fit` and
    `serve` then plan the same memory for the same flags.
    """
    m = mode.strip().lower()
    if m not in FLASH_ATTN_MODES:
        raise ValueError(f"--flash-attn takes on, off or auto, not {mode!r}")
    if architecture.lower() == "grok":
        return False
    return m != "off"


@dataclass(frozen=True)
class MemorySettings:
    """Everything besides the model that changes what llama.cpp allocates."""

    ctx_size: int
    cache_type_k: str = "f16"
    cache_type_v: str | None = None
    flash_attn: bool = True
    parallel: int = 1
    n_batch: int = 512
    n_ubatch: int = 512
    swa_full: bool = False  # what serve allocates (llama-server's default); --swa-full: True
    kv_unified: bool = False
    ctx_checkpoints: int = 32  # per slot, for sliding-window and recurrent models
    # Where llama.cpp puts things on GPUs (serve's --main-gpu, --split-mode, --tensor-split,
    # --no-kv-offload, --cpu-moe, --n-cpu-moe; see EngineConfig for what each means).
    main_gpu: int = 0
    split_mode: str = "layer"
    tensor_split: tuple[float, ...] | None = None
    kv_offload: bool = True
    cpu_moe: bool = False
    n_cpu_moe: int = 0

    def experts_in_ram(self, il: int) -> bool:
        """Whether layer `il`'s MoE expert tensors stay in RAM (--cpu-moe / --n-cpu-moe)."""
        return self.cpu_moe or il < self.n_cpu_moe

    @property
    def type_v(self) -> str:
        return self.cache_type_v or self.cache_type_k

    def validate(self) -> MemorySettings:
        k = normalize_cache_type(self.cache_type_k)
        v = normalize_cache_type(self.type_v)
        if v not in ("f16", "bf16", "f32") and not self.flash_attn:
            raise ValueError(
                f"a quantized V cache ({v}) needs flash attention (llama.cpp refuses it "
                "otherwise): use --flash-attn on or --cache-type f16"
            )
        if self.ctx_size < 1:
            raise ValueError(f"context size must be positive, got {self.ctx_size}")
        if self.parallel < 1:
            raise ValueError(f"parallel must be at least 1, got {self.parallel}")
        if self.n_ubatch < 1 or self.n_batch < 1:
            raise ValueError("batch sizes must be positive")
        if self.split_mode not in ("none", "layer", "row"):
            raise ValueError(f"split mode must be none, layer or row, got {self.split_mode!r}")
        if self.main_gpu < 0 or self.n_cpu_moe < 0:
            raise ValueError("main GPU and --n-cpu-moe must not be negative")
        return replace(self, cache_type_k=k, cache_type_v=v)


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

    @property
    def total(self) -> int:
        return self.k_bytes + self.v_bytes + self.state_bytes


def plan_kv(spec: ModelSpec, s: MemorySettings) -> KVPlan:
    """Exact KV cache bytes for `spec` under settings `s` (llama.cpp's allocation, to the byte)."""
    n_ctx = pad256(s.ctx_size)
    if s.kv_unified:
        n_stream, per_stream = 1, n_ctx
    else:
        per_stream = pad256(n_ctx // s.parallel)
        if per_stream == 0:
            raise ValueError(f"context {s.ctx_size} is too small for {s.parallel} sequences")
        n_ctx = per_stream * s.parallel
        n_stream = s.parallel
    n_batch = min(n_ctx, s.n_batch)
    n_ubatch = min(n_batch, s.n_ubatch)
    has_swa = bool(spec.sliding_window) and any(spec.is_swa(i) for i in range(spec.n_layer))
    swa_cells = None
    if has_swa:
        window = spec.sliding_window or 0
        swa_cells = pad256(min(per_stream, window * (s.parallel if s.kv_unified else 1) + n_ubatch))
        if s.swa_full:
            swa_cells = per_stream
    v_trans = not s.flash_attn
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
        k = kv_row_bytes(s.cache_type_k, hk * kvh) * cells * n_stream
        v = 0
        if not spec.mla:
            width = v_width_max if v_trans else hv * kvh
            v = kv_row_bytes(s.type_v, width) * cells * n_stream
        k_total += k
        v_total += v
        per_layer.append(k + v)
    # Recurrent layers: one row of n_embd_r + n_embd_s f32 per sequence (at least one).
    n_rs = max(1, s.parallel)
    state_row = (spec.n_embd_r + spec.n_embd_s) * 4
    state_total = ckpt = 0
    for il in range(spec.n_layer):
        if spec.is_recurrent(il):
            per_layer[il] += state_row * n_rs
            state_total += state_row * n_rs
            ckpt += state_row
    if swa_cells is not None and not s.swa_full:
        # A slot's checkpoint holds the cells its window still sees: n_swa of them (llama.cpp
        # writes no masked cell; 7.5 MiB per checkpoint measured on Gemma 3 270M).
        seq_cells = min(swa_cells, spec.sliding_window or 0)
        for il in kv_layers:
            if spec.is_swa(il):
                hk, hv = spec.head_dims(il)
                kvh = spec.kv_heads(il)
                row = kv_row_bytes(s.cache_type_k, hk * kvh)
                row += 0 if spec.mla else kv_row_bytes(s.type_v, hv * kvh)
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
    )


def checkpoint_ram_bytes(kv: KVPlan, s: MemorySettings) -> int:
    """RAM the context checkpoints can take: --ctx-checkpoints per slot, every slot."""
    return kv.checkpoint_bytes * s.ctx_checkpoints * s.parallel


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
    u = min(s.n_ubatch, s.n_batch, kv.n_ctx)
    f32 = 4
    n_embd = spec.n_embd
    n_q = max(n_embd, spec.n_head * spec.head_dim_k)
    logits = (spec.n_vocab + 2 * n_embd) * u * f32
    n_ff = spec.n_ff or 4 * n_embd
    ffn = (3 * n_ff + 4 * n_embd) * u * f32
    mask_elem = 2 if s.flash_attn else 4
    n_kv = kv.cells if not s.kv_unified else kv.n_ctx
    masks = n_kv * u * mask_elem
    if kv.swa_cells is not None:
        masks += kv.swa_cells * u * mask_elem
    attn = int(5.5 * n_q * u * f32)
    if not s.flash_attn:
        attn += n_kv * u * spec.n_head * f32
    return max(logits, ffn + masks, attn + masks)


def output_buffer_bytes(spec: ModelSpec, s: MemorySettings) -> int:
    """llama.cpp's logits buffer at context creation: one row of n_vocab floats per sequence."""
    return spec.n_vocab * 4 * s.parallel


# ---- the plan --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DevicePlan:
    """What one device (RAM or a GPU) holds, and whether it has room."""

    name: str
    kind: str  # "ram" | "gpu"
    weights_bytes: int
    kv_cache_bytes: int
    compute_bytes: int
    overhead_bytes: int
    capacity_bytes: int
    margin_bytes: int
    layers: int = 0

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.compute_bytes + self.overhead_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes + self.margin_bytes <= self.capacity_bytes

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "kind": self.kind,
            "layers": self.layers,
            "weights_bytes": self.weights_bytes,
            "kv_cache_bytes": self.kv_cache_bytes,
            "compute_bytes": self.compute_bytes,
            "overhead_bytes": self.overhead_bytes,
            "total_bytes": self.total_bytes,
            "capacity_bytes": self.capacity_bytes,
            "margin_bytes": self.margin_bytes,
            "fits": self.fits,
        }


@dataclass(frozen=True)
class MemoryPlan:
    """What a model needs for one set of settings, split per device, with a verdict."""

    weights_bytes: int
    kv_cache_bytes: int
    compute_bytes: int
    overhead_bytes: int
    output_buffer_bytes: int
    gpu_layers: int
    n_layers: int  # offloadable layers: repeating layers + the output layer
    verdict_code: str
    devices: tuple[DevicePlan, ...]
    settings: MemorySettings
    kv: KVPlan
    exact_weights: bool = True
    notes: tuple[str, ...] = ()

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.compute_bytes + self.overhead_bytes

    @property
    def llama_bytes(self) -> int:
        """What llama.cpp itself allocates: weights + KV + compute + output buffer."""
        return (
            self.weights_bytes + self.kv_cache_bytes + self.compute_bytes + self.output_buffer_bytes
        )

    @property
    def verdict(self) -> str:
        return VERDICT_TEXT[self.verdict_code].format(n=self.gpu_layers)

    @property
    def fits(self) -> bool:
        return self.verdict_code in ("vram", "partial", "ram")

    def to_json(self) -> dict[str, object]:
        s = self.settings
        return {
            "weights_bytes": self.weights_bytes,
            "kv_cache_bytes": self.kv_cache_bytes,
            "compute_bytes": self.compute_bytes,
            "overhead_bytes": self.overhead_bytes,
            "total_bytes": self.total_bytes,
            "gpu_layers": self.gpu_layers,
            "n_layers": self.n_layers,
            "verdict": self.verdict,
            "verdict_code": self.verdict_code,
            "fits": self.fits,
            "output_buffer_bytes": self.output_buffer_bytes,
            "kv_cells": self.kv.cells,
            "kv_swa_cells": self.kv.swa_cells,
            "kv_streams": self.kv.n_stream,
            "k_bytes": self.kv.k_bytes,
            "v_bytes": self.kv.v_bytes,
            "recurrent_state_bytes": self.kv.state_bytes,
            "checkpoint_bytes": self.kv.checkpoint_bytes,
            "checkpoints_ram_bytes": checkpoint_ram_bytes(self.kv, s),
            "exact_weights": self.exact_weights,
            "settings": {
                "ctx_size": s.ctx_size,
                "cache_type_k": s.cache_type_k,
                "cache_type_v": s.type_v,
                "flash_attn": s.flash_attn,
                "parallel": s.parallel,
                "n_batch": s.n_batch,
                "n_ubatch": s.n_ubatch,
                "swa_full": s.swa_full,
                "kv_unified": s.kv_unified,
            },
            "devices": [d.to_json() for d in self.devices],
            "notes": list(self.notes),
        }

    def summary(self) -> str:
        return (
            f"{self.verdict}: {format_size(self.total_bytes)} total "
            f"(weights {format_size(self.weights_bytes)}, KV {format_size(self.kv_cache_bytes)}, "
            f"compute {format_size(self.compute_bytes)}, overhead {format_size(self.overhead_bytes)})"
        )


_EXPS_RE = re.compile(FFN_EXPS_REGEX)
_BLK_RE = re.compile(r"(?:^|\.)blk\.(\d+)\.")


def expert_bytes(spec: ModelSpec, groups: ByteGroups) -> tuple[int, ...]:
    """Bytes of MoE expert tensors per layer (what --cpu-moe keeps in RAM), in `groups`' scale.

    The tensors are picked with llama.cpp's own --cpu-moe pattern; `groups` may be another
    quantization of the model (scaled), so each layer's expert share of its bytes is applied.
    """
    raw = [0] * spec.n_layer
    whole = [0] * spec.n_layer
    for t in spec.tensors:
        m = _BLK_RE.search(t.name)
        if not m or int(m.group(1)) >= spec.n_layer:
            continue
        il = int(m.group(1))
        whole[il] += t.n_bytes
        if _EXPS_RE.search(t.name):
            raw[il] += t.n_bytes
    return tuple(
        int(groups.layers[il] * raw[il] / whole[il]) if whole[il] else 0
        for il in range(spec.n_layer)
    )


def _gpu_of_layers(n_offloaded: int, splits: list[float]) -> list[int]:
    """Which GPU each offloaded layer goes to (output layer last), as llama.cpp assigns them.

    llama-model.cpp: cumulative, normalised split points, and layer j of the `n_offloaded`
    goes to the first device whose point is above j / n_offloaded (std::upper_bound).
    """
    total = sum(splits)
    points: list[float] = []
    acc = 0.0
    for x in splits:
        acc += x
        points.append(acc / total)
    out = []
    for j in range(n_offloaded):
        p = j / n_offloaded
        out.append(next((g for g, point in enumerate(points) if point > p), len(points) - 1))
    return out


def gpu_splits(s: MemorySettings, hw: Hardware) -> list[tuple[int, float]]:
    """The GPUs llama.cpp uses (index into hw.gpus) and each one's share before normalising.

    --split-mode none uses --main-gpu alone; otherwise every GPU, in proportion to
    --tensor-split when given (missing entries are 0) or to free memory, as llama.cpp does.
    """
    if s.split_mode == "none":
        if s.main_gpu >= len(hw.gpus):
            raise ValueError(f"--main-gpu {s.main_gpu}: this machine has {len(hw.gpus)} GPU(s)")
        return [(s.main_gpu, 1.0)]
    if s.tensor_split is not None:
        shares = [*s.tensor_split, *([0.0] * len(hw.gpus))][: len(hw.gpus)]
        if sum(shares) <= 0:
            raise ValueError("--tensor-split gives no share to any GPU on this machine")
        return list(enumerate(shares))
    return [(i, float(g.free_bytes)) for i, g in enumerate(hw.gpus)]


def _place(
    spec: ModelSpec,
    groups: ByteGroups,
    s: MemorySettings,
    kv: KVPlan,
    compute: int,
    output_buf: int,
    hw: Hardware,
    ngl: int,
) -> tuple[DevicePlan, ...]:
    """Per-device bytes when `ngl` layers (output layer first) are offloaded.

    Follows llama.cpp's placement: layers from `n_layer + 1 - ngl` up, then the output layer,
    are split over the GPUs (`gpu_splits`); the KV cache of a GPU layer sits with it unless
    --no-kv-offload; MoE experts of the layers in --cpu-moe/--n-cpu-moe stay in RAM.
    """
    n_layer = spec.n_layer
    gpus = list(hw.gpus)
    ngl = max(0, min(ngl, n_layer + 1)) if gpus else 0
    i_gpu_start = max(n_layer + 1 - ngl, 0)
    experts = expert_bytes(spec, groups) if (s.cpu_moe or s.n_cpu_moe) else (0,) * n_layer
    kept = [experts[il] if s.experts_in_ram(il) else 0 for il in range(n_layer)]
    cpu_weights = groups.input + groups.other
    cpu_kv = 0
    for il in range(n_layer):
        if il < i_gpu_start:
            cpu_weights += groups.layers[il]
            cpu_kv += kv.layer_bytes[il]
        else:
            cpu_weights += kept[il]
            cpu_kv += 0 if s.kv_offload else kv.layer_bytes[il]
    if ngl < 1:
        cpu_weights += groups.output
    devices: list[DevicePlan] = []
    if gpus and ngl > 0:
        used = gpu_splits(s, hw)
        order = [*range(i_gpu_start, n_layer), n_layer]  # the output layer is placed last
        where = _gpu_of_layers(len(order), [share for _, share in used])
        output_gpu = used[where[-1]][0]
        for gi, g in enumerate(gpus):
            mine = [il for il, w in zip(order, where, strict=True) if used[w][0] == gi]
            w = sum(groups.layers[il] - kept[il] for il in mine if il < n_layer)
            k = sum(kv.layer_bytes[il] for il in mine if il < n_layer) if s.kv_offload else 0
            if gi == output_gpu:
                w += groups.output + (groups.input if spec.tied_embeddings else 0)
            on = bool(mine)
            devices.append(
                DevicePlan(
                    name=f"GPU {g.index}: {g.name}",
                    kind="gpu",
                    weights_bytes=w,
                    kv_cache_bytes=k,
                    compute_bytes=compute if gi == output_gpu else 0,
                    overhead_bytes=CUDA_CONTEXT_BYTES if on else 0,
                    capacity_bytes=g.free_bytes,
                    margin_bytes=GPU_MARGIN_BYTES if on else 0,
                    layers=len(mine),
                )
            )
    # Fully offloaded: the host keeps a small staging compute buffer; otherwise (CPU layers,
    # experts or attention over a host KV cache) the host runs part of the same graph.
    full = bool(devices) and i_gpu_start == 0 and not any(kept) and s.kv_offload
    host_compute = (spec.n_embd * 4 * min(s.n_ubatch, s.n_batch) * 2) if full else compute
    ram = DevicePlan(
        name="RAM",
        kind="ram",
        weights_bytes=cpu_weights,
        kv_cache_bytes=cpu_kv,
        compute_bytes=host_compute,
        overhead_bytes=output_buf + RUNTIME_RAM_BYTES,
        capacity_bytes=hw.ram_available_bytes,
        margin_bytes=RAM_MARGIN_BYTES,
        layers=min(i_gpu_start, n_layer),
    )
    return (ram, *devices)


def _verdict(devices: tuple[DevicePlan, ...], ngl: int, n_layers: int) -> str:
    ram, gpus = devices[0], devices[1:]
    if gpus and ngl > 0:
        if not all(g.fits for g in gpus):
            return "vram_oom"
        if not ram.fits:
            return "swap"
        return "vram" if ngl >= n_layers else "partial"
    return "ram" if ram.fits else "swap"


def best_gpu_layers(
    spec: ModelSpec,
    groups: ByteGroups,
    s: MemorySettings,
    kv: KVPlan,
    compute: int,
    output_buf: int,
    hw: Hardware,
) -> int:
    """The most layers (output first) whose GPU share fits: like `--fit`, but from the plan."""
    if not hw.gpus:
        return 0
    n_layers = spec.n_layer + 1
    lo, hi = 0, n_layers  # GPU usage grows with ngl: binary search the largest that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        devs = _place(spec, groups, s, kv, compute, output_buf, hw, mid)
        if all(d.fits for d in devs[1:]):
            lo = mid
        else:
            hi = mid - 1
    return lo


def plan_memory(
    spec: ModelSpec,
    settings: MemorySettings,
    hardware: Hardware | None = None,
    gpu_layers: int | None = None,
    weights_bytes: int | None = None,
) -> MemoryPlan:
    """The memory plan for `spec` under `settings` on `hardware` (detected when None).

    `gpu_layers=None` picks the most layers that fit; `weights_bytes` replaces the tensor-table
    total (another quantization of the same model, known only by its file size).
    """
    s = settings.validate()
    hw = hardware or detect_hardware()
    groups = spec.byte_groups()
    exact = weights_bytes is None and bool(spec.tensors)
    if weights_bytes is not None:
        groups = groups.scaled(weights_bytes)
    kv = plan_kv(spec, s)
    compute = compute_buffer_bytes(spec, s, kv)
    out_buf = output_buffer_bytes(spec, s)
    n_layers = spec.n_layer + 1
    if gpu_layers is None or gpu_layers < 0:
        ngl = best_gpu_layers(spec, groups, s, kv, compute, out_buf, hw)
    else:
        ngl = min(gpu_layers, n_layers) if hw.gpus else 0
    devices = _place(spec, groups, s, kv, compute, out_buf, hw, ngl)
    notes: list[str] = []
    if not hw.gpus:
        notes.append("no GPU detected: everything runs from RAM")
    if spec.sliding_window and not s.swa_full:
        notes.append(f"sliding-window layers keep {kv.swa_cells} cells (swa_full off)")
    if spec.mla:
        notes.append("MLA model: the KV cache holds the compressed latent K only")
    if kv.state_bytes:
        notes.append(f"recurrent state {format_size(kv.state_bytes)} (in the KV figure)")
    elif any(spec.kv_heads(i) == 0 for i in range(spec.n_layer)):
        notes.append("layers without KV heads and no known recurrent state: none counted")
    if kv.checkpoint_bytes and s.ctx_checkpoints:
        notes.append(
            f"context checkpoints: up to {s.ctx_checkpoints} x {format_size(kv.checkpoint_bytes)}"
            f" per slot = {format_size(checkpoint_ram_bytes(kv, s))} of RAM (within --cache-ram)"
        )
    if not exact:
        notes.append("weights estimated from the file size (no tensor table)")
    if ngl and hw.gpus and (s.cpu_moe or s.n_cpu_moe):
        kept = sum(b for il, b in enumerate(expert_bytes(spec, groups)) if s.experts_in_ram(il))
        notes.append(f"MoE experts kept in RAM: {format_size(kept)}")
    if ngl and hw.gpus and not s.kv_offload:
        notes.append("KV cache kept in RAM (--no-kv-offload)")
    if ngl and len(hw.gpus) > 1 and s.split_mode == "row":
        notes.append("row split planned as a layer split: per-GPU shares are approximate")
    if s.ctx_size > spec.context_length > 0:
        notes.append(f"context {s.ctx_size} is beyond the trained {spec.context_length}")
    gpu_side = sum(d.total_bytes for d in devices[1:])
    ram = devices[0]
    return MemoryPlan(
        weights_bytes=groups.total + (groups.input if spec.tied_embeddings and ngl >= 1 else 0),
        kv_cache_bytes=kv.total,
        compute_bytes=sum(d.compute_bytes for d in devices) if ngl and hw.gpus else compute,
        overhead_bytes=ram.overhead_bytes + sum(d.overhead_bytes for d in devices[1:]),
        output_buffer_bytes=out_buf,
        gpu_layers=ngl,
        n_layers=n_layers,
        verdict_code=_verdict(devices, ngl, n_layers),
        devices=devices,
        settings=s,
        kv=kv,
        exact_weights=exact,
        notes=tuple(notes) + ((f"GPU share {format_size(gpu_side)}",) if gpu_side else ()),
    )


def plan_for_files(
    spec: ModelSpec | None,
    file_bytes: int,
    settings: MemorySettings,
    hardware: Hardware | None,
    gpu_layers: int | None = None,
) -> MemoryPlan:
    """A plan for a model file known by its size, for choosing the largest quant that fits.

    `spec` is any quantization of the same model (architecture numbers do not change between
    quantizations); the weights are the file size spread in that spec's proportions. Without a
    spec the KV cache and compute cannot be known, so a conservative stand-in is used: a
    Llama-like shape sized from the file (about 1 GiB of KV per 8 GB of fp16-equivalent model at
    8k context), and the plan says so in its notes.
    """
    if spec is None:
        spec = _shape_from_size(file_bytes)
    header = int(spec.extra.get("header_bytes") or 0) if spec.extra else 0
    weights = max(file_bytes - header, 0)
    return plan_memory(spec, settings, hardware, gpu_layers=gpu_layers, weights_bytes=weights)


def _shape_from_size(file_bytes: int) -> ModelSpec:
    """A Llama-like ModelSpec whose size matches `file_bytes` at ~4.8 bits per weight."""
    params = max(file_bytes * 8 / 4.8, 1e8)
    # Llama-family proportions: params ≈ 12·n_layer·n_embd², n_layer ≈ n_embd / 128.
    n_embd = round((params * 128 / 12) ** (1 / 3) / 128) * 128 or 128
    n_layer = max(int(n_embd / 128), 1)
    return ModelSpec(
        format="unknown",
        architecture="unknown",
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=max(n_embd // 128, 1),
        n_head_kv=max(n_embd // 512, 1),
        head_dim_k=128,
        head_dim_v=128,
        n_vocab=128256,
        context_length=0,
        n_ff=int(n_embd * 3.5),
        weight_bytes=file_bytes,
        file_bytes=file_bytes,
    )


# ---- what the server calls -------------------------------------------------------------------


def memory_settings(cfg: EngineConfig) -> MemorySettings:
    """The memory plan's view of the engine settings: the one place they are mapped.

    `serve` plans with it, and so does the hub's choice of a file (with EngineConfig's
    defaults), so `pull`, `inspect` and `fit` pick what `serve` would run.
    """
    return MemorySettings(
        ctx_size=cfg.ctx_size or DEFAULT_CTX,
        cache_type_k=cfg.cache_type_k,
        cache_type_v=cfg.cache_type_v,
        flash_attn=flash_attn_enabled(cfg.flash_attn),
        parallel=cfg.parallel,
        n_batch=cfg.batch_size,
        n_ubatch=cfg.ubatch_size,
        kv_unified=True,  # the engine shares one cache among its slots
        swa_full=cfg.swa_full,
        ctx_checkpoints=cfg.ctx_checkpoints,
        main_gpu=cfg.main_gpu,
        split_mode=cfg.split_mode,
        tensor_split=cfg.tensor_split,
        kv_offload=cfg.kv_offload,
        cpu_moe=cfg.cpu_moe,
        n_cpu_moe=cfg.n_cpu_moe,
    )


@dataclass(frozen=True)
class AutoSettings:
    """The context size and GPU layers the server should use, with the plan behind them."""

    ctx_size: int
    gpu_layers: int
    plan: MemoryPlan
    reasons: tuple[str, ...] = field(default=())


def default_ctx_candidates(trained: int, cap: int = DEFAULT_CTX_CAP) -> list[int]:
    """Context sizes to try, largest first: ≤ trained and ≤ cap, never below 2048 unless the
    model's trained context is smaller."""
    top = min(trained, cap) if trained > 0 else cap
    floor = min(MIN_DEFAULT_CTX, top)
    sizes = {top, floor}
    c = 1 << max(top.bit_length() - 1, 0)
    while c > floor:
        sizes.add(c)
        sizes.add(c * 3 // 4) if c * 3 // 4 > floor else None
        c //= 2
    return sorted((x for x in sizes if floor <= x <= top), reverse=True)


def auto_settings(
    model_path: Path,
    settings: MemorySettings,
    ctx_size: int | None,
    gpu_layers: int | None,
    hardware: Hardware | None = None,
    *,
    spec: ModelSpec | None = None,
) -> AutoSettings:
    """Pick the context size (when None) and GPU layers (when None) for serving `model_path`.

    `settings` carries every other setting that changes memory (its ctx_size is replaced).
    Context: the largest candidate ≤ the trained context and ≤ 8192 that fits in VRAM, else the
    largest that fits at all (partly offloaded or in RAM), else the floor (2048, or the trained
    context if smaller) with a "would swap" plan the server can warn about.
    """
    from innkeeper.models.gguf_meta import read_gguf_spec

    spec = spec or read_gguf_spec(model_path)
    hw = hardware or detect_hardware()

    def make(ctx: int) -> MemoryPlan:
        return plan_memory(spec, replace(settings, ctx_size=ctx), hw, gpu_layers=gpu_layers)

    if ctx_size is not None:
        plan = make(ctx_size)
        return AutoSettings(ctx_size, plan.gpu_layers, plan, ("context size given",))
    candidates = default_ctx_candidates(spec.context_length)
    plans = [(c, make(c)) for c in candidates]
    for wanted, why in (
        (("vram",), "largest context that fits in VRAM"),
        (("vram", "partial", "ram"), "largest context that fits"),
    ):
        if hw.gpus or "ram" in wanted:
            for c, p in plans:
                if p.verdict_code in wanted:
                    return AutoSettings(c, p.gpu_layers, p, (why,))
    c, p = plans[-1]
    return AutoSettings(c, p.gpu_layers, p, ("nothing fits: smallest default context",))
