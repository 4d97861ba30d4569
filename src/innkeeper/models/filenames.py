"""What a model file's name says: quantization, shard number, context length, bits.

The one reader of file names. Hub variants (`hub.gguf_variants`), local folders and the hints
`inspect` prints all parse names here, so one file is never Q4_K_M to one command and unknown
to another. Headers win over names wherever both exist (see `identify`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath

# GGUF quantization labels as they appear in file names: Q4_K_M, IQ3_XXS, Q8_0, UD-Q4_K_XL,
# Q4_0_4_4, bare q5 (old GGML names), BF16, fp16...
QUANT_RE = re.compile(
    r"(?<![A-Za-z0-9])((?:UD-)?(?:I?Q[1-8](?:_[0-9A-Z]{1,3})*|TQ[12]_0|MXFP4(?:_MOE)?"
    r"|BF16|F16|F32|FP16|FP32))(?![A-Za-z0-9])",
    re.IGNORECASE,
)
# `model-00001-of-00003.gguf` / `.safetensors`: part 1 of 3, right before the extension.
SHARD_RE = re.compile(r"-(\d{5})-of-(\d{5})(?=\.[A-Za-z0-9]+$)")
BITS_RE = re.compile(r"(?i)(?<![a-z0-9.])(\d(?:\.\d+)?)\s*-?(bpw|bit|bits)(?![a-z])")
CTX_RE = re.compile(r"(?i)(?<![a-z0-9])(\d{1,4})k(?![a-z0-9])")
_CTX_KIB = (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def normalize_quant(label: str) -> str:
    """One spelling per quantization: upper case, `FP16` as `F16` (what llama.cpp calls it)."""
    upper = label.strip().upper()
    return {"FP16": "F16", "FP32": "F32"}.get(upper, upper)


def quant_label(path: str) -> str | None:
    """The quantization a file's name announces, else the nearest folder's (`Q4_K_M/x-1.gguf`).

    The last label in a name wins: `Model-Q8_0-Q4_K_M.gguf` was re-quantized to Q4_K_M.
    """
    for part in reversed(PurePosixPath(path).parts):
        found = QUANT_RE.findall(part.removesuffix(".gguf"))
        if found:
            return normalize_quant(found[-1])
    return None


def shard_of(name: str) -> tuple[int, int] | None:
    """(part, of) for a split file's name, None for a whole file."""
    m = SHARD_RE.search(name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def unsharded(name: str) -> str:
    """The name without its `-0000k-of-0000n` part: the same for every part of one split file."""
    return SHARD_RE.sub("", name)


def shard_name(name: str, part: int, total: int) -> str:
    """The name of another part of the split file `name` belongs to."""
    return SHARD_RE.sub(f"-{part:05d}-of-{total:05d}", name)


def missing_shards(names: list[str]) -> list[str]:
    """Names of the absent parts of every split set that has at least one part in `names`."""
    have = set(names)
    missing: list[str] = []
    for name in sorted(names):
        shard = shard_of(name)
        if shard is None:
            continue
        for part in range(1, shard[1] + 1):
            other = shard_name(name, part, shard[1])
            if other not in have and other not in missing:
                missing.append(other)
    return missing


@dataclass(frozen=True)
class FilenameHints:
    """What a filename alone suggests."""

    quantization: str | None = None
    context: int | None = None
    shard: tuple[int, int] | None = None
    bits: float | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "quantization": self.quantization,
            "context": self.context,
            "shard": list(self.shard) if self.shard else None,
            "bits": self.bits,
        }


def filename_hints(name: str) -> FilenameHints:
    """Parse `Q4_K_M`, `q5`, `-16k`, `4.0bpw`, `model-00001-of-00003` out of a filename."""
    base = PurePosixPath(name).name
    ctx = None
    for c in CTX_RE.finditer(base):
        if int(c.group(1)) in _CTX_KIB:
            ctx = int(c.group(1)) * 1024
    b = BITS_RE.search(base)
    return FilenameHints(quant_label(base), ctx, shard_of(base), float(b.group(1)) if b else None)
