"""GGUF header -> ModelSpec: what llama.cpp will build from a file, from its metadata alone.

The header itself is read by `gguf_header` (bounds-checked, never the tensor data); this module
interprets it as llama.cpp's load_hparams does: layers, heads, sliding windows, RoPE scaling,
recurrent state, and split files merged into one spec.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gguf.constants import LlamaFileType

from innkeeper.models.gguf_header import GGUFHeader, read_header
from innkeeper.models.sources import FileSource
from innkeeper.models.spec import ModelFormatError, ModelSpec, RopeScaling, TensorInfo

# Architectures whose sliding-window layers follow a fixed pattern when the GGUF does not list
# them: (pattern n, dense_first, default window). Mirrors each arch's load_hparams in llama.cpp.
_SWA_PATTERNS: dict[str, tuple[int, bool, int | None]] = {
    "gemma2": (2, False, 4096),
    "gemma3": (6, False, None),
    "gemma3n": (5, False, None),
    "cohere2": (4, False, None),
    "llama4": (4, False, 8192),
    "gpt-oss": (2, False, None),
    "exaone4": (4, False, None),
    "olmo2": (4, False, None),
    "afmoe": (4, False, None),
    "smallthinker": (4, True, 4096),
}
# llama.cpp reads a sliding_window for these but runs them without SWA.
_SWA_DISABLED = {"phi3"}


def _int(meta: dict[str, Any], key: str, default: int | None = None) -> int | None:
    value = meta.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ModelFormatError(f"metadata {key} should be a number, got {value!r}")
    if value < 0:
        raise ModelFormatError(f"metadata {key} is negative ({value})")
    return int(value)


def _int_or_list(meta: dict[str, Any], key: str, n_layer: int) -> int | tuple[int, ...] | None:
    value = meta.get(key)
    if isinstance(value, list):
        if not value or not all(isinstance(v, int) and v >= 0 for v in value):
            raise ModelFormatError(f"metadata {key} should list non-negative integers")
        if len(set(value)) == 1:
            return int(value[0])
        if len(value) < n_layer:
            raise ModelFormatError(f"metadata {key} has {len(value)} entries for {n_layer} layers")
        return tuple(int(v) for v in value)
    return _int(meta, key)


def file_type_name(file_type: int | None) -> str | None:
    """`general.file_type` as llama.cpp's quantization name (`Q4_K_M`)."""
    if file_type is None:
        return None
    try:
        name = LlamaFileType(file_type).name
    except ValueError:
        return f"type {file_type}"
    return name.removeprefix("MOSTLY_").replace("ALL_F32", "F32")


def _dominant_type(tensors: list[TensorInfo]) -> str | None:
    """The type holding most weight bytes, for files without `general.file_type`."""
    totals: dict[str, int] = {}
    for t in tensors:
        if len(t.shape) >= 2:
            totals[t.type_name] = totals.get(t.type_name, 0) + t.n_bytes
    return max(totals, key=lambda k: totals[k]) if totals else None


def _swa_layers(
    arch: str, meta: dict[str, Any], n_layer: int
) -> tuple[int | None, tuple[bool, ...] | None]:
    if arch in _SWA_DISABLED:
        return None, None
    prefix = f"{arch}.attention."
    window = _int(meta, prefix + "sliding_window")
    pattern_default = _SWA_PATTERNS.get(arch)
    if pattern_default and window is None and pattern_default[2] is not None:
        window = pattern_default[2]
    if not window:
        return None, None
    raw = meta.get(prefix + "sliding_window_pattern")
    if isinstance(raw, list):
        if len(raw) < n_layer:
            raise ModelFormatError(f"{prefix}sliding_window_pattern has {len(raw)} entries")
        return window, tuple(bool(v) for v in raw[:n_layer])
    if pattern_default is None and raw is None:
        # A window without a known pattern: llama.cpp runs such archs without SWA.
        return None, None
    n_pattern = (
        int(raw) if isinstance(raw, int) and not isinstance(raw, bool) else pattern_default[0]
    )  # type: ignore[index]
    dense_first = pattern_default[1] if pattern_default else False
    if dense_first:
        layers = tuple(n_pattern == 0 or il % n_pattern != 0 for il in range(n_layer))
    else:
        layers = tuple(n_pattern == 0 or il % n_pattern < n_pattern - 1 for il in range(n_layer))
    return window, layers


def spec_from_header(header: GGUFHeader, name: str = "") -> ModelSpec:
    """Turn header metadata and the tensor table into a ModelSpec."""
    from innkeeper.models.templates_detect import detect_template

    meta = header.metadata
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise ModelFormatError(f"{name}: GGUF has no general.architecture")
    p = f"{arch}."
    n_layer = _int(meta, p + "block_count")
    n_embd = _int(meta, p + "embedding_length")
    if n_layer is None or n_embd is None:
        raise ModelFormatError(f"{name}: GGUF lacks {p}block_count or {p}embedding_length")
    if n_layer > 100_000 or n_embd > 10_000_000:
        raise ModelFormatError(
            f"{name}: absurd architecture numbers ({n_layer} layers, {n_embd} wide)"
        )
    heads_raw = _int_or_list(meta, p + "attention.head_count", n_layer) or 0
    n_head = max(heads_raw) if isinstance(heads_raw, tuple) else heads_raw
    n_head_kv = _int_or_list(meta, p + "attention.head_count_kv", n_layer)
    if n_head_kv is None:
        n_head_kv = heads_raw
    default_hd = n_embd // n_head if n_head else 0
    head_k = _int(meta, p + "attention.key_length", default_hd) or 0
    head_v = _int(meta, p + "attention.value_length", default_hd) or 0
    mla = (
        _int(meta, p + "attention.key_length_mla") is not None
        and _int(meta, p + "attention.value_length_mla") is not None
    )
    window, swa = _swa_layers(arch, meta, n_layer)

    n_layer_kv = n_layer - (_int(meta, p + "nextn_predict_layers", 0) or 0)
    shared = _int(meta, p + "attention.shared_kv_layers")
    if shared:
        n_layer_kv = max(n_layer - shared, 0)

    n_vocab = _int(meta, p + "vocab_size") or header.array_lengths.get("tokenizer.ggml.tokens", 0)
    if not n_vocab:
        tokens = meta.get("tokenizer.ggml.tokens")
        n_vocab = len(tokens) if isinstance(tokens, list) else 0

    rope = None
    rope_type = meta.get(p + "rope.scaling.type")
    if isinstance(rope_type, str) and rope_type != "none":
        factor = meta.get(p + "rope.scaling.factor")
        rope = RopeScaling(
            rope_type,
            float(factor) if isinstance(factor, (int, float)) else None,
            _int(meta, p + "rope.scaling.original_context_length"),
        )

    n_ff_raw = _int_or_list(meta, p + "feed_forward_length", n_layer)
    n_ff = max(n_ff_raw) if isinstance(n_ff_raw, tuple) else n_ff_raw

    tensors = tuple(header.tensors)
    weight_bytes = sum(t.n_bytes for t in tensors)
    parameters = sum(t.n_elements for t in tensors)
    file_type = _int(meta, "general.file_type")
    quant = file_type_name(file_type)
    source = "GGUF metadata general.file_type"
    if quant is None:
        quant = _dominant_type(header.tensors)
        source = "GGUF tensor types"
    template = meta.get("tokenizer.chat_template")
    template = template if isinstance(template, str) else None
    names = {"output.weight"}
    tied = not any(t.name in names for t in tensors) and any(
        t.name == "token_embd.weight" for t in tensors
    )
    return ModelSpec(
        format="gguf",
        architecture=arch,
        name=meta.get("general.name") if isinstance(meta.get("general.name"), str) else None,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim_k=head_k,
        head_dim_v=0 if mla else head_v,
        head_dim_k_swa=_int(meta, p + "attention.key_length_swa"),
        head_dim_v_swa=_int(meta, p + "attention.value_length_swa"),
        n_vocab=n_vocab,
        context_length=_int(meta, p + "context_length", 0) or 0,
        n_ff=n_ff,
        rope_scaling=rope,
        sliding_window=window,
        swa_layers=swa,
        n_expert=_int(meta, p + "expert_count", 0) or 0,
        n_expert_used=_int(meta, p + "expert_used_count", 0) or 0,
        kv_lora_rank=_int(meta, p + "attention.kv_lora_rank"),
        mla=mla,
        n_layer_kv=n_layer_kv,
        quantization=quant,
        quantization_source=source,
        tensors=tensors,
        weight_bytes=weight_bytes,
        parameters=parameters,
        file_bytes=max(header.file_size, 0),
        chat_template=template,
        chat_template_name=detect_template(template),
        tied_embeddings=tied,
        **_recurrent_state(meta, p, n_embd),
        extra={
            "gguf_version": header.version,
            "header_bytes": header.data_offset,
            "size_label": meta.get("general.size_label"),
            "split_count": meta.get("split.count"),
            "split_index": meta.get("split.no"),
        },
    )


def _recurrent_state(meta: dict[str, Any], p: str, n_embd: int) -> dict[str, int]:
    """llama.cpp's per-layer recurrent state widths (llama-hparams.cpp n_embd_r/n_embd_s):
    RWKV token shift + WKV state, LFM2 short-conv cache, Mamba/Mamba-2 conv + SSM state."""
    wkv = _int(meta, p + "wkv.head_size", 0) or 0
    if wkv:
        shifts = _int(meta, p + "token_shift_count", 2) or 2
        return {"n_embd_r": shifts * n_embd, "n_embd_s": n_embd * wkv}
    l_cache = _int(meta, p + "shortconv.l_cache", 0) or 0
    if l_cache:
        return {"n_embd_r": n_embd * (l_cache - 1), "n_embd_s": 0}
    d_conv = _int(meta, p + "ssm.conv_kernel", 0) or 0
    d_inner = _int(meta, p + "ssm.inner_size", 0) or 0
    d_state = _int(meta, p + "ssm.state_size", 0) or 0
    n_group = _int(meta, p + "ssm.group_count", 0) or 0
    r = max(d_conv - 1, 0) * (d_inner + 2 * n_group * d_state)
    return {"n_embd_r": r, "n_embd_s": d_state * d_inner}


def read_gguf_spec(path: Path | str) -> ModelSpec:
    """The ModelSpec of a local GGUF file, from its header alone.

    For a split GGUF (`-00001-of-00003.gguf`) the first part holds the metadata; pass every
    part's tensors through `read_split_spec` to get exact totals.
    """
    path = Path(path)
    try:
        with FileSource(path) as src:
            return spec_from_header(read_header(src), str(path))
    except OSError as exc:
        raise ModelFormatError(f"cannot read {path}: {exc.strerror or exc}") from exc


def merge_split(first: ModelSpec, others: list[GGUFHeader]) -> ModelSpec:
    """Add the tensors of the other parts of a split GGUF to the first part's spec."""
    tensors = list(first.tensors)
    file_bytes = first.file_bytes
    for h in others:
        tensors.extend(h.tensors)
        file_bytes += max(h.file_size, 0)
    return first.with_updates(
        tensors=tuple(tensors),
        weight_bytes=sum(t.n_bytes for t in tensors),
        parameters=sum(t.n_elements for t in tensors),
        file_bytes=file_bytes,
    )


def read_split_spec(paths: list[Path]) -> ModelSpec:
    """The ModelSpec of a split GGUF whose parts are all present locally."""
    first = read_gguf_spec(paths[0])
    headers = []
    for p in paths[1:]:
        with FileSource(p) as src:
            headers.append(read_header(src))
    return merge_split(first, headers)
