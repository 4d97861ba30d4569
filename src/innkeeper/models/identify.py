""" "What is this?" for a file, a folder or a hub repo id: format, quantization, architecture,
context, chat template, what is missing, and whether it is safe to load.

Each answer says how it was recognised (GGUF metadata, config.json, filename patterns), because
filenames lie more often than headers: the header wins when both speak.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from innkeeper.models import hub
from innkeeper.models.filenames import (
    FilenameHints,
    filename_hints,
    missing_shards,
    normalize_quant,
    shard_name,
)
from innkeeper.models.gguf_header import GGUFHeader, read_header
from innkeeper.models.gguf_meta import merge_split, read_gguf_spec
from innkeeper.models.hf_meta import (
    IncompleteConfigError,
    _is_exl2,
    chat_template_from,
    quantization_of,
    read_hf_dir,
    read_safetensors_header,
    spec_from_config,
)
from innkeeper.models.projector import ProjectorInfo, projector_for, read_projector
from innkeeper.models.safety import (
    PICKLE_SUFFIXES,
    SafetyReport,
    is_pickle_weights,
    safe_format_report,
    scan_pickle,
)
from innkeeper.models.sources import FileSource, require_regular_file
from innkeeper.models.spec import ModelFormatError, ModelSpec
from innkeeper.models.templates_detect import template_for_architecture

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tiktoken.model", "vocab.json")


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
    variants: list[hub.Variant] = field(default_factory=list)
    selected: str | None = None  # the variant inspected, by name
    selected_file: str | None = None  # its (first) file
    choice: str | None = None  # why that variant: hub.choose's reason
    warnings: list[str] = field(default_factory=list)
    vision: ProjectorInfo | None = None  # the projector beside a local GGUF model

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
            # what `serve` renders with when the file has no template (None: it has one)
            "chat_template_fallback": (
                template_for_architecture(s.architecture, s.n_vocab) or "alpaca"
            )
            if s and not s.chat_template
            else None,
            "complete": self.complete,
            "missing": self.missing,
            "safe": self.safety.safe,
            "safety": self.safety.to_json(),
            "filename_hints": self.hints.to_json(),
            "files": [{"name": n, "size_bytes": sz} for n, sz in self.files],
            "variants": [v.to_json() for v in self.variants],
            "selected": self.selected,
            "selected_file": self.selected_file,
            "selected_because": self.choice,
            "warnings": self.warnings,
            "vision": self.vision.to_json() if self.vision else None,
        }


# ---- local ---------------------------------------------------------------------------------


def _identify_gguf_file(path: Path, ident: Identification) -> None:
    ident.format = "gguf"
    ident.recognized_by.append("GGUF magic and header")
    hints = filename_hints(path.name)
    if hints.shard and hints.shard[1] > 1:
        parts = [
            path.with_name(shard_name(path.name, i, hints.shard[1]))
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
            and hints.quantization.removeprefix("UD-").split("_")[0] not in ident.spec.quantization
        ):
            ident.warnings.append(
                f"filename says {hints.quantization} but the header says {ident.spec.quantization}"
            )
    ident.safety = safe_format_report("GGUF")


def _find_projector(model: Path, ident: Identification) -> None:
    """Note the vision projector `serve` would pair with this model (same rule)."""
    proj = projector_for(model)
    if proj is None:
        return
    try:
        ident.vision = read_projector(proj)
    except (ModelFormatError, OSError) as exc:
        ident.warnings.append(f"projector {proj.name}: {exc}")


def _identify_pickle(path: Path, ident: Identification) -> None:
    ident.format = "pickle"
    ident.recognized_by.append(f"PyTorch pickle ({path.suffix or 'content'})")
    ident.safety = scan_pickle(path)
    ident.files = [(path.name, path.stat().st_size)] if path.is_file() else ident.files


def _local_spec(folder: Path, variant: hub.Variant) -> ModelSpec:
    """A local variant's spec (every part's tensors), for `hub.choose` to plan with."""
    sub = Identification(str(folder / variant.main_file), "file", "gguf")
    _identify_gguf_file(folder / variant.main_file, sub)
    if sub.spec is None:
        raise ModelFormatError(f"{folder / variant.main_file}: the first part is missing")
    return sub.spec


def _identify_dir(path: Path, ident: Identification, machine: hub.Machine | None) -> None:
    files = sorted((p.name, p.stat().st_size) for p in path.iterdir() if p.is_file())
    ident.files = files
    names = [n for n, _ in files]
    ggufs = hub.gguf_variants([hub.RepoFile(n, size) for n, size in files])
    if ggufs:
        # the same choice as for a hub repo: the largest that fits, else the default
        choice = hub.choose(
            ggufs, where=str(path), machine=machine, read_spec=lambda v: _local_spec(path, v)
        )
        chosen = choice.variant
        ident.variants = ggufs
        ident.selected, ident.selected_file = chosen.name, chosen.main_file
        ident.choice = choice.reason
        sub = Identification(
            str(path / chosen.main_file), "file", "gguf", hints=filename_hints(chosen.main_file)
        )
        _identify_gguf_file(path / chosen.main_file, sub)
        ident.format, ident.spec, ident.quantization = "gguf", sub.spec, sub.quantization
        ident.recognized_by = [*sub.recognized_by, f"{len(ggufs)} GGUF variant(s) in the folder"]
        ident.missing = sub.missing
        ident.safety = safe_format_report("GGUF")
        _find_projector(path / chosen.main_file, ident)
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
    ident.missing.extend(missing_shards(names))
    if index:
        wm = index.get("weight_map")
        if isinstance(wm, dict):
            for shard in sorted({v for v in wm.values() if isinstance(v, str)}):
                if shard not in names and shard not in ident.missing:
                    ident.missing.append(shard)


def identify_path(path: Path, machine: hub.Machine | None = None) -> Identification:
    """Identify a local file or folder; a folder of GGUF variants is read at the variant
    `hub.choose` picks for `machine` (this machine with serve's defaults when None)."""
    path = Path(path)
    if not path.exists():
        raise ModelFormatError(f"{path} does not exist")
    require_regular_file(path)
    ident = Identification(str(path), "directory" if path.is_dir() else "file", "unknown")
    ident.hints = filename_hints(path.name)
    if path.is_dir():
        _identify_dir(path, ident, machine or hub.detected_machine())
        return ident
    head = path.open("rb").read(8)
    if head[:4] == b"GGUF":
        _identify_gguf_file(path, ident)
        _find_projector(path, ident)
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


def identify_repo(text: str, machine: hub.Machine | None = None) -> Identification:
    """Identify a hub repo (`owner/name`, `owner/name:QUANT`, `owner/name/file.gguf`) from its
    listing and headers read by range requests; a GGUF repo is read at the variant
    `hub.choose` picks for `machine` (this machine with serve's defaults when None), the file
    `pull` would fetch."""
    try:
        ref = hub.parse_ref(text)
        listing = hub.list_repo(ref.repo_id, ref.revision)
    except hub.HubError as exc:
        raise ModelFormatError(str(exc)) from exc
    repo_id = ref.repo_id
    files = sorted((f.path, f.size) for f in listing.files)
    sizes = dict(files)
    ident = Identification(text, "hub", "unknown", files=files, hints=filename_hints(repo_id))
    names = [n for n, _ in files]
    ggufs = hub.gguf_variants(listing.files)
    if ref.filename is not None and not any(f.path == ref.filename for v in ggufs for f in v.files):
        raise ModelFormatError(
            f"{repo_id} has no GGUF file {ref.filename!r}: name the repo or one of its .gguf files"
        )
    if ggufs:
        try:
            choice = hub.choose(
                ggufs,
                where=repo_id,
                quant=ref.quant,
                filename=ref.filename,
                machine=machine or hub.detected_machine(),
                read_spec=lambda v: hub.read_spec(listing, v),
            )
        except hub.HubError as exc:
            raise ModelFormatError(str(exc)) from exc
        chosen = choice.variant
        ident.variants = ggufs
        ident.format = "gguf"
        ident.selected, ident.selected_file = chosen.name, chosen.main_file
        ident.choice = choice.reason
        ident.spec = choice.spec or hub.read_spec(listing, chosen)
        ident.quantization = ident.spec.quantization
        ident.recognized_by += [
            "GGUF header read by HTTP range requests",
            ident.spec.quantization_source or "GGUF metadata",
            f"{len(ggufs)} GGUF variant(s) in the repo",
        ]
        ident.missing = missing_shards([f.path for f in chosen.files])
        ident.warnings += [
            f"{v.name} lacks shard(s) {', '.join(map(str, v.missing_shards))} in the repo"
            for v in ggufs
            if v.missing_shards and v is not chosen
        ]
        ident.safety = safe_format_report("GGUF")
        return ident
    if ref.quant is not None:
        raise ModelFormatError(
            f"{repo_id} has no GGUF files, so there is no {normalize_quant(ref.quant)} to pick"
        )
    if "config.json" in sizes:
        cfg = hub.read_json(listing, "config.json")
        ident.recognized_by.append("config.json")
        st_files = [n for n in names if n.endswith(".safetensors") and "/" not in n]
        tensors = []
        for n in st_files:
            f = listing.get(n)
            if f is not None:
                tensors.extend(read_safetensors_header(hub.source(listing, f)))
        if st_files:
            ident.recognized_by.append("safetensors headers read by HTTP range requests")
        tok = (
            hub.read_json(listing, "tokenizer_config.json")
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
            hub.read_json(listing, "model.safetensors.index.json")
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


def identify(target: str | Path, machine: hub.Machine | None = None) -> Identification:
    """Identify a local path, a model name `serve` accepts (the embedded model's served name or
    a store name from `innkeeper models`), or a hub reference, in that order.

    Where there are several GGUF variants, `machine` is what `hub.choose` picks for (this
    machine with serve's defaults when None), exactly as `pull` does.
    """
    from innkeeper.models import store

    text = str(target)
    if Path(text).expanduser().exists():
        return identify_path(Path(text).expanduser(), machine)
    if store.is_embedded_name(text):
        return identify_path(store.default_model_path())
    if text.strip() and "/" not in text:
        try:
            return identify_path(store.find_in_store(text).path)
        except store.UnknownModelNameError:
            known = [e.name for e in store.list_models()] + [store.embedded_model_name()]
            raise ModelFormatError(
                f"{text!r} is neither a local file or folder, a model name ({', '.join(known)})"
                " nor a hub repo id (owner/name)"
            ) from None
        except store.ModelNotFoundError as exc:  # a store entry that cannot be used
            raise ModelFormatError(str(exc)) from None
    try:
        hub.parse_ref(text)
    except hub.HubRefError:
        raise ModelFormatError(
            f"{text!r} is neither a local file or folder, a model name (innkeeper models)"
            " nor a hub repo id (owner/name)"
        ) from None
    return identify_repo(text, machine)
