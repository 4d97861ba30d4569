"""Models with the shapes of real ones for the GPU bench, written in seconds, a few MB on disk.

Speed and memory depend on tensor shapes and types, not on the weights' values, so a GGUF with
an 8B model's shapes stands in for one: the file's data region is a hole (all-zero weights,
which llama.cpp computes with as with any others), and the tokenizer is the embedded SmolLM2's,
so both servers can take text. Every shape therefore has SmolLM2's 49,152-token vocabulary.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from tests.models import gguf_factory


@dataclass(frozen=True)
class BenchShape:
    """A model's layer shapes: width, depth, heads, KV heads, feed-forward, tied output."""

    description: str
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_ff: int
    tied: bool


SHAPES = {
    "8b": BenchShape("Llama-3.1-8B shape", 4096, 32, 32, 8, 14336, tied=False),
    "1b": BenchShape("Llama-3.2-1B shape", 2048, 16, 32, 8, 8192, tied=True),
    "tiny": BenchShape("SmolLM2-135M shape", 576, 30, 9, 3, 1536, tied=True),
}
CTX = 8192  # the trained context written into every file


@functools.cache
def _tokenizer(template: Path) -> gguf_factory.Tokenizer:
    return gguf_factory.read_tokenizer(template)


def write_model(name: str, folder: Path, template: Path) -> Path:
    """`folder/synthetic-<name>.Q4_0.gguf` with the shape `name` and `template`'s tokenizer."""
    shape = SHAPES[name]
    tokenizer = _tokenizer(template)
    spec = gguf_factory.Shape(
        "llama",
        shape.n_layer,
        shape.n_embd,
        shape.n_head,
        shape.n_head_kv,
        shape.n_embd // shape.n_head,
        shape.n_ff,
        gguf_factory.vocab_size(tokenizer),
        CTX,
        tied=shape.tied,
    )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"synthetic-{name}.Q4_0.gguf"
    # file_type 2: "mostly Q4_0", as llama-quantize labels such a file
    return gguf_factory.write_shape(path, spec, gguf_factory.Q.Q4_0, 2, tokenizer=tokenizer)
