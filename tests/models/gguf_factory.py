"""Write GGUF files with the tensor shapes of real architectures and no real data.

The tensor data region is a hole (the file is extended with truncate), so an 8B-shaped file
costs a few kilobytes of disk while llama.cpp sees exactly the shapes, types and metadata of
the real model. The vocabulary is llama.cpp's `none` tokenizer with `{arch}.vocab_size`, so the
header stays small and the output/embedding shapes stay real; `write_shape(tokenizer=...)`
borrows a real model's tokenizer instead, for a file that can be served (the GPU bench's models).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter

Q = GGMLQuantizationType


@dataclass
class Shape:
    """Architecture numbers of one real model."""

    arch: str
    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_vocab: int
    ctx: int
    tied: bool = False
    window: int | None = None
    n_expert: int = 0
    n_expert_used: int = 0
    qk_norm: bool = False
    post_norms: bool = False
    extra_kv: dict[str, object] = field(default_factory=dict)


LLAMA3_8B = Shape("llama", 32, 4096, 32, 8, 128, 14336, 128256, 8192)
MISTRAL_7B = Shape("llama", 32, 4096, 32, 8, 128, 14336, 32768, 32768)
GEMMA2_9B = Shape(
    "gemma2", 42, 3584, 16, 8, 256, 14336, 256000, 8192, tied=True, window=4096, post_norms=True
)
GEMMA3_4B = Shape(
    "gemma3",
    34,
    2560,
    8,
    4,
    256,
    10240,
    262208,
    131072,
    tied=True,
    window=1024,
    qk_norm=True,
    post_norms=True,
)
MIXTRAL_TINY = Shape("llama", 8, 1024, 16, 4, 64, 2048, 32000, 32768, n_expert=8, n_expert_used=2)
TINY_LLAMA = Shape("llama", 4, 256, 4, 2, 64, 512, 4096, 2048)


Tokenizer = dict[str, tuple[GGUFValueType, Any]]


def read_tokenizer(gguf: Path) -> Tokenizer:
    """A GGUF's `tokenizer.*` keys (vocabulary, merges, chat template...): type and value.

    Read once and passed to `write_shape` for every file: parsing a 49k vocabulary takes
    seconds.
    """
    fields = GGUFReader(gguf).fields
    return {
        name: (value.types[0], value.contents())
        for name, value in fields.items()
        if name.startswith("tokenizer.")
    }


def vocab_size(tokenizer: Tokenizer) -> int:
    """How many tokens the tokenizer has (the shape's n_vocab must match)."""
    return len(tokenizer["tokenizer.ggml.tokens"][1])


def write_tokenizer(w: GGUFWriter, tokenizer: Tokenizer, skip_template: bool = False) -> None:
    """Copy a tokenizer (from `read_tokenizer`) into `w`; `skip_template`: not its chat template."""
    adders = {
        GGUFValueType.ARRAY: w.add_array,
        GGUFValueType.STRING: w.add_string,
        GGUFValueType.UINT32: w.add_uint32,
        GGUFValueType.INT32: w.add_int32,
        GGUFValueType.BOOL: w.add_bool,
        GGUFValueType.FLOAT32: w.add_float32,
    }
    for name, (kind, value) in tokenizer.items():
        if not (skip_template and name == "tokenizer.chat_template"):
            adders[kind](name, value)


def _tensor(w: GGUFWriter, name: str, ne: tuple[int, ...], qtype: GGMLQuantizationType) -> int:
    """Declare one tensor (ne in GGML order: row length first); returns its byte size."""
    block, size = GGML_QUANT_SIZES[qtype]
    n = int(np.prod(ne))
    nbytes = n // block * size
    # add_tensor_info wants numpy order (outermost first).
    w.add_tensor_info(name, tuple(reversed(ne)), np.dtype(np.float32), nbytes, raw_dtype=qtype)
    return nbytes


def add_hparams(w: GGUFWriter, s: Shape) -> None:
    """The architecture keys of `s` (layers, widths, heads, RoPE, vocabulary size...)."""
    a = s.arch
    w.add_uint32(f"{a}.block_count", s.n_layer)
    w.add_uint32(f"{a}.context_length", s.ctx)
    w.add_uint32(f"{a}.embedding_length", s.n_embd)
    w.add_uint32(f"{a}.feed_forward_length", s.n_ff)
    w.add_uint32(f"{a}.attention.head_count", s.n_head)
    w.add_uint32(f"{a}.attention.head_count_kv", s.n_head_kv)
    w.add_uint32(f"{a}.attention.key_length", s.head_dim)
    w.add_uint32(f"{a}.attention.value_length", s.head_dim)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_uint32(f"{a}.rope.dimension_count", s.head_dim)
    w.add_float32(f"{a}.rope.freq_base", 10000.0)
    w.add_uint32(f"{a}.vocab_size", s.n_vocab)
    if s.window:
        w.add_uint32(f"{a}.attention.sliding_window", s.window)
    if s.n_expert:
        w.add_uint32(f"{a}.expert_count", s.n_expert)
        w.add_uint32(f"{a}.expert_used_count", s.n_expert_used)
    for key, value in s.extra_kv.items():
        if isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_uint32(key, int(value))  # type: ignore[arg-type]


def write_shape(
    path: Path,
    s: Shape,
    qtype: GGMLQuantizationType = Q.Q8_0,
    file_type: int | None = 7,
    chat_template: str | None = None,
    tokenizer: Tokenizer | None = None,
) -> Path:
    """Write a sparse GGUF with the shapes of `s`; weights in `qtype`, norms in F32.

    `tokenizer` (from `read_tokenizer`): a real model's vocabulary, merges and chat template
    instead of the `none` tokenizer; `s.n_vocab` must be its vocabulary size.
    """
    w = GGUFWriter(str(path), s.arch)
    add_hparams(w, s)
    if file_type is not None:
        w.add_file_type(file_type)
    if tokenizer is not None:
        if vocab_size(tokenizer) != s.n_vocab:
            raise ValueError(
                f"the tokenizer has {vocab_size(tokenizer)} tokens, the shape {s.n_vocab}"
            )
        write_tokenizer(w, tokenizer, skip_template=chat_template is not None)
    else:
        w.add_string("tokenizer.ggml.model", "none")
    if chat_template:
        w.add_string("tokenizer.chat_template", chat_template)

    E, hd = s.n_embd, s.head_dim
    total = 0
    align = 32

    def add(name: str, ne: tuple[int, ...], t: GGMLQuantizationType = qtype) -> None:
        nonlocal total
        nb = _tensor(w, name, ne, t)
        total += -(-nb // align) * align

    add("token_embd.weight", (E, s.n_vocab))
    add("output_norm.weight", (E,), Q.F32)
    if not s.tied:
        add("output.weight", (E, s.n_vocab))
    for i in range(s.n_layer):
        b = f"blk.{i}."
        add(b + "attn_norm.weight", (E,), Q.F32)
        add(b + "attn_q.weight", (E, s.n_head * hd))
        add(b + "attn_k.weight", (E, s.n_head_kv * hd))
        add(b + "attn_v.weight", (E, s.n_head_kv * hd))
        add(b + "attn_output.weight", (s.n_head * hd, E))
        if s.qk_norm:
            add(b + "attn_q_norm.weight", (hd,), Q.F32)
            add(b + "attn_k_norm.weight", (hd,), Q.F32)
        if s.post_norms:
            add(b + "post_attention_norm.weight", (E,), Q.F32)
            add(b + "post_ffw_norm.weight", (E,), Q.F32)
        add(b + "ffn_norm.weight", (E,), Q.F32)
        if s.n_expert:
            add(b + "ffn_gate_inp.weight", (E, s.n_expert), Q.F32)
            add(b + "ffn_gate_exps.weight", (E, s.n_ff, s.n_expert))
            add(b + "ffn_up_exps.weight", (E, s.n_ff, s.n_expert))
            add(b + "ffn_down_exps.weight", (s.n_ff, E, s.n_expert))
        else:
            add(b + "ffn_gate.weight", (E, s.n_ff))
            add(b + "ffn_up.weight", (E, s.n_ff))
            add(b + "ffn_down.weight", (s.n_ff, E))
    return _finish(w, path, total)


def write_deepseek2_lite(path: Path, qtype: GGMLQuantizationType = Q.Q8_0) -> Path:
    """DeepSeek-V2-Lite shapes with the split k_b/v_b tensors: llama.cpp's MLA (K-only) cache."""
    a = "deepseek2"
    E, n_layer, n_head, vocab = 2048, 27, 16, 102400
    kv_lora, rope, nope, v_dim, n_ff, ff_exp, n_exp = 512, 64, 128, 128, 10944, 1408, 64
    w = GGUFWriter(str(path), a)
    for k, v in {
        "block_count": n_layer,
        "context_length": 163840,
        "embedding_length": E,
        "feed_forward_length": n_ff,
        "attention.head_count": n_head,
        "attention.head_count_kv": 1,
        "attention.key_length": kv_lora + rope,
        "attention.value_length": kv_lora,
        "attention.key_length_mla": nope + rope,
        "attention.value_length_mla": v_dim,
        "attention.kv_lora_rank": kv_lora,
        "rope.dimension_count": rope,
        "leading_dense_block_count": 1,
        "expert_count": n_exp,
        "expert_used_count": 6,
        "expert_shared_count": 2,
        "expert_feed_forward_length": ff_exp,
        "vocab_size": vocab,
    }.items():
        w.add_uint32(f"{a}.{k}", v)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float32(f"{a}.expert_weights_scale", 1.0)
    w.add_float32(f"{a}.rope.freq_base", 10000.0)
    w.add_file_type(7)
    w.add_string("tokenizer.ggml.model", "none")
    total = 0

    def add(name: str, ne: tuple[int, ...], t: GGMLQuantizationType = qtype) -> None:
        nonlocal total
        total += -(-_tensor(w, name, ne, t) // 32) * 32

    add("token_embd.weight", (E, vocab))
    add("output_norm.weight", (E,), Q.F32)
    add("output.weight", (E, vocab))
    for i in range(n_layer):
        b = f"blk.{i}."
        add(b + "attn_norm.weight", (E,), Q.F32)
        add(b + "attn_q.weight", (E, n_head * (nope + rope)))
        add(b + "attn_kv_a_mqa.weight", (E, kv_lora + rope))
        add(b + "attn_kv_a_norm.weight", (kv_lora,), Q.F32)
        add(b + "attn_k_b.weight", (nope, kv_lora, n_head))
        add(b + "attn_v_b.weight", (kv_lora, v_dim, n_head))
        add(b + "attn_output.weight", (n_head * v_dim, E))
        add(b + "ffn_norm.weight", (E,), Q.F32)
        if i == 0:
            add(b + "ffn_gate.weight", (E, n_ff))
            add(b + "ffn_up.weight", (E, n_ff))
            add(b + "ffn_down.weight", (n_ff, E))
        else:
            add(b + "ffn_gate_inp.weight", (E, n_exp), Q.F32)
            add(b + "ffn_gate_exps.weight", (E, ff_exp, n_exp))
            add(b + "ffn_up_exps.weight", (E, ff_exp, n_exp))
            add(b + "ffn_down_exps.weight", (ff_exp, E, n_exp))
            add(b + "ffn_gate_shexp.weight", (E, ff_exp * 2))
            add(b + "ffn_up_shexp.weight", (E, ff_exp * 2))
            add(b + "ffn_down_shexp.weight", (ff_exp * 2, E))
    return _finish(w, path, total)


def _finish(w: GGUFWriter, path: Path, data_bytes: int) -> Path:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    assert w.fout is not None
    fout = w.fout[0]
    fout.flush()
    header_end = fout.tell()
    fout.close()
    w.fout = None
    data_start = header_end + (-header_end % 32)
    os.truncate(path, data_start + data_bytes)  # the data region is a hole: no disk used
    return path


# --- pytest fixture: every architecture file, written once per session -------------------------

ARCH_SHAPES = {
    "llama3_8b": LLAMA3_8B,
    "mistral_7b": MISTRAL_7B,
    "gemma2_9b": GEMMA2_9B,
    "gemma3_4b": GEMMA3_4B,
    "mixtral_tiny": MIXTRAL_TINY,
    "tiny": TINY_LLAMA,
}


def write_all(folder: Path) -> dict[str, Path]:
    """Every architecture file of this module in `folder` (a few KB of disk in all)."""
    out = {name: write_shape(folder / f"{name}.gguf", s) for name, s in ARCH_SHAPES.items()}
    out["deepseek2_lite"] = write_deepseek2_lite(folder / "deepseek2_lite.gguf")
    return out


GEMMA3_27B = Shape(
    "gemma3",
    62,
    5376,
    32,
    16,
    128,
    21504,
    262208,
    131072,
    tied=True,
    window=1024,
    qk_norm=True,
    post_norms=True,
)


def write_recurrent(
    path: Path,
    arch: str,
    n_layer: int,
    n_embd: int,
    kv_heads: int | list[int],
    meta: dict[str, int],
    n_vocab: int = 32000,
) -> Path:
    """A header-only GGUF of a recurrent (Mamba/RWKV) or hybrid model: the numbers the memory
    plan reads (`meta` holds the `{arch}.ssm.*` / `wkv.*` keys without the prefix)."""
    w = GGUFWriter(str(path), arch)
    w.add_uint32(f"{arch}.block_count", n_layer)
    w.add_uint32(f"{arch}.context_length", 1 << 20)
    w.add_uint32(f"{arch}.embedding_length", n_embd)
    w.add_uint32(f"{arch}.attention.head_count", 32)
    if isinstance(kv_heads, list):
        w.add_array(f"{arch}.attention.head_count_kv", kv_heads)
    else:
        w.add_uint32(f"{arch}.attention.head_count_kv", kv_heads)
    w.add_uint32(f"{arch}.attention.key_length", 128)
    w.add_uint32(f"{arch}.attention.value_length", 128)
    w.add_uint32(f"{arch}.vocab_size", n_vocab)
    for key, value in meta.items():
        w.add_uint32(f"{arch}.{key}", value)
    w.add_string("tokenizer.ggml.model", "none")
    total = _tensor(w, "token_embd.weight", (n_embd, n_vocab), Q.Q8_0)
    return _finish(w, path, total)
