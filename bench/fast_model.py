"""A model so small that the server's own per-token work is most of each token's time.

On a GPU, a 135M-parameter model decodes a token in about a millisecond, so what a server spends
around `llama_decode` (sampling, detokenising, the hand-off to the HTTP side, the socket write)
is a large share of every token. This CPU has no such regime with a real model: SmolLM2 takes
~6 ms a token here. `write_fast_model` writes a llama-architecture GGUF with two layers, width
64 and random Q8_0 weights, and the embedded SmolLM2's tokenizer (so both servers take the same
text and detokenise the same 49,152-token vocabulary): a token costs ~0.3 ms of compute on one
core, and a comparison against llama-server on it measures the overhead regime here.
`python -m bench.fast_model PATH` writes it; `make bench-fast` runs the comparison.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize
from tests.models import gguf_factory

N_LAYER, N_EMBD, N_HEAD, N_HEAD_KV, N_FF, CTX = 2, 64, 4, 2, 128, 8192
SEED = 1234
Q8_0 = GGMLQuantizationType.Q8_0


def _q8(rng: np.random.Generator, rows: int, cols: int, scale: float) -> np.ndarray:
    """`rows` x `cols` random weights (numpy order: `cols` is the row length), as Q8_0."""
    return quantize((rng.standard_normal((rows, cols)) * scale).astype(np.float32), Q8_0)


def write_fast_model(path: Path, template: Path) -> Path:
    """Write the model to `path` with `template`'s tokenizer; the same bytes for the same seed."""
    tokenizer = gguf_factory.read_tokenizer(template)
    n_vocab = gguf_factory.vocab_size(tokenizer)
    head_dim = N_EMBD // N_HEAD
    rng = np.random.default_rng(SEED)
    shape = gguf_factory.Shape(
        "llama", N_LAYER, N_EMBD, N_HEAD, N_HEAD_KV, head_dim, N_FF, n_vocab, CTX, tied=True
    )
    w = GGUFWriter(str(path), "llama")
    gguf_factory.add_hparams(w, shape)
    w.add_file_type(7)  # mostly Q8_0
    gguf_factory.write_tokenizer(w, tokenizer)
    ones = np.ones(N_EMBD, dtype=np.float32)
    # Tied output: logits are the embeddings times the normed state, spread enough (std ~2.4)
    # that greedy decoding wanders through the vocabulary instead of repeating one token.
    w.add_tensor("token_embd.weight", _q8(rng, n_vocab, N_EMBD, 0.3), raw_dtype=Q8_0)
    w.add_tensor("output_norm.weight", ones)
    kv = N_HEAD_KV * head_dim
    for i in range(N_LAYER):
        b = f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", ones)
        w.add_tensor(b + "attn_q.weight", _q8(rng, N_EMBD, N_EMBD, 0.1), raw_dtype=Q8_0)
        w.add_tensor(b + "attn_k.weight", _q8(rng, kv, N_EMBD, 0.1), raw_dtype=Q8_0)
        w.add_tensor(b + "attn_v.weight", _q8(rng, kv, N_EMBD, 0.1), raw_dtype=Q8_0)
        w.add_tensor(b + "attn_output.weight", _q8(rng, N_EMBD, N_EMBD, 0.1), raw_dtype=Q8_0)
        w.add_tensor(b + "ffn_norm.weight", ones)
        w.add_tensor(b + "ffn_gate.weight", _q8(rng, N_FF, N_EMBD, 0.1), raw_dtype=Q8_0)
        w.add_tensor(b + "ffn_up.weight", _q8(rng, N_FF, N_EMBD, 0.1), raw_dtype=Q8_0)
        w.add_tensor(b + "ffn_down.weight", _q8(rng, N_EMBD, N_FF, 0.1), raw_dtype=Q8_0)
    path.parent.mkdir(parents=True, exist_ok=True)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def main(argv: list[str] | None = None) -> int:
    from innkeeper.models.store import default_model_path

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m bench.fast_model OUT.gguf", file=sys.stderr)
        return 2
    print(write_fast_model(Path(args[0]), default_model_path()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
