"""ModelSpec + settings + hardware -> MemoryPlan: what a model needs, where, and whether it fits.

The parts follow llama.cpp (the build in llama-cpp-python 0.3.36) line by line: the KV cache and
recurrent state (kv.py), the compute and output buffers (buffers.py) and where each goes
(placement.py). This module adds them up per device, gives the verdict, and picks the context
size and GPU layers `serve` runs with (`auto_settings`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from innkeeper.models.hardware import Hardware, detect_hardware, format_size
from innkeeper.models.memory.buffers import compute_buffer_bytes, output_buffer_bytes
from innkeeper.models.memory.kv import KVPlan, checkpoint_ram_bytes, plan_kv
from innkeeper.models.memory.placement import DevicePlan, best_gpu_layers, expert_bytes, place
from innkeeper.models.memory.settings import MemorySettings
from innkeeper.models.projector import projector_cost
from innkeeper.models.spec import ByteGroups, ModelSpec
from innkeeper.settings.engine import EngineConfig

DEFAULT_CTX_CAP = 8192
MIN_DEFAULT_CTX = 2048


class Verdict(Enum):
    """Whether and where the model fits; `text` is what the CLI and the page show."""

    VRAM = "vram"
    PARTIAL = "partial"
    RAM = "ram"
    SWAP = "swap"
    VRAM_OOM = "vram_oom"

    @property
    def fits(self) -> bool:
        return self in (Verdict.VRAM, Verdict.PARTIAL, Verdict.RAM)

    def text(self, gpu_layers: int) -> str:
        return _VERDICT_TEXT[self].format(n=gpu_layers)


_VERDICT_TEXT = {
    Verdict.VRAM: "fits in VRAM",
    Verdict.PARTIAL: "fits with {n} layers offloaded",
    Verdict.RAM: "fits in RAM",
    Verdict.SWAP: "would swap",
    Verdict.VRAM_OOM: "does not fit in VRAM with {n} layers offloaded",
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
    verdict: Verdict
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
    def runtime_bytes(self) -> int:
        """The overhead llama.cpp does not allocate: Python, the server, CUDA contexts."""
        return self.overhead_bytes - self.output_buffer_bytes

    @property
    def verdict_text(self) -> str:
        return self.verdict.text(self.gpu_layers)

    @property
    def fits(self) -> bool:
        return self.verdict.fits

    def to_json(self) -> dict[str, object]:
        e = self.settings.engine
        return {
            "weights_bytes": self.weights_bytes,
            "kv_cache_bytes": self.kv_cache_bytes,
            "compute_bytes": self.compute_bytes,
            "overhead_bytes": self.overhead_bytes,
            "total_bytes": self.total_bytes,
            "gpu_layers": self.gpu_layers,
            "n_layers": self.n_layers,
            "verdict": self.verdict_text,
            "verdict_code": self.verdict.value,
            "fits": self.fits,
            "output_buffer_bytes": self.output_buffer_bytes,
            "runtime_overhead_bytes": self.runtime_bytes,
            "kv_cells": self.kv.cells,
            "kv_swa_cells": self.kv.swa_cells,
            "kv_streams": self.kv.n_stream,
            "k_bytes": self.kv.k_bytes,
            "v_bytes": self.kv.v_bytes,
            "recurrent_state_bytes": self.kv.state_bytes,
            "checkpoint_bytes": self.kv.checkpoint_bytes,
            "checkpoints_ram_bytes": checkpoint_ram_bytes(self.kv, self.settings),
            "exact_weights": self.exact_weights,
            "settings": {
                "ctx_size": self.settings.ctx_size,
                "cache_type_k": e.cache_type_k,
                "cache_type_v": e.cache_type_v,
                "flash_attn": self.kv.flash_attn,
                "parallel": e.parallel,
                "n_batch": e.batch_size,
                "n_ubatch": e.ubatch_size,
                "swa_full": e.swa_full,
                "kv_unified": self.settings.kv_unified,
            },
            "devices": [d.to_json() for d in self.devices],
            "notes": list(self.notes),
        }

    def summary(self) -> str:
        return (
            f"{self.verdict_text}: {format_size(self.total_bytes)} total "
            f"(weights {format_size(self.weights_bytes)}, KV {format_size(self.kv_cache_bytes)}, "
            f"compute {format_size(self.compute_bytes)}, overhead {format_size(self.overhead_bytes)})"
        )


def _verdict(devices: tuple[DevicePlan, ...], ngl: int, n_layers: int) -> Verdict:
    ram, gpus = devices[0], devices[1:]
    if gpus and ngl > 0:
        if not all(g.fits for g in gpus):
            return Verdict.VRAM_OOM
        if not ram.fits:
            return Verdict.SWAP
        return Verdict.VRAM if ngl >= n_layers else Verdict.PARTIAL
    return Verdict.RAM if ram.fits else Verdict.SWAP


def plan_memory(
    spec: ModelSpec,
    settings: MemorySettings,
    hardware: Hardware | None = None,
    gpu_layers: int | None = None,
    weights_bytes: int | None = None,
) -> MemoryPlan:
    """The memory plan for `spec` under `settings` on `hardware` (detected when None).

    `gpu_layers` replaces the settings' own; None (both) picks the most layers that fit.
    `weights_bytes` replaces the tensor-table total (another quantization of the same model,
    known only by its file size). Settings llama.cpp would refuse raise ConfigError.
    """
    s = settings
    e = s.engine.validate()
    hw = hardware or detect_hardware()
    groups = spec.byte_groups()
    exact = weights_bytes is None and bool(spec.tensors)
    if weights_bytes is not None:
        groups = groups.scaled(weights_bytes)
    kv = plan_kv(spec, s)
    compute = compute_buffer_bytes(spec, s, kv)
    out_buf = output_buffer_bytes(spec, s)
    n_layers = spec.n_layer + 1
    wanted = gpu_layers if gpu_layers is not None else e.gpu_layers
    if wanted is None or wanted < 0:
        ngl = best_gpu_layers(spec, groups, s, kv, compute, out_buf, hw)
    else:
        ngl = min(wanted, n_layers) if hw.gpus else 0
    devices = place(spec, groups, s, kv, compute, out_buf, hw, ngl)
    notes = _notes(spec, s, kv, hw, ngl, groups, exact)
    gpu_side = sum(d.total_bytes for d in devices[1:])
    if gpu_side:
        notes.append(f"GPU share {format_size(gpu_side)}")
    ram = devices[0]
    proj = projector_cost(e.mmproj)
    if proj:
        notes.append(
            f"vision projector {proj.path.name}: {format_size(proj.tensor_bytes)} weights + "
            f"{format_size(proj.compute_bytes)} to encode an image, in "
            + ("VRAM" if ngl and hw.gpus else "RAM")
        )
    return MemoryPlan(
        weights_bytes=groups.total
        + (groups.input if spec.tied_embeddings and ngl >= 1 else 0)
        + (proj.tensor_bytes if proj else 0),
        kv_cache_bytes=kv.total,
        compute_bytes=sum(d.compute_bytes for d in devices)
        if ngl and hw.gpus
        else ram.compute_bytes,
        overhead_bytes=ram.overhead_bytes + sum(d.overhead_bytes for d in devices[1:]),
        output_buffer_bytes=out_buf,
        gpu_layers=ngl,
        n_layers=n_layers,
        verdict=_verdict(devices, ngl, n_layers),
        devices=devices,
        settings=s,
        kv=kv,
        exact_weights=exact,
        notes=tuple(notes),
    )


def _notes(
    spec: ModelSpec,
    s: MemorySettings,
    kv: KVPlan,
    hw: Hardware,
    ngl: int,
    groups: ByteGroups,
    exact: bool,
) -> list[str]:
    """What the numbers alone do not say about this plan, one short line each."""
    e = s.engine
    notes: list[str] = []
    if not hw.gpus:
        notes.append("no GPU detected: everything runs from RAM")
    if spec.sliding_window and not e.swa_full:
        notes.append(f"sliding-window layers keep {kv.swa_cells} cells (swa_full off)")
    if spec.mla:
        notes.append("MLA model: the KV cache holds the compressed latent K only")
    if kv.state_bytes:
        notes.append(f"recurrent state {format_size(kv.state_bytes)} (in the KV figure)")
    elif any(spec.kv_heads(i) == 0 for i in range(spec.n_layer)):
        notes.append("layers without KV heads and no known recurrent state: none counted")
    if kv.checkpoint_bytes and e.ctx_checkpoints:
        notes.append(
            f"context checkpoints: up to {e.ctx_checkpoints} x {format_size(kv.checkpoint_bytes)}"
            f" per slot = {format_size(checkpoint_ram_bytes(kv, s))} of RAM (within --cache-ram)"
        )
    if not exact:
        notes.append("weights estimated from the file size (no tensor table)")
    if ngl and hw.gpus and (e.cpu_moe or e.n_cpu_moe):
        experts = expert_bytes(spec, groups)
        kept = sum(b for il, b in enumerate(experts) if e.experts_in_ram(il))
        notes.append(f"MoE experts kept in RAM: {format_size(kept)}")
    if ngl and hw.gpus and not e.kv_offload:
        notes.append("KV cache kept in RAM (--no-kv-offload)")
    if ngl and len(hw.gpus) > 1 and e.split_mode == "row":
        notes.append("row split planned as a layer split: per-GPU shares are approximate")
    if s.ctx_size > spec.context_length > 0:
        notes.append(f"context {s.ctx_size} is beyond the trained {spec.context_length}")
    return notes


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


# ---- what serve and fit run with ---------------------------------------------------------------


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
    cfg: EngineConfig,
    hardware: Hardware | None = None,
    *,
    spec: ModelSpec | None = None,
) -> AutoSettings:
    """The context size (unless `cfg` gives one) and GPU layers (likewise) `serve` runs with.

    Context: the largest candidate ≤ the trained context and ≤ 8192 that fits in VRAM, else the
    largest that fits at all (partly offloaded or in RAM), else the floor (2048, or the trained
    context if smaller) with a "would swap" plan the server can warn about. `spec` spares
    reading `cfg.model_path` again when the caller has it.
    """
    from innkeeper.models.gguf_meta import read_gguf_spec

    spec = spec or read_gguf_spec(Path(cfg.model_path))
    hw = hardware or detect_hardware()

    def make(ctx: int) -> MemoryPlan:
        return plan_memory(spec, MemorySettings(cfg, ctx), hw)

    if cfg.ctx_size is not None:
        plan = make(cfg.ctx_size)
        return AutoSettings(cfg.ctx_size, plan.gpu_layers, plan, ("context size given",))
    plans = [(c, make(c)) for c in default_ctx_candidates(spec.context_length)]
    for wanted, why in (
        ((Verdict.VRAM,), "largest context that fits in VRAM"),
        ((Verdict.VRAM, Verdict.PARTIAL, Verdict.RAM), "largest context that fits"),
    ):
        for c, p in plans:
            if p.verdict in wanted:
                return AutoSettings(c, p.gpu_layers, p, (why,))
    c, p = plans[-1]
    return AutoSettings(c, p.gpu_layers, p, ("nothing fits: smallest default context",))
