""" "What is this?" for a file, a folder or a hub repo id: format, quantization, architecture,
context, chat template, what is missing, and whether it is safe to load.

Each answer says how it was recognised (GGUF metadata, config.json, filename patterns), because
filenames lie more often than headers: the header wins when both speak.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from innkeeper.models.gguf_meta import GGUFHeader, merge_split, read_gguf_spec, read_header
from innkeeper.models.gguf_meta import spec_from_header as gguf_spec_from_header
from innkeeper.models.hf_meta import (
    IncompleteConfigError,
    _is_exl2,
    chat_template_from,
    quantization_of,
    read_hf_dir,
    read_safetensors_header,
    spec_from_config,
)
from innkeeper.models.safety import (
    PICKLE_SUFFIXES,
    SafetyReport,
    is_pickle_weights,
    safe_format_report,
    scan_pickle,
)
from innkeeper.models.sources import FileSource, HubSource, hub_endpoint
from innkeeper.models.spec import ModelFormatError, ModelSpec

REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
QUANT_RE = re.compile(
    r"(?i)(?<![a-z0-9])("
    r"IQ[1-4]_(?:XXS|XS|S|M|NL)|Q[2-6]_K(?:_(?:S|M|L|XL))?|Q[4-8]_[01]|Q8_K|TQ[12]_0|MXFP4(?:_MOE)?"
    r"|BF16|F16|FP16|F32|FP32"
    r")(?![a-z0-9])"
)
LOOSE_QUANT_RE = re.compile(r"(?i)(?<![a-z0-9])(q[2-8])(?![a-z0-9_])")
BITS_RE = re.compile(r"(?i)(?<![a-z0-9.])(\d(?:\.\d+)?)\s*-?(bpw|bit|bits)(?![a-z])")
CTX_RE = re.compile(r"(?i)(?<![a-z0-9])(\d{1,4})k(?![a-z0-9])")
SHARD_RE = re.compile(r"-(\d{5})-of-(\d{5})(?=\.)")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tiktoken.model", "vocab.json")


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
    base = Path(name).name
    quant = None
    m = QUANT_RE.search(base)
    if m:
        quant = m.group(1).upper().replace("FP16", "F16").replace("FP32", "F32")
    else:
        loose = LOOSE_QUANT_RE.search(base)
        quant = loose.group(1).upper() if loose else None
    ctx = None
    for c in CTX_RE.finditer(base):
        value = int(c.group(1))
        if value in (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024):
            ctx = value * 1024
    shard = None
    s = SHARD_RE.search(base)
    if s:
        shard = (int(s.group(1)), int(s.group(2)))
    bits = None
    b = BITS_RE.search(base)
    if b:
        bits = float(b.group(1))
    return FilenameHints(quant, ctx, shard, bits)


@dataclass(frozen=True)
class Variant:
    """One loadable choice in a folder or repo: a GGUF quantization (maybe split in parts)."""

    name: str
    files: tuple[str, ...]
    size_bytes: int
    quantization: str | None

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "files": list(self.files),
            "size_bytes": self.size_bytes,
            "quantization": self.quantization,
        }


@dataclass
class Identification:
    """The answer to "what is this?"."""

    target: str
    kind: str  # "file" | "directory" | "hub"
    format: str
    recognized_by: list[str] = field(default_factory=list)
    spec: ModelSpec | None = None
    quantization: str | None = None
    hints: FilenameHints = field(default_factory=FilenameHints)
    files: list[tuple[str, int]] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    safety: SafetyReport = field(default_factory=lambda: SafetyReport(True, "safe"))
    variants: list[Variant] = field(default_factory=list)
    selected: str | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.missing

    def to_json(self) -> dict[str, Any]:
        s = self.spec
        return {
            "target": self.target,
            "kind": self.kind,
            "format": self.format,
            "recognized_by": self.recognized_by,
            "quantization": self.quantization,
            "bits_per_weight": round(s.bits_per_weight, 3) if s and s.bits_per_weight else None,
            "architecture": s.architecture if s else None,
            "name": s.name if s else None,
            "parameters": s.parameters if s else None,
            "context_length": s.context_length if s else self.hints.context,
            "rope_scaling": (
                {
                    "type": s.rope_scaling.kind,
                    "factor": s.rope_scaling.factor,
                    "original_context": s.rope_scaling.original_context,
                }
                if s and s.rope_scaling
                else None
            ),
            "layers": s.n_layer if s else None,
            "embedding_length": s.n_embd if s else None,
            "heads": s.n_head if s else None,
            "kv_heads": (list(s.n_head_kv) if isinstance(s.n_head_kv, tuple) else s.n_head_kv)
            if s
            else None,
            "head_dim": s.head_dim_k if s else None,
            "head_dim_v": s.head_dim_v if s else None,
            "vocab_size": s.n_vocab if s else None,
            "sliding_window": s.sliding_window if s else None,
            "swa_layers": sum(s.swa_layers) if s and s.swa_layers else 0,
            "experts": s.n_expert if s else 0,
            "experts_used": s.n_expert_used if s else 0,
            "mla": s.mla if s else False,
            "weights_bytes": s.weight_bytes if s else None,
            "chat_template_name": s.chat_template_name if s else None,
            "has_chat_template": bool(s and s.chat_template),
            "complete": self.complete,
            "missing": self.missing,
            "safe": self.safety.safe,
            "safety": self.safety.to_json(),
            "filename_hints": self.hints.to_json(),
            "files": [{"name": n, "size_bytes": sz} for n, sz in self.files],
            "variants": [v.to_json() for v in self.variants],
            "selected": self.selected,
            "warnings": self.warnings,
        }


# ---- GGUF grouping -------------------------------------------------------------------------


def group_gguf(files: list[tuple[str, int]]) -> list[Variant]:
    """Group GGUF filenames into variants: split parts together, mmproj files left out."""
    groups: dict[str, list[tuple[str, int]]] = {}
    for name, size in files:
        base = Path(name).name.lower()
        if not base.endswith(".gguf") or base.startswith("mmproj") or "mmproj" in base:
            continue
        key = SHARD_RE.sub("", name)
        groups.setdefault(key, []).append((name, size))
    variants = []
    for key, parts in groups.items():
        parts.sort()
        variants.append(
            Variant(
                name=Path(key).name.removesuffix(".gguf"),
                files=tuple(n for n, _ in parts),
                size_bytes=sum(sz for _, sz in parts),
                quantization=filename_hints(key).quantization,
            )
        )
    variants.sort(key=lambda v: v.size_bytes)
    return variants


def _missing_shards(names: list[str]) -> list[str]:
    """Parts of `-0000k-of-0000n` sets that are absent."""
    missing = []
    sets: dict[tuple[str, int], set[int]] = {}
    for n in names:
        m = SHARD_RE.search(n)
        if m:
            sets.setdefault(
                (SHARD_RE.sub("-{:05d}-of-" + m.group(2), n), int(m.group(2))), set()
            ).add(int(m.group(1)))
    for (pattern, total), have in sets.items():
        for i in range(1, total + 1):
            if i not in have:
                missing.append(pattern.format(i))
    return missing


# ---- local ---------------------------------------------------------------------------------


def _identify_gguf_file(path: Path, ident: Identification) -> None:
    ident.format = "gguf"
    ident.recognized_by.append("GGUF magic and header")
    hints = filename_hints(path.name)
    if hints.shard and hints.shard[1] > 1:
        parts = [
            path.with_name(SHARD_RE.sub(f"-{i:05d}-of-{hints.shard[1]:05d}", path.name))
            for i in range(1, hints.shard[1] + 1)
        ]
        present = [p for p in parts if p.is_file()]
        ident.missing.extend(p.name for p in parts if not p.is_file())
        first = parts[0]
        if first.is_file():
            spec = read_gguf_spec(first)
            others: list[GGUFHeader] = []
            for p in present[1:]:
                with FileSource(p) as src:
                    others.append(read_header(src))
            ident.spec = merge_split(spec, others)
            ident.recognized_by.append(f"split GGUF, {len(present)} of {hints.shard[1]} parts")
        else:
            ident.warnings.append("the first part, which holds the metadata, is missing")
        ident.files = [(p.name, p.stat().st_size) for p in present]
    else:
        ident.spec = read_gguf_spec(path)
        ident.files = [(path.name, path.stat().st_size)]
    if ident.spec:
        ident.quantization = ident.spec.quantization
        ident.recognized_by.append(ident.spec.quantization_source or "GGUF metadata")
        if (
            hints.quantization
            and ident.spec.quantization
            and (hints.quantization.split("_")[0] not in ident.spec.quantization)
        ):
            ident.warnings.append(
                f"filename says {hints.quantization} but the header says {ident.spec.quantization}"
            )
    ident.safety = safe_format_report("GGUF")


def _identify_pickle(path: Path, ident: Identification) -> None:
    ident.format = "pickle"
    ident.recognized_by.append(f"PyTorch pickle ({path.suffix or 'content'})")
    ident.safety = scan_pickle(path)
    ident.files = [(path.name, path.stat().st_size)] if path.is_file() else ident.files


def _identify_dir(path: Path, ident: Identification) -> None:
    files = sorted((p.name, p.stat().st_size) for p in path.iterdir() if p.is_file())
    ident.files = files
    names = [n for n, _ in files]
    ggufs = group_gguf(files)
    if ggufs:
        ident.variants = ggufs
        chosen = ggufs[-1]
        ident.selected = chosen.name
        sub = Identification(
            str(path / chosen.files[0]), "file", "gguf", hints=filename_hints(chosen.files[0])
        )
        _identify_gguf_file(path / chosen.files[0], sub)
        ident.format, ident.spec, ident.quantization = "gguf", sub.spec, sub.quantization
        ident.recognized_by = [*sub.recognized_by, f"{len(ggufs)} GGUF variant(s) in the folder"]
        ident.missing = sub.missing
        ident.safety = safe_format_report("GGUF")
        return
    has_st = any(n.endswith(".safetensors") for n in names)
    if (path / "config.json").is_file():
        ident.recognized_by.append("config.json")
    if has_st:
        ident.recognized_by.append("safetensors headers")
        try:
            ident.spec = read_hf_dir(path)
            ident.format = ident.spec.format
            ident.quantization = ident.spec.quantization
            if ident.spec.quantization_source and ident.spec.format != "safetensors":
                ident.recognized_by.append(ident.spec.quantization_source)
        except IncompleteConfigError as exc:
            ident.warnings.append(str(exc))
            ident.format = "safetensors"
        if ident.format == "exl2":
            ident.recognized_by.append("EXL2 markers (measurement.json / q_invperm tensors)")
        ident.safety = safe_format_report("safetensors")
    elif is_pickle_weights(path):
        ident.format = "pickle"
        ident.recognized_by.append("PyTorch pickle weights")
        ident.safety = scan_pickle(path)
        if (path / "config.json").is_file():
            try:
                ident.spec = read_hf_dir_config_only(path)
            except ModelFormatError as exc:
                ident.warnings.append(str(exc))
    else:
        ident.format = "unknown"
        ident.missing.append("model weights (.gguf, .safetensors or .bin)")
        return
    _hf_completeness(names, ident, index=_load_index(path))


def read_hf_dir_config_only(path: Path) -> ModelSpec:
    from innkeeper.models.hf_meta import load_json

    return spec_from_config(
        load_json(path / "config.json", "config.json"), where=str(path / "config.json")
    )


def _load_index(path: Path) -> dict[str, Any] | None:
    from innkeeper.models.hf_meta import load_json

    for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / name).is_file():
            return load_json(path / name, name)
    return None


def _hf_completeness(names: list[str], ident: Identification, index: dict[str, Any] | None) -> None:
    if "config.json" not in names:
        ident.missing.append("config.json")
    if not any(t in names for t in TOKENIZER_FILES):
        ident.missing.append("tokenizer (tokenizer.json or tokenizer.model)")
    ident.missing.extend(_missing_shards(names))
    if index:
        wm = index.get("weight_map")
        if isinstance(wm, dict):
            for shard in sorted({v for v in wm.values() if isinstance(v, str)}):
                if shard not in names and shard not in ident.missing:
                    ident.missing.append(shard)


def identify_path(path: Path) -> Identification:
    """Identify a local file or folder."""
    path = Path(path)
    if not path.exists():
        raise ModelFormatError(f"{path} does not exist")
    ident = Identification(str(path), "directory" if path.is_dir() else "file", "unknown")
    ident.hints = filename_hints(path.name)
    if path.is_dir():
        _identify_dir(path, ident)
        return ident
    head = path.open("rb").read(8)
    if head[:4] == b"GGUF":
        _identify_gguf_file(path, ident)
    elif path.suffix == ".safetensors":
        with FileSource(path) as src:
            tensors = read_safetensors_header(src)
        ident.format = "safetensors"
        ident.recognized_by.append("safetensors header")
        ident.files = [(path.name, path.stat().st_size)]
        cfg = path.parent / "config.json"
        if cfg.is_file():
            ident.spec = read_hf_dir(path.parent)
            ident.format = ident.spec.format
            ident.quantization = ident.spec.quantization
            ident.recognized_by.append("config.json beside it")
        else:
            ident.warnings.append(f"{len(tensors)} tensors, but no config.json beside the file")
            ident.missing.append("config.json")
        ident.safety = safe_format_report("safetensors")
    elif path.suffix.lower() in PICKLE_SUFFIXES or is_pickle_weights(path):
        _identify_pickle(path, ident)
        ident.quantization = ident.hints.quantization
    else:
        raise ModelFormatError(
            f"{path}: not a model file I recognise (expected .gguf, .safetensors or a pickle)"
        )
    return ident


# ---- hub -----------------------------------------------------------------------------------


def is_repo_id(text: str) -> bool:
    """`owner/name` (optionally `:QUANT`) that is not an existing local path."""
    return bool(REPO_ID_RE.match(text.split(":", 1)[0])) and not Path(text).exists()


def list_hub_files(repo_id: str, revision: str | None = None) -> list[tuple[str, int]]:
    """Every file of a hub repo with its size, through huggingface_hub's tree listing."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    api = HfApi(endpoint=hub_endpoint())
    try:
        items = api.list_repo_tree(repo_id, recursive=True, revision=revision)
        return sorted((f.path, int(f.size or 0)) for f in items if isinstance(f, RepoFile))
    except Exception as exc:
        raise ModelFormatError(f"cannot list {repo_id} on the hub: {_hub_error(exc)}") from exc


def _hub_error(exc: Exception) -> str:
    name = type(exc).__name__
    if "RepositoryNotFound" in name:
        return "repository not found (or private: set HF_TOKEN)"
    if "GatedRepo" in name:
        return "access is gated: accept the license on the hub and set HF_TOKEN"
    return str(exc).splitlines()[0] if str(exc) else name


def _hub_json(repo_id: str, name: str, size: int, revision: str | None) -> dict[str, Any]:
    if size > 16 * 1024**2:
        raise ModelFormatError(f"{repo_id}/{name} is too large to be a config file")
    src = HubSource(repo_id, name, revision=revision, size=size)
    try:
        data = json.loads(src.read(0, size) or b"{}")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"{repo_id}/{name} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ModelFormatError(f"{repo_id}/{name} should be a JSON object")
    return data


def hub_gguf_spec(
    repo_id: str, variant: Variant, sizes: dict[str, int], revision: str | None = None
) -> ModelSpec:
    """The ModelSpec of one GGUF variant in a repo, from its headers read by range requests."""
    first = HubSource(
        repo_id, variant.files[0], revision=revision, size=sizes.get(variant.files[0])
    )
    spec = gguf_spec_from_header(read_header(first), first.name)
    if len(variant.files) > 1:
        others = [
            read_header(HubSource(repo_id, f, revision=revision, size=sizes.get(f)))
            for f in variant.files[1:]
        ]
        spec = merge_split(spec, others)
    return spec


def identify_repo(ref: str) -> Identification:
    """Identify a hub repo (`owner/name`, optionally `:QUANT` to pick a GGUF variant)."""
    repo_id, _, want = ref.partition(":")
    files = list_hub_files(repo_id)
    sizes = dict(files)
    ident = Identification(ref, "hub", "unknown", files=files, hints=filename_hints(repo_id))
    names = [n for n, _ in files]
    ggufs = group_gguf(files)
    if ggufs:
        ident.variants = ggufs
        ident.format = "gguf"
        chosen = _pick_variant(ggufs, want)
        ident.selected = chosen.name
        ident.spec = hub_gguf_spec(repo_id, chosen, sizes)
        ident.quantization = ident.spec.quantization
        ident.recognized_by += [
            "GGUF header read by HTTP range requests",
            ident.spec.quantization_source or "GGUF metadata",
            f"{len(ggufs)} GGUF variant(s) in the repo",
        ]
        ident.missing = _missing_shards([f for v in ggufs for f in v.files])
        ident.safety = safe_format_report("GGUF")
        return ident
    if "config.json" in sizes:
        cfg = _hub_json(repo_id, "config.json", sizes["config.json"], None)
        ident.recognized_by.append("config.json")
        st_files = [n for n in names if n.endswith(".safetensors") and "/" not in n]
        tensors = []
        for n in st_files:
            tensors.extend(read_safetensors_header(HubSource(repo_id, n, size=sizes[n])))
        if st_files:
            ident.recognized_by.append("safetensors headers read by HTTP range requests")
        tok = (
            _hub_json(repo_id, "tokenizer_config.json", sizes["tokenizer_config.json"], None)
            if "tokenizer_config.json" in sizes
            else None
        )
        fmt = "exl2" if "measurement.json" in sizes or _is_exl2(None, tensors) else None
        try:
            ident.spec = spec_from_config(
                cfg,
                tensors,
                None,
                where=f"{repo_id}/config.json",
                fmt=fmt,
                chat_template=chat_template_from(tok),
            )
            ident.format = ident.spec.format
            ident.quantization = ident.spec.quantization
        except IncompleteConfigError as exc:
            ident.warnings.append(str(exc))
            qfmt, qlabel, _ = quantization_of(cfg, f"{repo_id}/config.json")
            ident.format, ident.quantization = fmt or qfmt or "safetensors", qlabel
        if ident.format not in ("safetensors", "unknown"):
            ident.recognized_by.append("config.json quantization_config.quant_method")
        if not st_files:
            ident.format = "pickle"
        index = (
            _hub_json(
                repo_id, "model.safetensors.index.json", sizes["model.safetensors.index.json"], None
            )
            if "model.safetensors.index.json" in sizes
            else None
        )
        _hf_completeness(names, ident, index)
        if st_files:
            ident.safety = safe_format_report("safetensors")
        else:
            pickles = [n for n in names if Path(n).suffix in PICKLE_SUFFIXES]
            ident.safety = SafetyReport(
                False,
                "unscanned",
                scanner="picklescan (download needed to scan)",
                errors=(f"{len(pickles)} pickle file(s): scan after `innkeeper pull`",),
            )
        return ident
    ident.missing.append("model weights (.gguf, .safetensors) and config.json")
    return ident


def _pick_variant(variants: list[Variant], want: str) -> Variant:
    if not want:
        return variants[0]  # the smallest: all quants share one architecture header
    for v in variants:
        if (v.quantization or "").upper() == want.upper() or want.lower() in v.name.lower():
            return v
    raise ModelFormatError(
        f"no {want} file in this repo (has: {', '.join(v.quantization or v.name for v in variants)})"
    )


def identify(target: str | Path) -> Identification:
    """Identify a local path or a hub repo id."""
    text = str(target)
    if Path(text).expanduser().exists():
        return identify_path(Path(text).expanduser())
    if is_repo_id(text):
        return identify_repo(text)
    raise ModelFormatError(
        f"{text!r} is neither a local file or folder nor a hub repo id (owner/name)"
    )
