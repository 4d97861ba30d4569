"""Write a tiny vision model pair llama.cpp and libmtmd really run: a text model and a projector.

The text model is llama.cpp's `llama` architecture at toy size with the embedded SmolLM2's
tokenizer and chat template (so chat requests render as they do for the real model); the
projector is LLaVA-1.5's (`clip.projector_type = mlp`: a CLIP ViT, then a two-layer MLP into
the text model's embedding width), which libmtmd evaluates with ordinary causal attention.
Weights are random but seeded, so the same files give the same tokens on every run, and an
independent evaluation (libmtmd's own helper) can be compared against innkeeper's scheduler.

    python -m tests.models.vision_factory DIR   # writes DIR/tiny-vision.gguf, DIR/mmproj-tiny-vision.gguf
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from gguf import GGUFWriter

from tests.models.gguf_factory import read_tokenizer, vocab_size, write_tokenizer

TEXT_EMBD = 64
IMAGE_SIZE = 32  # pixels per side the projector resizes every image to
PATCH = 8  # -> (32/8)^2 = 16 image tokens per image
N_IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2


def _rand(rng: np.random.Generator, *shape: int, scale: float = 0.2) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def write_text_model(path: Path, tokenizer_source: Path, *, seed: int = 7) -> Path:
    """A 2-layer llama with the tokenizer (and chat template) of `tokenizer_source`."""
    tok = read_tokenizer(tokenizer_source)
    n_vocab = vocab_size(tok)
    E, n_layer, n_head, n_ff = TEXT_EMBD, 2, 4, 128
    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), "llama")
    w.add_name("tiny-vision-test")
    a = "llama"
    w.add_uint32(f"{a}.block_count", n_layer)
    w.add_uint32(f"{a}.context_length", 2048)
    w.add_uint32(f"{a}.embedding_length", E)
    w.add_uint32(f"{a}.feed_forward_length", n_ff)
    w.add_uint32(f"{a}.attention.head_count", n_head)
    w.add_uint32(f"{a}.attention.head_count_kv", n_head)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_uint32(f"{a}.rope.dimension_count", E // n_head)
    w.add_float32(f"{a}.rope.freq_base", 10000.0)
    w.add_uint32(f"{a}.vocab_size", n_vocab)
    w.add_file_type(1)  # mostly F16
    write_tokenizer(w, tok)
    # Tied output (no output.weight): llama.cpp reuses the embedding table, half the file.
    w.add_tensor("token_embd.weight", _rand(rng, n_vocab, E, scale=1.0).astype(np.float16))
    w.add_tensor("output_norm.weight", (1.0 + 0.1 * rng.standard_normal(E)).astype(np.float32))
    for i in range(n_layer):
        b = f"blk.{i}."
        w.add_tensor(b + "attn_norm.weight", np.ones(E, np.float32))
        for part in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(b + part + ".weight", _rand(rng, E, E))
        w.add_tensor(b + "ffn_norm.weight", np.ones(E, np.float32))
        w.add_tensor(b + "ffn_gate.weight", _rand(rng, n_ff, E))
        w.add_tensor(b + "ffn_up.weight", _rand(rng, n_ff, E))
        w.add_tensor(b + "ffn_down.weight", _rand(rng, E, n_ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_projector(path: Path, *, seed: int = 11, n_out: int = TEXT_EMBD) -> Path:
    """A LLaVA-1.5-shaped projector (CLIP ViT + MLP) whose output width is `n_out` (the
    text model's width; another one makes a projector libmtmd refuses for this model)."""
    V, n_layer, n_head, n_ff = 32, 2, 2, 64
    n_pos = N_IMAGE_TOKENS + 1  # the class embedding's position too
    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), "clip")
    w.add_name("tiny-vision-test-mmproj")
    w.add_string("clip.projector_type", "mlp")
    w.add_bool("clip.has_vision_encoder", True)
    w.add_bool("clip.has_text_encoder", False)
    w.add_bool("clip.use_gelu", True)
    w.add_uint32("clip.vision.image_size", IMAGE_SIZE)
    w.add_uint32("clip.vision.patch_size", PATCH)
    w.add_uint32("clip.vision.embedding_length", V)
    w.add_uint32("clip.vision.feed_forward_length", n_ff)
    w.add_uint32("clip.vision.projection_dim", n_out)
    w.add_uint32("clip.vision.attention.head_count", n_head)
    w.add_float32("clip.vision.attention.layer_norm_epsilon", 1e-5)
    w.add_uint32("clip.vision.block_count", n_layer)
    w.add_array("clip.vision.image_mean", [0.48145466, 0.4578275, 0.40821073])
    w.add_array("clip.vision.image_std", [0.26862954, 0.26130258, 0.27577711])
    w.add_file_type(1)

    def norm(name: str, n: int) -> None:
        w.add_tensor(f"{name}.weight", (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32))
        w.add_tensor(f"{name}.bias", _rand(rng, n, scale=0.05))

    # Conv kernel in numpy order [out, in, kh, kw] (GGML's {kw, kh, in, out}); F16 as converters write it.
    w.add_tensor("v.patch_embd.weight", _rand(rng, V, 3, PATCH, PATCH).astype(np.float16))
    w.add_tensor("v.class_embd", _rand(rng, V))
    w.add_tensor("v.position_embd.weight", _rand(rng, n_pos, V, scale=0.1))
    norm("v.pre_ln", V)
    for i in range(n_layer):
        b = f"v.blk.{i}."
        for part in ("attn_q", "attn_k", "attn_v", "attn_out"):
            w.add_tensor(b + part + ".weight", _rand(rng, V, V))
            w.add_tensor(b + part + ".bias", _rand(rng, V, scale=0.05))
        norm(b + "ln1", V)
        norm(b + "ln2", V)
        w.add_tensor(b + "ffn_up.weight", _rand(rng, n_ff, V))
        w.add_tensor(b + "ffn_up.bias", _rand(rng, n_ff, scale=0.05))
        w.add_tensor(b + "ffn_down.weight", _rand(rng, V, n_ff))
        w.add_tensor(b + "ffn_down.bias", _rand(rng, V, scale=0.05))
    w.add_tensor("mm.0.weight", _rand(rng, n_out, V))
    w.add_tensor("mm.0.bias", _rand(rng, n_out, scale=0.05))
    w.add_tensor("mm.2.weight", _rand(rng, n_out, n_out, scale=0.5))
    w.add_tensor("mm.2.bias", _rand(rng, n_out, scale=0.05))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_pair(folder: Path) -> tuple[Path, Path]:
    """The text model and its projector in `folder`, named as Hugging Face repos name them."""
    from innkeeper.models.store import default_model_path

    folder.mkdir(parents=True, exist_ok=True)
    text = write_text_model(folder / "tiny-vision.gguf", default_model_path())
    proj = write_projector(folder / "mmproj-tiny-vision.gguf")
    return text, proj


if __name__ == "__main__":
    for p in write_pair(Path(sys.argv[1])):
        print(p)
