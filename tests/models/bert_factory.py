"""Write a tiny BERT embedding model llama.cpp really runs: real tensor names, real hparams.

The shapes are llama.cpp's `bert` architecture (bge/MiniLM) at toy size, the weights random
but fixed (a seeded generator), so two runs on the same file give the same vectors and an
independent implementation (llama-cpp-python's `Llama.embed`) can be compared against ours.
The vocabulary is a WordPiece one of single letters and digits (each as a word start `▁x` and
a continuation `x`), so any lowercase ASCII text tokenises without an `[UNK]` flood.
"""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np
from gguf import GGUFWriter, PoolingType, TokenType

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PIECES = list(string.ascii_lowercase + string.digits + ".,!?'-")


def write_tiny_bert(
    path: Path,
    *,
    n_embd: int = 64,
    n_layer: int = 2,
    n_head: int = 4,
    n_ff: int = 128,
    n_ctx: int = 256,
    pooling: PoolingType = PoolingType.MEAN,
    seed: int = 1234,
    classifier: bool = False,
) -> Path:
    """A BERT-shaped GGUF (F32 weights, ~0.5 MB) with `pooling` as its `bert.pooling_type`;
    with `classifier`, a reranker's head (`cls`, `cls.output`: one score) as bge-reranker's."""
    rng = np.random.default_rng(seed)
    tokens = SPECIALS + [f"\u2581{p}" for p in PIECES] + PIECES
    n_vocab = len(tokens)
    w = GGUFWriter(str(path), "bert")
    w.add_name("tiny-bert-test")
    w.add_block_count(n_layer)
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_layer_norm_eps(1e-12)
    w.add_causal_attention(False)
    w.add_pooling_type(pooling)
    w.add_token_type_count(2)
    w.add_file_type(0)  # all F32
    w.add_tokenizer_model("bert")
    w.add_token_list(tokens)
    w.add_token_types(
        [TokenType.CONTROL] * len(SPECIALS) + [TokenType.NORMAL] * (n_vocab - len(SPECIALS))
    )
    w.add_pad_token_id(0)
    w.add_unk_token_id(1)
    w.add_bos_token_id(2)  # [CLS]: llama.cpp reads it as BOS
    w.add_sep_token_id(3)
    w.add_mask_token_id(4)
    w.add_add_bos_token(True)
    w.add_add_sep_token(True)

    def t(name: str, *shape: int, scale: float = 0.2) -> None:
        # numpy order: outermost first (a weight [n_out, n_in] is GGML's {n_in, n_out})
        w.add_tensor(name, (rng.standard_normal(shape) * scale).astype(np.float32))

    def norm(name: str, n: int) -> None:
        w.add_tensor(f"{name}.weight", (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32))
        w.add_tensor(f"{name}.bias", (0.1 * rng.standard_normal(n)).astype(np.float32))

    t("token_embd.weight", n_vocab, n_embd, scale=1.0)
    t("token_types.weight", 2, n_embd, scale=0.1)
    t("position_embd.weight", n_ctx, n_embd, scale=0.1)
    norm("token_embd_norm", n_embd)
    for i in range(n_layer):
        for part in ("attn_q", "attn_k", "attn_v", "attn_output"):
            t(f"blk.{i}.{part}.weight", n_embd, n_embd)
            t(f"blk.{i}.{part}.bias", n_embd, scale=0.05)
        norm(f"blk.{i}.attn_output_norm", n_embd)
        t(f"blk.{i}.ffn_up.weight", n_ff, n_embd)
        t(f"blk.{i}.ffn_up.bias", n_ff, scale=0.05)
        t(f"blk.{i}.ffn_down.weight", n_embd, n_ff)
        t(f"blk.{i}.ffn_down.bias", n_embd, scale=0.05)
        norm(f"blk.{i}.layer_output_norm", n_embd)
    if classifier:
        t("cls.weight", n_embd, n_embd)
        t("cls.bias", n_embd, scale=0.05)
        t("cls.output.weight", 1, n_embd, scale=1.0)
        t("cls.output.bias", 1, scale=0.05)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
