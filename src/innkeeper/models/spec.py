"""ModelSpec: what a model *is* — the numbers memory planning and `inspect` need, from any format.

Every reader (GGUF header, config.json + safetensors headers) produces this one value type, so
the memory calculator and the CLI never care where the numbers came from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

# Tensor names that carry a layer index: GGUF `blk.N.` and HF `model.layers.N.` / `h.N.` styles.
_LAYER_RE = re.compile(r"(?:^|\.)(?:blk|layers|h|block|blocks)\.(\d+)\.")
_INPUT_NAMES = ("token_embd.", "embed_tokens.", "wte.", "word_embeddings.", "tok_embeddings.")
_OUTPUT_NAMES = ("output.", "output_norm.", "lm_head.", "model.norm.", "norm.", "ln_f.")


def format_params(n: int | None) -> str:
    """A parameter count as people write it (`134.52M`, `8.03B`): `inspect` and the serve
    banner both print it, so the two always agree."""
    if not n:
        return "?"
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


class ModelFormatError(ValueError):
    """A model file or repository whose contents are malformed, hostile or not understood."""


@dataclass(frozen=True)
class TensorInfo:
    """One weight tensor: its name, storage type, shape and exact byte size."""

    name: str
    type_name: str
    shape: tuple[int, ...]
    n_elements: int
    n_bytes: int


@dataclass(frozen=True)
class RopeScaling:
    """How the model stretches its positions beyond the trained window."""

    kind: str
    factor: float | None = None
    original_context: int | None = None


@dataclass(frozen=True)
class ModelSpec:
    """Architecture numbers, quantization, byte sizes and chat template of one model.

    `n_head_kv` is a per-layer tuple when the model varies it (hybrid models have layers with 0
    KV heads); use `kv_heads(il)` rather than reading it directly.
    """

    format: str
    architecture: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int | tuple[int, ...]
    head_dim_k: int
    head_dim_v: int
    n_vocab: int
    context_length: int
    name: str | None = None
    n_ff: int | None = None
    head_dim_k_swa: int | None = None
    head_dim_v_swa: int | None = None
    rope_scaling: RopeScaling | None = None
    sliding_window: int | None = None
    swa_layers: tuple[bool, ...] | None = None
    n_expert: int = 0
    n_expert_used: int = 0
    kv_lora_rank: int | None = None
    mla: bool = False
    n_layer_kv: int | None = None
    quantization: str | None = None
    quantization_source: str | None = None
    tensors: tuple[TensorInfo, ...] = ()
    weight_bytes: int = 0
    parameters: int = 0
    file_bytes: int = 0
    chat_template: str | None = None
    chat_template_name: str | None = None
    tied_embeddings: bool = False
    # f32 values of recurrent state per recurrent layer and sequence (llama.cpp's
    # hparams.n_embd_r() conv/shift state, n_embd_s() SSM/WKV state); 0 without such layers.
    n_embd_r: int = 0
    n_embd_s: int = 0
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    # ---- per-layer views -------------------------------------------------------------------

    def kv_heads(self, il: int) -> int:
        """KV heads of layer `il` (0 for recurrent layers of hybrid models)."""
        if isinstance(self.n_head_kv, tuple):
            return self.n_head_kv[il] if il < len(self.n_head_kv) else self.n_head_kv[-1]
        return self.n_head_kv

    def is_swa(self, il: int) -> bool:
        """Whether layer `il` uses sliding-window attention (a window-sized KV cache)."""
        if not self.sliding_window or self.swa_layers is None or il >= len(self.swa_layers):
            return False
        return self.swa_layers[il]

    def is_recurrent(self, il: int) -> bool:
        """Whether layer `il` keeps recurrent state (Mamba/RWKV/short-conv layers, which have
        no KV heads) instead of a KV cache."""
        return (self.n_embd_r or self.n_embd_s) > 0 and self.kv_heads(il) == 0

    def has_kv(self, il: int) -> bool:
        """Layers past `n_layer_kv` (MTP heads, KV-sharing layers) own no KV cache."""
        limit = self.n_layer if self.n_layer_kv is None else self.n_layer_kv
        return il < limit and self.kv_heads(il) > 0

    def head_dims(self, il: int) -> tuple[int, int]:
        """(K, V) head dimension of layer `il`; SWA layers may use their own."""
        if self.is_swa(il):
            return (self.head_dim_k_swa or self.head_dim_k, self.head_dim_v_swa or self.head_dim_v)
        return self.head_dim_k, self.head_dim_v

    @property
    def bits_per_weight(self) -> float | None:
        """Effective bits per weight over the whole file (embeddings included)."""
        if not self.parameters or not self.weight_bytes:
            return None
        return self.weight_bytes * 8 / self.parameters

    @property
    def is_moe(self) -> bool:
        return self.n_expert > 1

    # ---- byte groups ---------------------------------------------------------------------

    def byte_groups(self) -> ByteGroups:
        """Weight bytes split into input (embedding), each repeating layer and output layer.

        llama.cpp keeps the input layer on the host and offloads the output layer first, so GPU
        layer planning needs exactly this split. Without a tensor table (sizes only) the bytes
        are spread evenly, which is what the file size alone can tell.
        """
        if not self.tensors:
            per_layer = self.weight_bytes // max(self.n_layer + 2, 1)
            layers = tuple([per_layer] * self.n_layer)
            rest = self.weight_bytes - per_layer * self.n_layer
            return ByteGroups(input=rest // 2, layers=layers, output=rest - rest // 2, other=0)
        layers = [0] * self.n_layer
        inp = out = other = 0
        for t in self.tensors:
            m = _LAYER_RE.search(t.name)
            if m and int(m.group(1)) < self.n_layer:
                layers[int(m.group(1))] += t.n_bytes
            elif m:
                other += t.n_bytes  # MTP / nextn layers beyond block_count
            elif any(t.name.startswith(p) or f".{p}" in t.name for p in _INPUT_NAMES):
                inp += t.n_bytes
            elif any(t.name.startswith(p) or f".{p}" in t.name for p in _OUTPUT_NAMES):
                out += t.n_bytes
            else:
                other += t.n_bytes
        return ByteGroups(input=inp, layers=tuple(layers), output=out, other=other)

    def with_updates(self, **changes: Any) -> ModelSpec:
        """A copy with some fields replaced (frozen dataclasses have no setters)."""
        from dataclasses import replace

        return replace(self, **changes)


@dataclass(frozen=True)
class ByteGroups:
    """Weight bytes by where llama.cpp places them."""

    input: int
    layers: tuple[int, ...]
    output: int
    other: int

    @property
    def total(self) -> int:
        return self.input + sum(self.layers) + self.output + self.other

    def scaled(self, total: int) -> ByteGroups:
        """The same proportions over another total: another quantization of the same model."""
        mine = self.total
        if mine <= 0:
            return self
        f = total / mine
        layers = tuple(int(b * f) for b in self.layers)
        inp = int(self.input * f)
        other = int(self.other * f)
        out = total - inp - sum(layers) - other
        return ByteGroups(input=inp, layers=layers, output=max(out, 0), other=other)
