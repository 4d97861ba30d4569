"""Vision projectors (`mmproj*.gguf`): which one belongs to a model, and what it costs.

Pure file logic (no engine), so `inspect`, the memory plan and the serving catalog all pair a
model with its projector by the same rule.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

from innkeeper.models.filenames import quant_label, shard_of, unsharded
from innkeeper.models.gguf_header import read_header
from innkeeper.models.sources import FileSource
from innkeeper.models.spec import ModelFormatError

log = logging.getLogger("innkeeper.models")


def is_projector(p: Path) -> bool:
    """An `mmproj*.gguf` file name (how llama.cpp's converters and hub repos name them)."""
    return p.name.lower().startswith("mmproj") and p.name.lower().endswith(".gguf")


def models_in(folder: Path) -> list[Path]:
    """The first GGUF of each model in one folder (projectors and later split parts skipped)."""
    out = []
    for p in sorted(folder.glob("*.gguf")):
        if is_projector(p) or not p.is_file():
            continue
        shard = shard_of(p.name)
        if shard and shard[0] != 1:
            continue
        out.append(p)
    return out


def _name_key(name: str) -> str:
    """A file name without `.gguf`, `mmproj`, its quantization label and separators, for
    telling which projector belongs to which model in a folder of several."""
    stem = unsharded(name).lower().removesuffix(".gguf").replace("mmproj", "")
    label = quant_label(name)
    if label:
        stem = stem.replace(label.lower(), "")
    return "".join(c for c in stem if c.isalnum())


def projector_for(model: Path) -> Path | None:
    """The vision projector beside a model file: the folder's mmproj*.gguf when the folder
    holds this one model (a downloaded repo, a one-model subfolder), else the one whose name
    is the model's (`mmproj-gemma-3-4b-f16.gguf` for `gemma-3-4b-Q4_K_M.gguf`)."""
    try:
        projs = sorted(p for p in model.parent.iterdir() if is_projector(p) and p.is_file())
    except OSError:
        return None
    if not projs:
        return None
    key = _name_key(model.name)
    named = [p for p in projs if (k := _name_key(p.name)) and (key.startswith(k) or k in key)]
    if named:
        return named[0]
    if len(models_in(model.parent)) == 1:
        if len(projs) > 1:
            log.info("%s: several projectors beside it, using %s", model.name, projs[0].name)
        return projs[0]
    return None


# Output tokens per image relative to the ViT's patch grid, as llama.cpp's clip.cpp
# (clip_n_output_tokens) computes them for fixed-size projector types: the divisor of
# (image_size / patch_size)^2. Types that tile or resize by the image (qwen2vl, pixtral,
# minicpmv...) give a count that depends on the image: None.
_PATCH_MERGE = {"mlp": 1, "mlp_norm": 1, "ldp": 4, "ldpv2": 4, "gemma3": 16}


@dataclass(frozen=True)
class ProjectorInfo:
    """What `inspect` and the memory plan need from a projector's header."""

    path: Path
    projector_type: str
    image_tokens: int | None  # per image; None: it depends on the image
    tensor_bytes: int  # its weights, loaded whole on one device
    compute_bytes: int  # estimated graph buffer for encoding one image

    def to_json(self) -> dict[str, object]:
        return {
            "projector": str(self.path),
            "projector_type": self.projector_type,
            "image_tokens": self.image_tokens,
            "tensor_bytes": self.tensor_bytes,
            "compute_bytes": self.compute_bytes,
        }


def _uint(meta: dict[str, object], key: str) -> int:
    v = meta.get(key)
    return int(v) if isinstance(v, int) and not isinstance(v, bool) and v > 0 else 0


def read_projector(path: Path) -> ProjectorInfo:
    """Read a projector's header (never its tensor data). Raises ModelFormatError."""
    with FileSource(path) as src:
        header = read_header(src)
    meta = header.metadata
    ptype = str(meta.get("clip.projector_type") or meta.get("clip.vision.projector_type") or "?")
    image, patch = _uint(meta, "clip.vision.image_size"), _uint(meta, "clip.vision.patch_size")
    grid = (image // patch) ** 2 if image and patch else 0
    tokens: int | None = None
    if grid and ptype in _PATCH_MERGE:
        tokens = grid // _PATCH_MERGE[ptype]
    elif grid and ptype in ("idefics3", "llama4"):
        scale = _uint(meta, "clip.vision.projector.scale_factor") or 1
        tokens = grid // (scale * scale)
    # One image's encoder graph, float32: ggml's allocator reuses buffers between layers, so
    # the peak is one layer's live activations: about 4 hidden-width and 2 FFN-width rows per
    # position, plus the attention scores (2 x heads x positions^2), plus the input image
    # (3 x image_size^2). Positions: the patch grid and a class token.
    n_pos = grid + 1
    n_embd = _uint(meta, "clip.vision.embedding_length")
    n_ff = _uint(meta, "clip.vision.feed_forward_length")
    n_head = _uint(meta, "clip.vision.attention.head_count") or 1
    compute = 4 * (n_pos * (4 * n_embd + 2 * n_ff) + 2 * n_head * n_pos * n_pos + 3 * image**2)
    return ProjectorInfo(path, ptype, tokens, sum(t.n_bytes for t in header.tensors), compute)


@functools.lru_cache(maxsize=16)
def _cached(path: str, size: int, mtime_ns: int) -> ProjectorInfo | None:
    try:
        return read_projector(Path(path))
    except (ModelFormatError, OSError) as exc:
        log.info("projector %s not counted in the memory plan: %s", path, exc)
        return None


def projector_cost(path: Path | None) -> ProjectorInfo | None:
    """The projector at `path` for the memory plan, read once per file version (the plan
    tries many context sizes and layer counts); None when there is none or it is unreadable."""
    if path is None:
        return None
    try:
        st = path.stat()
    except OSError:
        return None
    return _cached(str(path), st.st_size, st.st_mtime_ns)
