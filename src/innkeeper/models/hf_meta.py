"""config.json + safetensors headers -> ModelSpec, for Hugging Face-style model folders and repos.

A safetensors file starts with an 8-byte little-endian header length and a JSON header listing
every tensor's dtype, shape and byte range, so exact weight bytes need only the first few KB of
each shard (read locally or by HTTP range). config.json gives the architecture numbers; its
`quantization_config.quant_method` names GPTQ, AWQ, bitsandbytes, EXL2 and friends. Every value
is type-checked: a config.json with a string where a number belongs is a clear error, not a
crash deep in the memory maths.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from innkeeper.models.sources import ByteSource, FileSource
from innkeeper.models.spec import ModelFormatError, ModelSpec, RopeScaling, TensorInfo
from innkeeper.models.templates_detect import detect_template

MAX_SAFETENSORS_HEADER = 100 * 1024**2  # the format's own limit
MAX_CONFIG_BYTES = 16 * 1024**2

DTYPE_BYTES: dict[str, float] = {
    "F64": 8,
    "I64": 8,
    "U64": 8,
    "F32": 4,
    "I32": 4,
    "U32": 4,
    "F16": 2,
    "BF16": 2,
    "I16": 2,
    "U16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F4": 0.5,
    "F6_E2M3": 0.75,
    "F6_E3M2": 0.75,
}
# Companion tensors of packed quantized weights: they hold scales, not parameters.
_QUANT_AUX = (
    ".qzeros",
    ".scales",
    ".g_idx",
    ".absmax",
    ".quant_map",
    ".nested_absmax",
    ".nested_quant_map",
    ".quant_state",
    ".q_scale",
    ".q_scale_max",
    ".q_groups",
    ".q_invperm",
    ".q_perm",
    ".SCB",
    ".weight_format",
    ".weight_scale",
)


class IncompleteConfigError(ModelFormatError):
    """config.json lacks the architecture numbers (the model can be named, not planned)."""


def read_safetensors_header(src: ByteSource) -> list[TensorInfo]:
    """The tensor table of one safetensors file, validated against the file size."""
    head = src.read(0, 8)
    if len(head) < 8:
        raise ModelFormatError(f"{src.name}: not a safetensors file (too short)")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_SAFETENSORS_HEADER or (src.size >= 0 and 8 + n > src.size):
        raise ModelFormatError(
            f"{src.name}: safetensors header claims {n:,} bytes (file has {src.size:,}): corrupt"
        )
    raw = src.read(8, n)
    if len(raw) < n:
        raise ModelFormatError(f"{src.name}: truncated safetensors header")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"{src.name}: safetensors header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise ModelFormatError(f"{src.name}: safetensors header is not an object")
    data_size = src.size - 8 - n if src.size >= 0 else None
    tensors: list[TensorInfo] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise ModelFormatError(f"{src.name}: entry {name!r} is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in DTYPE_BYTES:
            raise ModelFormatError(f"{src.name}: tensor {name!r} has unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise ModelFormatError(f"{src.name}: tensor {name!r} has a bad shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and o >= 0 for o in offsets)
            or offsets[1] < offsets[0]
        ):
            raise ModelFormatError(f"{src.name}: tensor {name!r} has bad data_offsets")
        n_el = 1
        for d in shape:
            n_el *= d
        n_bytes = offsets[1] - offsets[0]
        if int(n_el * DTYPE_BYTES[dtype]) != n_bytes:
            raise ModelFormatError(
                f"{src.name}: tensor {name!r} shape {shape} does not match its {n_bytes:,} bytes"
            )
        if data_size is not None and offsets[1] > data_size:
            raise ModelFormatError(
                f"{src.name}: tensor {name!r} ends past the end of the file: truncated"
            )
        tensors.append(TensorInfo(name, dtype, tuple(shape), n_el, n_bytes))
    return tensors


def read_safetensors_file(path: Path) -> list[TensorInfo]:
    with FileSource(path) as src:
        return read_safetensors_header(src)


def load_json(path: Path, what: str) -> dict[str, Any]:
    """A small JSON object file, with size and type checks and a clear error."""
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ModelFormatError(f"{path}: {what} is larger than 16 MiB")
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"{path}: cannot read {what}: {exc}") from None
    if not isinstance(data, dict):
        raise ModelFormatError(f"{path}: {what} should be a JSON object")
    return data


def _get_int(
    cfg: dict[str, Any], key: str, default: int | None = None, *, where: str
) -> int | None:
    value = cfg.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ModelFormatError(f"{where}: {key} should be a non-negative integer, got {value!r}")
    return value


def quantization_of(
    cfg: dict[str, Any], where: str = "config.json"
) -> tuple[str | None, str | None, float | None]:
    """(format, label, bits) from `quantization_config`: gptq/awq/bitsandbytes/exl2/fp8…"""
    q = cfg.get("quantization_config")
    if q is None:
        return None, None, None
    if not isinstance(q, dict):
        raise ModelFormatError(f"{where}: quantization_config should be an object, got {q!r}")
    method = q.get("quant_method")
    if method is not None and not isinstance(method, str):
        raise ModelFormatError(f"{where}: quant_method should be a string, got {method!r}")
    method = (method or "").lower()
    bits = q.get("bits", q.get("w_bit"))
    if bits is not None and (isinstance(bits, bool) or not isinstance(bits, (int, float))):
        raise ModelFormatError(f"{where}: quantization bits should be a number, got {bits!r}")
    group = q.get("group_size", q.get("q_group_size"))
    if method == "bitsandbytes" or q.get("load_in_4bit") or q.get("load_in_8bit"):
        four = bool(q.get("load_in_4bit")) or q.get("_load_in_4bit") is True
        kind = q.get("bnb_4bit_quant_type", "nf4") if four else "int8"
        return "bitsandbytes", f"bitsandbytes {kind}", 4.0 if four else 8.0
    if method in ("gptq", "awq", "exl2", "exl3"):
        label = f"{method.upper()} {bits:g}-bit" if bits is not None else method.upper()
        if isinstance(group, int) and not isinstance(group, bool) and group > 0:
            label += f" g{group}"
        return method, label, float(bits) if bits is not None else None
    if method:
        return method, method, float(bits) if bits is not None else None
    return None, None, None


def spec_from_config(
    cfg: dict[str, Any],
    tensors: list[TensorInfo] | None = None,
    total_size: int | None = None,
    *,
    where: str = "config.json",
    fmt: str | None = None,
    chat_template: str | None = None,
) -> ModelSpec:
    """ModelSpec from a parsed config.json (and the safetensors tensor table, when known)."""
    outer = cfg
    if isinstance(cfg.get("text_config"), dict):
        cfg = {**cfg["text_config"], "quantization_config": outer.get("quantization_config")}
    arch = cfg.get("model_type") or outer.get("model_type")
    archs = outer.get("architectures")
    if not isinstance(arch, str):
        arch = (
            archs[0]
            if isinstance(archs, list) and archs and isinstance(archs[0], str)
            else "unknown"
        )

    def gi(key: str, default: int | None = None) -> int | None:
        return _get_int(cfg, key, default, where=where)

    n_layer = gi("num_hidden_layers", gi("n_layer", gi("num_layers")))
    n_embd = gi("hidden_size", gi("n_embd", gi("d_model")))
    n_head = gi("num_attention_heads", gi("n_head"))
    if n_layer is None or n_embd is None or n_head is None or n_head == 0:
        raise IncompleteConfigError(
            f"{where}: needs num_hidden_layers, hidden_size and num_attention_heads"
        )
    n_kv = gi("num_key_value_heads", n_head) or n_head
    head_dim = gi("head_dim") or (n_embd // n_head)
    n_vocab = gi("vocab_size", 0) or 0
    ctx = gi("max_position_embeddings", gi("n_positions", 0)) or 0
    n_ff = gi("intermediate_size", gi("n_inner"))

    window = gi("sliding_window")
    swa_layers: tuple[bool, ...] | None = None
    layer_types = cfg.get("layer_types")
    if window and isinstance(layer_types, list) and len(layer_types) >= n_layer:
        swa_layers = tuple(t == "sliding_attention" for t in layer_types[:n_layer])
    elif window and cfg.get("use_sliding_window") is False:
        window = None
    elif window:
        pattern = gi("sliding_window_pattern")
        if pattern:
            swa_layers = tuple(il % pattern < pattern - 1 for il in range(n_layer))
        elif arch.startswith("gemma2"):
            swa_layers = tuple(il % 2 == 0 for il in range(n_layer))
        else:
            swa_layers = tuple([True] * n_layer)  # Mistral-v0.1 style: every layer windowed
    if swa_layers is not None and not any(swa_layers):
        window, swa_layers = None, None

    kv_lora = gi("kv_lora_rank")
    mla = bool(kv_lora) and gi("qk_rope_head_dim") is not None
    head_k, head_v = head_dim, gi("v_head_dim", head_dim) or head_dim
    if mla:
        head_k, head_v, n_kv = (kv_lora or 0) + (gi("qk_rope_head_dim") or 0), 0, 1

    rope = None
    rs = cfg.get("rope_scaling")
    if isinstance(rs, dict):
        kind = rs.get("rope_type", rs.get("type"))
        factor = rs.get("factor")
        orig = rs.get("original_max_position_embeddings")
        if isinstance(kind, str) and kind != "default":
            rope = RopeScaling(
                kind,
                float(factor)
                if isinstance(factor, (int, float)) and not isinstance(factor, bool)
                else None,
                orig if isinstance(orig, int) and not isinstance(orig, bool) else None,
            )
    elif rs is not None:
        raise ModelFormatError(f"{where}: rope_scaling should be an object, got {rs!r}")

    n_expert = gi("num_local_experts", gi("n_routed_experts", gi("num_experts", 0))) or 0
    n_used = gi("num_experts_per_tok", gi("moe_topk", 0)) or 0
    qfmt, qlabel, bits = quantization_of(cfg, where)
    torch_dtype = cfg.get("torch_dtype", cfg.get("dtype"))
    if torch_dtype is not None and not isinstance(torch_dtype, str):
        raise ModelFormatError(f"{where}: torch_dtype should be a string, got {torch_dtype!r}")
    tensors = tensors or []
    weight_bytes = sum(t.n_bytes for t in tensors) or (total_size or 0)
    parameters = _count_parameters(tensors, bits)
    if not parameters and total_size and torch_dtype in ("float16", "bfloat16") and not qfmt:
        parameters = total_size // 2
    tied = cfg.get("tie_word_embeddings")
    return ModelSpec(
        format=fmt or qfmt or "safetensors",
        architecture=arch,
        name=None,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_kv,
        head_dim_k=head_k,
        head_dim_v=head_v,
        n_vocab=n_vocab,
        context_length=ctx,
        n_ff=n_ff,
        rope_scaling=rope,
        sliding_window=window,
        swa_layers=swa_layers,
        n_expert=n_expert,
        n_expert_used=n_used,
        kv_lora_rank=kv_lora,
        mla=mla,
        quantization=qlabel or (torch_dtype if isinstance(torch_dtype, str) else None),
        quantization_source=(
            "config.json quantization_config.quant_method" if qlabel else "config.json torch_dtype"
        ),
        tensors=tuple(tensors),
        weight_bytes=weight_bytes,
        parameters=parameters,
        file_bytes=weight_bytes,
        chat_template=chat_template,
        chat_template_name=detect_template(chat_template),
        tied_embeddings=bool(tied) if isinstance(tied, bool) else False,
        extra={"torch_dtype": torch_dtype, "quant_bits": bits},
    )


def _count_parameters(tensors: list[TensorInfo], bits: float | None) -> int:
    """Parameters, unpacking packed quantized weights (GPTQ/AWQ int32, bitsandbytes uint8)."""
    total = 0
    for t in tensors:
        if t.name.endswith(_QUANT_AUX):
            continue
        if t.name.endswith((".qweight", ".q_weight")) and bits:
            total += int(t.n_bytes * 8 / bits)
        elif t.type_name == "U8" and t.name.endswith(".weight") and bits == 4:
            total += t.n_elements * 2  # bitsandbytes 4-bit: two values per byte
        else:
            total += t.n_elements
    return total


def chat_template_from(tokenizer_config: dict[str, Any] | None) -> str | None:
    """The Jinja chat template of tokenizer_config.json (a string, or a list of named ones)."""
    if not tokenizer_config:
        return None
    tpl = tokenizer_config.get("chat_template")
    if isinstance(tpl, str):
        return tpl
    if isinstance(tpl, list):
        for item in tpl:
            if isinstance(item, dict) and item.get("name") == "default":
                t = item.get("template")
                return t if isinstance(t, str) else None
    return None


def read_hf_dir(path: Path) -> ModelSpec:
    """ModelSpec of a local HF model folder: config.json plus every safetensors header."""
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ModelFormatError(f"{path}: no config.json")
    cfg = load_json(cfg_path, "config.json")
    tensors: list[TensorInfo] = []
    for st in sorted(path.glob("*.safetensors")):
        tensors.extend(read_safetensors_file(st))
    total = None
    index = path / "model.safetensors.index.json"
    if index.is_file():
        meta = load_json(index, "model.safetensors.index.json").get("metadata")
        if isinstance(meta, dict) and isinstance(meta.get("total_size"), int):
            total = meta["total_size"]
    tok_cfg = path / "tokenizer_config.json"
    template = (
        chat_template_from(load_json(tok_cfg, "tokenizer_config.json"))
        if tok_cfg.is_file()
        else None
    )
    jinja = path / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text(encoding="utf-8", errors="replace")
    fmt = "exl2" if _is_exl2(path, tensors) else None
    return spec_from_config(
        cfg, tensors, total, where=str(cfg_path), fmt=fmt, chat_template=template
    )


def _is_exl2(path: Path | None, tensors: list[TensorInfo]) -> bool:
    """EXL2 folders carry measurement.json and `.q_weight`/`.q_invperm` tensors."""
    if path is not None and (path / "measurement.json").is_file():
        return True
    return any(t.name.endswith((".q_invperm", ".q_groups")) for t in tensors)
