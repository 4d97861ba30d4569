"""What `pull` fetches from a listing: `choose`'s GGUF variant (every shard), a single named
file, or a transformers model's weights with its config and tokenizer."""

from __future__ import annotations

from dataclasses import dataclass

from innkeeper.models.filenames import missing_shards, quant_label
from innkeeper.models.hub.choice import Machine, choose
from innkeeper.models.hub.errors import HubError, MissingShardError, QuantNotFoundError
from innkeeper.models.hub.listing import RepoFile, RepoListing
from innkeeper.models.hub.variants import check_shards, gguf_variants, read_spec

# Files a transformers-style model needs besides its weights (top level of the repo only).
SUPPORT_FILES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "tokenizer.model",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "chat_template.jinja",
        "chat_template.json",
        "quantize_config.json",
        "quant_config.json",
        "measurement.json",
        "model.safetensors.index.json",
        "pytorch_model.bin.index.json",
    }
)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


@dataclass(frozen=True)
class Selection:
    """What a pull will fetch: the files, which one a loader opens, and why."""

    repo_id: str
    revision: str
    variant: str
    format: str
    files: tuple[RepoFile, ...]
    main_file: str
    reason: str = ""

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


def select(
    listing: RepoListing,
    *,
    quant: str | None = None,
    filename: str | None = None,
    machine: Machine | None = None,
) -> Selection:
    """What `pull` downloads: `choose`'s variant (whole, every shard), a single named file, or
    a transformers model's weights with its config and tokenizer."""
    variants = gguf_variants(listing.files)
    if filename is not None:
        named = _named_file(listing, filename)
        filename = named.path
        if not any(f.path == filename for v in variants for f in v.files):
            return _select_file(listing, named)
    if variants:
        choice = choose(
            variants,
            where=listing.repo_id,
            quant=quant,
            filename=filename,
            machine=machine,
            read_spec=lambda v: read_spec(listing, v),
        )
        chosen = choice.variant
        check_shards(listing.repo_id, chosen)
        return Selection(
            repo_id=listing.repo_id,
            revision=listing.revision,
            variant=chosen.label,
            format="gguf",
            files=chosen.files,
            main_file=chosen.main_file,
            reason=choice.reason,
        )
    if quant is not None:
        raise QuantNotFoundError(
            f"{listing.repo_id} has no GGUF files, so there is no {quant} to pick:"
            " pull it without a quantization tag"
        )
    return _select_transformers(listing)


def _named_file(listing: RepoListing, filename: str) -> RepoFile:
    """The listed file for a name, matched exactly, else case-insensitively if unique."""
    found = listing.get(filename)
    if found is not None:
        return found
    lowered = [f for f in listing.files if f.path.lower() == filename.lower()]
    if len(lowered) == 1:
        return lowered[0]
    raise QuantNotFoundError(f"{listing.repo_id} has no file {filename!r}")


def _select_file(listing: RepoListing, found: RepoFile) -> Selection:
    """One named file that is not part of a GGUF variant."""
    name = found.path.rsplit("/", 1)[-1]
    fmt = "gguf" if name.lower().endswith(".gguf") else name.rsplit(".", 1)[-1].lower()
    return Selection(
        repo_id=listing.repo_id,
        revision=listing.revision,
        variant=quant_label(found.path) or name,
        format=fmt,
        files=(found,),
        main_file=found.path,
        reason=f"{found.path} named",
    )


def _select_transformers(listing: RepoListing) -> Selection:
    """Safetensors (or, failing that, pickle) weights at the top level plus config and tokenizer."""
    top = [f for f in listing.files if "/" not in f.path]
    weights = [f for f in top if f.path.endswith(".safetensors")]
    fmt = "safetensors"
    if not weights:
        weights = [f for f in top if f.path.lower().endswith(_PICKLE_SUFFIXES)]
        weights = [f for f in weights if "training_args" not in f.path]
        fmt = "pytorch"
    if not weights:
        names = ", ".join(f.path for f in listing.files[:12]) or "none"
        raise HubError(f"{listing.repo_id} has no model weights to pull (files: {names})")
    absent = missing_shards([f.path for f in weights])
    if absent:
        raise MissingShardError(
            f"{listing.repo_id}: the weights are split and {', '.join(absent)} are missing from"
            " the repo"
        )
    support = [f for f in top if f.path in SUPPORT_FILES]
    files = tuple(sorted(weights, key=lambda f: f.path)) + tuple(support)
    return Selection(
        repo_id=listing.repo_id,
        revision=listing.revision,
        variant=fmt,
        format=fmt,
        files=files,
        main_file=files[0].path,
        reason=f"{fmt} weights",
    )
