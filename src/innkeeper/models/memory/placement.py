"""Where llama.cpp puts each part of a model: RAM and each GPU, for a number of offloaded layers.

Weights come from the tensor table: the input embedding stays in RAM, the output layer is the
first layer offloaded (`i_gpu_start = n_layer + 1 - n_gpu_layers`), a tied output gets its own
GPU copy; layers are split over GPUs as llama-model.cpp splits them (`gpu_splits`); the KV cache
of a GPU layer sits with it unless --no-kv-offload; MoE experts of the layers in
--cpu-moe/--n-cpu-moe stay in RAM.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from innkeeper.models.hardware import Hardware
from innkeeper.models.memory.buffers import (
    CUDA_CONTEXT_BYTES,
    RUNTIME_RAM_BYTES,
    compute_buffer_bytes,
    pipeline_copies,
)
from innkeeper.models.memory.kv import KVPlan
from innkeeper.models.memory.settings import MemorySettings
from innkeeper.models.projector import projector_cost
from innkeeper.models.spec import ByteGroups, ModelSpec
from innkeeper.settings import ConfigError
from innkeeper.settings.engine import FFN_EXPS_REGEX

MIB = 1024**2
GPU_MARGIN_BYTES = 512 * MIB  # headroom kept free on each GPU (llama.cpp --fit keeps 1 GiB)
RAM_MARGIN_BYTES = 256 * MIB

_EXPS_RE = re.compile(FFN_EXPS_REGEX)
_BLK_RE = re.compile(r"(?:^|\.)blk\.(\d+)\.")


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
    endpoint: str = ""  # the RPC worker lending this device (HOST:PORT), if it is one

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
            "endpoint": self.endpoint or None,
        }


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
    e = s.engine
    if e.split_mode == "none":
        if e.main_gpu >= len(hw.gpus):
            raise ConfigError(f"--main-gpu {e.main_gpu}: this machine has {len(hw.gpus)} GPU(s)")
        return [(e.main_gpu, 1.0)]
    if e.tensor_split is not None:
        shares = [*e.tensor_split, *([0.0] * len(hw.gpus))][: len(hw.gpus)]
        if sum(shares) <= 0:
            raise ConfigError("--tensor-split gives no share to any GPU on this machine")
        return list(enumerate(shares))
    if not any(g.free_bytes > 0 for g in hw.gpus):
        raise ConfigError("no GPU has free memory to split the model over")
    return [(i, float(g.free_bytes)) for i, g in enumerate(hw.gpus)]


def place(
    spec: ModelSpec,
    groups: ByteGroups,
    s: MemorySettings,
    kv: KVPlan,
    compute: int,
    output_buf: int,
    hw: Hardware,
    ngl: int,
) -> tuple[DevicePlan, ...]:
    """Per-device bytes when `ngl` layers (output layer first) are offloaded: RAM, then GPUs.

    A vision projector (`--mmproj`, or the one paired beside the model) is loaded whole by
    libmtmd on the first GPU when layers are offloaded (innkeeper's engine asks for the GPU
    then), else in RAM: its weights and one image's compute buffer go there."""
    e = s.engine
    proj = projector_cost(e.mmproj)
    proj_weights, proj_compute = (proj.tensor_bytes, proj.compute_bytes) if proj else (0, 0)
    n_layer = spec.n_layer
    gpus = list(hw.gpus)
    ngl = max(0, min(ngl, n_layer + 1)) if gpus else 0
    i_gpu_start = max(n_layer + 1 - ngl, 0)
    experts = expert_bytes(spec, groups) if (e.cpu_moe or e.n_cpu_moe) else (0,) * n_layer
    kept = [experts[il] if e.experts_in_ram(il) else 0 for il in range(n_layer)]
    cpu_weights = groups.input + groups.other
    cpu_kv = 0
    for il in range(n_layer):
        if il < i_gpu_start:
            cpu_weights += groups.layers[il]
            cpu_kv += kv.layer_bytes[il]
        else:
            cpu_weights += kept[il]
            cpu_kv += 0 if e.kv_offload else kv.layer_bytes[il]
    if ngl < 1:
        cpu_weights += groups.output
    devices: list[DevicePlan] = []
    if gpus and ngl > 0:
        used = gpu_splits(s, hw)
        order = [*range(i_gpu_start, n_layer), n_layer]  # the output layer is placed last
        where = _gpu_of_layers(len(order), [share for _, share in used])
        output_gpu = used[where[-1]][0]
        # Across RPC workers each device's own buffer is planned (measured on CPU workers); a
        # local multi-GPU split keeps the calibrated one buffer on the output layer's GPU.
        per_device = any(g.endpoint for g in gpus)
        copies = pipeline_copies(s, len(gpus), ngl, n_layer) if per_device else 1
        for gi, g in enumerate(gpus):
            mine = [il for il, w in zip(order, where, strict=True) if used[w][0] == gi]
            w = sum(groups.layers[il] - kept[il] for il in mine if il < n_layer)
            k = sum(kv.layer_bytes[il] for il in mine if il < n_layer) if e.kv_offload else 0
            if gi == output_gpu:
                w += groups.output + (groups.input if spec.tied_embeddings else 0)
            on = bool(mine)
            if gi == 0:
                w += proj_weights
            # each device holding layers runs its part of the graph in its own buffer
            c = 0
            if gi == output_gpu and copies == 1:
                c = compute
            elif on and per_device:
                c = compute_buffer_bytes(spec, s, kv, output=gi == output_gpu, copies=copies)
            devices.append(
                DevicePlan(
                    name=f"GPU {g.index}: {g.name}",
                    kind="gpu",
                    weights_bytes=w,
                    kv_cache_bytes=k,
                    compute_bytes=c + (proj_compute if gi == 0 else 0),
                    # a worker's free memory is counted after its own runtime (CUDA) started
                    overhead_bytes=CUDA_CONTEXT_BYTES if on and not g.endpoint else 0,
                    capacity_bytes=g.free_bytes,
                    margin_bytes=GPU_MARGIN_BYTES if on else 0,
                    layers=len(mine),
                    endpoint=g.endpoint,
                )
            )
    # Fully offloaded: the host keeps a small staging compute buffer; otherwise (CPU layers,
    # experts or attention over a host KV cache) the host runs part of the same graph.
    full = bool(devices) and i_gpu_start == 0 and not any(kept) and e.kv_offload
    if not devices:
        cpu_weights += proj_weights
        compute += proj_compute
    staging = spec.n_embd * 4 * min(e.ubatch_size, e.batch_size) * 2
    ram = DevicePlan(
        name="RAM",
        kind="ram",
        weights_bytes=cpu_weights,
        kv_cache_bytes=cpu_kv,
        compute_bytes=staging if full else compute,
        overhead_bytes=output_buf + RUNTIME_RAM_BYTES,
        capacity_bytes=hw.ram_available_bytes,
        margin_bytes=RAM_MARGIN_BYTES,
        layers=min(i_gpu_start, n_layer),
    )
    return (ram, *devices)


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
    lo, hi = 0, spec.n_layer + 1  # GPU usage grows with ngl: binary search the largest that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        devs = place(spec, groups, s, kv, compute, output_buf, hw, mid)
        if all(d.fits for d in devs[1:]):
            lo = mid
        else:
            hi = mid - 1
    return lo
