"""A repo's GGUF files grouped into variants: one per quantization, every shard of a split file
together, vision projectors and importance matrices left out. Names are read by `filenames`, the
one quantization parser, so `pull` and `inspect`'s filename hints agree."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from innkeeper.models.filenames import normalize_quant, quant_label, shard_of, unsharded
from innkeeper.models.hub.errors import HubError, MissingShardError, QuantNotFoundError
from innkeeper.models.hub.listing import RepoFile, RepoListing, format_bytes, source
from innkeeper.models.spec import ModelFormatError, ModelSpec

log = logging.getLogger("innkeeper.hub")


@dataclass(frozen=True)
class Variant:
    """One GGUF quantization of a repo or folder: one file, or every shard of a split file."""

    name: str  # the file name without shard suffix and .gguf: "Model-Q4_K_M"
    quantization: str | None  # what the name says (filenames.quant_label), None if nothing
    files: tuple[RepoFile, ...]
    missing_shards: tuple[int, ...] = ()
    shard_total: int = 1

    @property
    def label(self) -> str:
        """The quantization, else the name: what `repo:QUANT` matches and the store names."""
        return self.quantization or self.name

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def main_file(self) -> str:
        """The file a loader opens: the first shard (it holds the metadata)."""
        return self.files[0].path

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "files": [f.path for f in self.files],
            "size_bytes": self.size,
            "quantization": self.quantization,
        }


def gguf_variants(files: Sequence[RepoFile]) -> list[Variant]:
    """Group GGUF files by quantization, smallest first; shards of one split file stay together.

    Vision projectors (`mmproj`) and importance matrices are not model weights and are left out.
    """
    groups: dict[str, list[RepoFile]] = {}
    for f in files:
        base = f.path.rsplit("/", 1)[-1].lower()
        if not base.endswith(".gguf") or "mmproj" in base or "imatrix" in base:
            continue
        groups.setdefault(unsharded(f.path), []).append(f)
    variants = []
    for stem_path, members in groups.items():
        ordered = tuple(sorted(members, key=lambda f: f.path))
        shards = [s for f in ordered if (s := shard_of(f.path))]
        total = max((of for _, of in shards), default=1)
        have = {part for part, _ in shards}
        missing = tuple(i for i in range(1, total + 1) if i not in have) if total > 1 else ()
        name = stem_path.rsplit("/", 1)[-1][: -len(".gguf")]
        variants.append(Variant(name, quant_label(stem_path), ordered, missing, total))
    variants.sort(key=lambda v: (v.size, v.name))
    return variants


def read_spec(listing: RepoListing, variant: Variant) -> ModelSpec:
    """The ModelSpec of a GGUF variant from its headers alone (every shard's tensor table)."""
    from innkeeper.models.gguf_header import read_header
    from innkeeper.models.gguf_meta import merge_split, spec_from_header

    first = source(listing, variant.files[0])
    spec = spec_from_header(read_header(first), first.name)
    if len(variant.files) > 1:
        spec = merge_split(spec, [read_header(source(listing, f)) for f in variant.files[1:]])
    return spec


def check_shards(where: str, variant: Variant) -> None:
    """Refuse a split variant with shards missing from the repo: `pull` cannot make it whole."""
    if variant.missing_shards:
        shards = ", ".join(str(i) for i in variant.missing_shards)
        raise MissingShardError(
            f"{where}: {variant.label} is split in {variant.shard_total} files but shard(s)"
            f" {shards} are missing from the repo; pick another quantization"
        )


def _describe(variants: Sequence[Variant]) -> str:
    return ", ".join(f"{v.label} ({format_bytes(v.size)})" for v in variants)


def match_quant(where: str, quant: str, variants: Sequence[Variant]) -> Variant:
    """The one variant a typed quant names (any case; `UD-` quants also by their bare name)."""
    wanted = normalize_quant(quant)
    exact = [v for v in variants if v.label.upper() == wanted]
    if not exact:
        exact = [v for v in variants if v.label.upper().removeprefix("UD-") == wanted]
    if len(exact) == 1:
        return exact[0]
    if len(exact) > 1:
        names = ", ".join(v.main_file for v in exact)
        raise QuantNotFoundError(
            f"{where}: several files are {quant} ({names}); name one as {where}/FILE"
        )
    raise QuantNotFoundError(f"{where} has no {quant} file; it has: {_describe(variants)}")


# The projector precision to fetch when a repo offers several: F16 runs on every backend
# (BF16 does not on all of them), then the smallest of the rest.
_PROJECTOR_PREFERENCE = ("F16", "BF16", "Q8_0", "F32")


def projector_of(listing: RepoListing, main_file: str) -> RepoFile | None:
    """The vision projector (`mmproj*.gguf`) to fetch with the model `main_file`: one from
    the same folder, so it lands beside the model and `serve` pairs it (models/projector),
    and only a real one (a `clip` GGUF, by its header: one small ranged read)."""
    from innkeeper.models.gguf_header import read_header

    folder = main_file.rsplit("/", 1)[0] if "/" in main_file else ""

    def here(f: RepoFile) -> bool:
        parent, _, base = f.path.rpartition("/")
        return parent == folder and base.lower().startswith("mmproj") and base.endswith(".gguf")

    def rank(f: RepoFile) -> tuple[int, int, str]:
        label = normalize_quant(quant_label(f.path) or "")
        pref = _PROJECTOR_PREFERENCE
        return (pref.index(label) if label in pref else len(pref), f.size, f.path)

    for f in sorted((f for f in listing.files if here(f)), key=rank):
        try:
            arch = read_header(source(listing, f)).metadata.get("general.architecture")
        except (ModelFormatError, HubError, OSError) as exc:
            log.info("%s: %s not read, not fetched: %s", listing.repo_id, f.path, exc)
            continue
        if arch == "clip":
            return f
    return None
