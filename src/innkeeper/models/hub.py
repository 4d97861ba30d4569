"""The Hugging Face hub: parse a model reference, list a repo, choose its files, download, verify.

Every request goes through `huggingface_hub` (HfApi for the listing, its HEAD metadata call and
its `http_get` streamer for the bytes), so HF_ENDPOINT, HF_TOKEN, proxies and the hub's error
headers behave exactly as in the hub's own tools.

Why not `hf_hub_download`: since huggingface_hub 1.x it downloads into a process-unique temporary
file and deletes it on failure, so an interrupted multi-GB pull starts again from zero. We keep
our own `.incomplete` file beside the final place and hand `http_get` its size as `resume_size`
(a Range request), then hash the finished file against the hub's LFS sha256 before moving it in.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from innkeeper.models import store

HUB_WEB = "https://huggingface.co"

_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
_PART_RE = re.compile(rf"^{_PART}$")
_TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_URL_PREFIXES = ("https://huggingface.co/", "http://huggingface.co/", "huggingface.co/", "hf.co/")
_URL_PREFIXES += ("https://hf.co/", "hf://")

# GGUF quantization labels as they appear in file names: Q4_K_M, IQ3_XXS, Q8_0, UD-Q4_K_XL, BF16...
_QUANT_RE = re.compile(
    r"(?<![A-Za-z0-9])((?:UD-)?(?:I?Q[1-8](?:_[0-9A-Z]{1,3})*|TQ[12]_0|MXFP4(?:_MOE)?"
    r"|BF16|F16|F32|FP16|FP32))(?![A-Za-z0-9])",
    re.IGNORECASE,
)
_SPLIT_RE = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)

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

FitCheck = Callable[[int], bool]
"""Whether weights of this many bytes fit this machine (wired to the memory plan by the CLI)."""


class HubError(Exception):
    """A hub problem the user can act on; the message says what to do."""


class HubRefError(HubError):
    """Text that is not a hub model reference."""


class HubAccessError(HubError):
    """The hub refused access: a gated or private repo, or a bad token."""


class QuantNotFoundError(HubError):
    """No file in the repo matches the quantization asked for."""


class NothingFitsError(HubError):
    """No quantization of the repo fits this machine."""


class MissingShardError(HubError):
    """A split model whose repo lacks one or more shards."""


class IntegrityError(HubError):
    """A downloaded file whose sha256 differs from the hub's; it has been deleted."""


class DiskSpaceError(HubError):
    """Not enough free disk space for what the pull must fetch."""


# --- references ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class HubRef:
    """`owner/name`, `owner/name:QUANT` or `owner/name/path/to/file.gguf`."""

    repo_id: str
    quant: str | None = None
    filename: str | None = None
    revision: str | None = None


def parse_ref(text: str) -> HubRef:
    """Parse what the user typed; hub page URLs (…/blob/main/file.gguf) are accepted too."""
    ref = text.strip()
    for prefix in _URL_PREFIXES:
        if ref.lower().startswith(prefix):
            ref = ref[len(prefix) :]
            break
    parts = ref.split("/")
    if len(parts) < 2:
        raise HubRefError(f"{text!r} is not a hub reference: expected owner/name[:QUANT]")
    owner, name = parts[0], parts[1]
    rest = parts[2:]
    quant = None
    if ":" in name and not rest:
        name, quant = name.split(":", 1)
        if not _TAG_RE.match(quant):
            raise HubRefError(f"{text!r}: {quant!r} is not a quantization tag such as Q6_K")
    if not (_PART_RE.match(owner) and _PART_RE.match(name)) or ".." in (owner, name):
        raise HubRefError(f"{text!r} is not a hub reference: expected owner/name[:QUANT]")
    revision = None
    if len(rest) >= 3 and rest[0] in ("resolve", "blob"):
        revision, rest = rest[1], rest[2:]
    elif len(rest) == 2 and rest[0] == "tree":
        revision, rest = rest[1], []
    filename = "/".join(rest) or None
    if filename is not None:
        try:
            store.safe_relative_path(filename)
        except ValueError as exc:
            raise HubRefError(f"{text!r}: {exc}") from exc
    return HubRef(repo_id=f"{owner}/{name}", quant=quant, filename=filename, revision=revision)


def quant_label(path: str) -> str | None:
    """The quantization a GGUF file name announces (upper case), from its name, then folders."""
    for part in reversed(path.split("/")):
        found = _QUANT_RE.findall(part.removesuffix(".gguf"))
        if found:
            return found[-1].upper()
    return None


# --- listing ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HubFile:
    """One file of a repo: its path, size and the hashes the hub publishes for it."""

    path: str
    size: int
    sha256: str | None = None
    blob_id: str | None = None


@dataclass(frozen=True)
class RepoListing:
    """All files of a repo at one commit."""

    repo_id: str
    revision: str
    files: tuple[HubFile, ...]
    gated: bool | str = False

    def get(self, path: str) -> HubFile | None:
        for f in self.files:
            if f.path == path:
                return f
        return None


def endpoint() -> str:
    """The hub to talk to, read at call time so tests (and users) can point HF_ENDPOINT anywhere."""
    return (os.environ.get("HF_ENDPOINT") or HUB_WEB).rstrip("/")


def token() -> str | None:
    """HF_TOKEN, else the token `hf auth login` saved; None sends no credentials."""
    from huggingface_hub import get_token

    return os.environ.get("HF_TOKEN") or get_token() or None


@contextlib.contextmanager
def hub_errors(repo_id: str, *, has_token: bool) -> Iterator[None]:
    """Turn huggingface_hub's exceptions into one clear sentence the user can act on."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    page = f"{HUB_WEB}/{repo_id}"
    try:
        yield
    except GatedRepoError as exc:
        how = (
            "the token in HF_TOKEN has no access: accept the conditions on the repo's page with"
            " that account"
            if has_token
            else "set HF_TOKEN to a token of an account that accepted its conditions"
        )
        raise HubAccessError(f"{repo_id} is a gated repo ({page}): {how}") from exc
    except RepositoryNotFoundError as exc:
        hint = "check the name" + ("" if has_token else ", or set HF_TOKEN if it is private")
        raise HubAccessError(f"repo {repo_id} not found on {endpoint()}: {hint}") from exc
    except RevisionNotFoundError as exc:
        raise HubError(f"{repo_id}: revision not found") from exc
    except LocalEntryNotFoundError as exc:
        raise HubError(f"cannot reach the hub at {endpoint()}: check the connection") from exc
    except EntryNotFoundError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise MissingShardError(
            f"{repo_id}: a file the repo lists is missing on the hub ({first})"
        ) from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            raise HubAccessError(
                f"the hub refused access to {repo_id} (HTTP {status}):"
                + (" check HF_TOKEN" if has_token else " set HF_TOKEN")
            ) from exc
        raise HubError(f"hub error for {repo_id}: {str(exc).splitlines()[0]}") from exc
    except OSError as exc:
        raise HubError(f"network error talking to {endpoint()}: {exc}") from exc
    except Exception as exc:
        if _is_transport_error(exc):
            raise HubError(f"network error talking to {endpoint()}: {exc}") from exc
        raise


def list_repo(repo_id: str, revision: str | None = None) -> RepoListing:
    """Every file of a repo with size and LFS sha256, in one `model_info(files_metadata=True)`."""
    from huggingface_hub import HfApi

    tok = token()
    with hub_errors(repo_id, has_token=tok is not None):
        info = HfApi(endpoint=endpoint(), token=tok).model_info(
            repo_id, revision=revision, files_metadata=True
        )
    files: list[HubFile] = []
    for sib in info.siblings or []:
        lfs = sib.lfs
        sha = None
        if lfs is not None:
            sha = lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)
        size = sib.size
        if size is None and lfs is not None:
            size = lfs.get("size") if isinstance(lfs, dict) else getattr(lfs, "size", None)
        files.append(HubFile(sib.rfilename, int(size or 0), sha, sib.blob_id))
    if not info.sha:
        raise HubError(f"{repo_id}: the hub did not say which commit it listed")
    return RepoListing(repo_id, info.sha, tuple(files), gated=info.gated or False)


# --- choosing files -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One GGUF quantization of a repo: one file, or every shard of a split file."""

    label: str
    files: tuple[HubFile, ...]
    missing_shards: tuple[int, ...] = ()
    shard_total: int = 1

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


@dataclass(frozen=True)
class Selection:
    """What a pull will fetch: the files, and which one a loader opens."""

    repo_id: str
    revision: str
    variant: str
    format: str
    files: tuple[HubFile, ...]
    main_file: str
    others: tuple[Variant, ...] = field(default=(), compare=False)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


def gguf_variants(listing: RepoListing) -> list[Variant]:
    """Group a repo's GGUF files by quantization; shards of one split file stay together.

    Vision projectors (`mmproj`) and importance matrices are not model weights and are left out.
    """
    groups: dict[tuple[str, str], list[HubFile]] = {}
    totals: dict[tuple[str, str], int] = {}
    for f in listing.files:
        base = f.path.rsplit("/", 1)[-1].lower()
        if not base.endswith(".gguf") or "mmproj" in base or "imatrix" in base:
            continue
        split = _SPLIT_RE.search(f.path)
        stem = f.path[: split.start()] if split else f.path.removesuffix(".gguf")
        label = quant_label(f.path) or stem.rsplit("/", 1)[-1]
        key = (label, stem)
        groups.setdefault(key, []).append(f)
        totals[key] = int(split.group(2)) if split else 1
    variants = []
    for key, files in groups.items():
        total = totals[key]
        have = {int(m.group(1)) for f in files if (m := _SPLIT_RE.search(f.path))}
        missing = tuple(i for i in range(1, total + 1) if i not in have) if total > 1 else ()
        ordered = tuple(sorted(files, key=lambda f: f.path))
        variants.append(Variant(key[0], ordered, missing, total))
    variants.sort(key=lambda v: v.size, reverse=True)
    return variants


def _check_shards(repo_id: str, variant: Variant) -> None:
    if variant.missing_shards:
        shards = ", ".join(str(i) for i in variant.missing_shards)
        raise MissingShardError(
            f"{repo_id}: {variant.label} is split in {variant.shard_total} files but shard(s)"
            f" {shards} are missing from the repo; pick another quantization"
        )


def _describe(variants: Sequence[Variant]) -> str:
    return ", ".join(f"{v.label} ({format_bytes(v.size)})" for v in variants)


def _gguf_selection(listing: RepoListing, variant: Variant, variants: list[Variant]) -> Selection:
    _check_shards(listing.repo_id, variant)
    return Selection(
        repo_id=listing.repo_id,
        revision=listing.revision,
        variant=variant.label,
        format="gguf",
        files=variant.files,
        main_file=variant.files[0].path,
        others=tuple(variants),
    )


def choose_files(
    listing: RepoListing,
    *,
    quant: str | None = None,
    filename: str | None = None,
    fits: FitCheck | None = None,
) -> Selection:
    """Pick what to download: the named file, the named quant, or the largest quant that fits.

    Without a quant, variants are tried from the largest (least quantized) down and the first
    that `fits` accepts wins; without `fits`, the largest is taken.
    """
    variants = gguf_variants(listing)
    if filename is not None:
        return _select_file(listing, filename, variants)
    if variants:
        if quant is not None:
            chosen = _match_quant(listing.repo_id, quant, variants)
            return _gguf_selection(listing, chosen, variants)
        complete = [v for v in variants if not v.missing_shards]
        if not complete:
            _check_shards(listing.repo_id, variants[0])
        for variant in complete:
            if fits is None or fits(variant.size):
                return _gguf_selection(listing, variant, variants)
        smallest = complete[-1]
        raise NothingFitsError(
            f"no quantization of {listing.repo_id} fits this machine (smallest: {smallest.label},"
            f" {format_bytes(smallest.size)}); pass --quant to pull one anyway"
        )
    if quant is not None:
        raise QuantNotFoundError(
            f"{listing.repo_id} has no GGUF files, so there is no {quant} to pick:"
            " pull it without a quantization tag"
        )
    return _select_transformers(listing)


def _match_quant(repo_id: str, quant: str, variants: list[Variant]) -> Variant:
    wanted = quant.upper()
    exact = [v for v in variants if v.label.upper() == wanted]
    if not exact:
        exact = [v for v in variants if v.label.upper().removeprefix("UD-") == wanted]
    if len(exact) == 1:
        return exact[0]
    if len(exact) > 1:
        names = ", ".join(v.files[0].path for v in exact)
        raise QuantNotFoundError(
            f"{repo_id}: several files are {quant} ({names}); name one as {repo_id}/FILE"
        )
    raise QuantNotFoundError(f"{repo_id} has no {quant} file; it has: {_describe(variants)}")


def _select_file(listing: RepoListing, filename: str, variants: list[Variant]) -> Selection:
    """A file named by path: for a shard of a split GGUF, the whole set."""
    for variant in variants:
        if any(f.path == filename for f in variant.files):
            return _gguf_selection(listing, variant, variants)
    found = listing.get(filename)
    if found is None:
        lowered = [f for f in listing.files if f.path.lower() == filename.lower()]
        found = lowered[0] if len(lowered) == 1 else None
    if found is None:
        raise QuantNotFoundError(f"{listing.repo_id} has no file {filename!r}")
    name = found.path.rsplit("/", 1)[-1]
    fmt = "gguf" if name.lower().endswith(".gguf") else name.rsplit(".", 1)[-1].lower()
    return Selection(
        repo_id=listing.repo_id,
        revision=listing.revision,
        variant=quant_label(found.path) or name,
        format=fmt,
        files=(found,),
        main_file=found.path,
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
    _check_split_names(listing.repo_id, weights)
    support = [f for f in top if f.path in SUPPORT_FILES]
    files = tuple(sorted(weights, key=lambda f: f.path)) + tuple(support)
    return Selection(
        repo_id=listing.repo_id,
        revision=listing.revision,
        variant=fmt,
        format=fmt,
        files=files,
        main_file=files[0].path,
    )


def _check_split_names(repo_id: str, weights: list[HubFile]) -> None:
    """`model-00001-of-00003.safetensors`: every index from 1 to 3 must be in the repo."""
    pattern = re.compile(r"-(\d{5})-of-(\d{5})\.[a-z]+$")
    sets: dict[str, tuple[int, set[int]]] = {}
    for f in weights:
        m = pattern.search(f.path)
        if m:
            stem = f.path[: m.start()]
            total, have = sets.setdefault(stem, (int(m.group(2)), set()))
            have.add(int(m.group(1)))
    for stem, (total, have) in sets.items():
        missing = [i for i in range(1, total + 1) if i not in have]
        if missing:
            raise MissingShardError(
                f"{repo_id}: {stem} is split in {total} files but shard(s)"
                f" {', '.join(map(str, missing))} are missing from the repo"
            )


# --- downloading --------------------------------------------------------------------------------


@dataclass
class PullResult:
    """What a pull did: the store entry, and how many bytes came over the wire this time."""

    entry: store.StoreEntry
    downloaded_bytes: int
    resumed_from_bytes: int
    reused_files: int


ProgressHook = Callable[[int, int, HubFile], None]
"""Called before each file: (index from 1, count, file)."""


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def free_disk_bytes(path: Path) -> int:
    """Free bytes on the disk that holds path (or its nearest existing parent)."""
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def _digest(path: Path, sha256: bool) -> str:
    """sha256 of a file, or for non-LFS files the git blob id (sha1 of `blob <size>\\0<data>`)."""
    h = hashlib.sha256() if sha256 else hashlib.sha1()
    if not sha256:
        h.update(f"blob {path.stat().st_size}\0".encode())
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _verify(path: Path, f: HubFile) -> bool:
    if f.sha256:
        return _digest(path, True) == f.sha256.lower()
    if f.blob_id:
        return _digest(path, False) == f.blob_id.lower()
    return path.stat().st_size == f.size


def _origin(url: str) -> tuple[str, str, int | None]:
    p = urlparse(url)
    return p.scheme, (p.hostname or "").lower(), p.port


def _is_transport_error(exc: BaseException) -> bool:
    """httpx/requests connection errors: their classes differ between huggingface_hub versions."""
    name = type(exc).__name__
    words = ("Connect", "Timeout", "Protocol", "Network", "Transport", "Read")
    return any(k in name for k in words)


def _fetch(sel: Selection, f: HubFile, final: Path, tok: str | None) -> int:
    """Download one file into its `.incomplete` file (resuming it) and verify it; return bytes got.

    The HEAD call and the streaming GET are huggingface_hub's own; we only own the file handle,
    so the bytes already on disk survive a crash and become the Range start of the next try.
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    part = store.partial_path(final, f.sha256 or f.blob_id or "x")
    url = hf_hub_url(sel.repo_id, f.path, revision=sel.revision, endpoint=endpoint())
    with hub_errors(sel.repo_id, has_token=tok is not None):
        meta = get_hf_file_metadata(url, token=tok)
    if meta.size is not None and meta.size != f.size:
        raise HubError(f"{f.path}: the hub lists {f.size} bytes but serves {meta.size}")
    location = meta.location or url
    headers = build_hf_headers(token=tok)
    if _origin(location) != _origin(url):
        headers.pop("authorization", None)  # signed CDN URL: credentials stay on the hub
    final.parent.mkdir(parents=True, exist_ok=True)
    resume = part.stat().st_size if part.exists() else 0
    if resume > f.size:
        part.unlink()
        resume = 0
    for attempt in (1, 2):
        try:
            with part.open("ab", buffering=0) as fh:
                http_get(
                    location,
                    fh,
                    resume_size=resume,
                    headers=headers,
                    expected_size=f.size,
                    displayed_filename=f.path.rsplit("/", 1)[-1],
                )
        except Exception as exc:
            status = getattr(getattr(exc, "response", None), "status_code", None)
            if isinstance(exc, HfHubHTTPError) and status is not None and status < 500:
                with hub_errors(sel.repo_id, has_token=tok is not None):
                    raise
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                raise DiskSpaceError(f"the disk filled up while downloading {f.path}") from exc
            if isinstance(exc, (OSError, HfHubHTTPError)) or _is_transport_error(exc):
                kept = part.stat().st_size if part.exists() else 0
                raise HubError(
                    f"download of {f.path} interrupted ({format_bytes(kept)} of"
                    f" {format_bytes(f.size)} kept): run the same pull again to resume"
                ) from exc
            raise
        if _verify(part, f):
            break
        part.unlink(missing_ok=True)
        if attempt == 1 and resume > 0:
            resume = 0  # a resumed file may have kept a bad prefix: one fresh try
            continue
        raise IntegrityError(
            f"{f.path}: sha256 does not match the hub's ({f.sha256 or f.blob_id});"
            " the download was deleted and nothing was added to the store. Run the pull again."
        )
    got = f.size - resume
    os.replace(part, final)
    return got


def pull(
    sel: Selection,
    root: Path | None = None,
    *,
    progress: bool = True,
    on_file: ProgressHook | None = None,
    free_bytes: Callable[[Path], int] = free_disk_bytes,
) -> PullResult:
    """Download a selection into the store, resuming, verifying and moving each file in.

    The manifest is written as incomplete before the first byte, updated as each verified file
    lands and marked complete last; every write is atomic, so the store never shows a half-pulled
    model as whole. A failed pull that leaves nothing to resume leaves nothing behind.
    """
    from huggingface_hub.utils import WeakFileLock

    root = root if root is not None else store.models_dir()
    entry = store.entry_dir(root, sel.repo_id, sel.variant)
    for f in sel.files:
        store.safe_relative_path(f.path)
    locks = root / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    lock = locks / f"{entry.parent.name}__{entry.name}.lock"
    with WeakFileLock(lock):
        existed = entry.exists()
        entry.mkdir(parents=True, exist_ok=True)
        try:
            return _pull_locked(sel, root, entry, progress, on_file, free_bytes)
        except BaseException:
            _cleanup_failed(entry, remove_dir=not existed)
            raise


def _pull_locked(
    sel: Selection,
    root: Path,
    entry: Path,
    progress: bool,
    on_file: ProgressHook | None,
    free_bytes: Callable[[Path], int],
) -> PullResult:
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    tok = token()
    old = store.read_manifest(entry)
    verified = {
        m.path: m for m in (old.files if old and old.revision == sel.revision else []) if m.verified
    }
    manifest = store.Manifest(
        repo=sel.repo_id,
        revision=sel.revision,
        variant=sel.variant,
        format=sel.format,
        main_file=sel.main_file,
        files=[store.ManifestFile(f.path, f.size, f.sha256, f.blob_id) for f in sel.files],
        endpoint=endpoint(),
    )
    todo: list[tuple[int, HubFile, Path]] = []
    reused = resumed = need = 0
    for i, (f, m) in enumerate(zip(sel.files, manifest.files, strict=True)):
        final = entry / f.path
        known = verified.get(f.path)
        same = known is not None and (known.sha256, known.blob_id) == (f.sha256, f.blob_id)
        if final.is_file() and final.stat().st_size == f.size and (same or _verify(final, f)):
            m.verified = True
            reused += 1
            continue
        todo.append((i, f, final))
        part = store.partial_path(final, f.sha256 or f.blob_id or "x")
        have = part.stat().st_size if part.exists() else 0
        have = have if have <= f.size else 0
        resumed += have
        need += f.size - have
    free = free_bytes(entry)
    if need > free:
        raise DiskSpaceError(
            f"not enough disk space in {root}: the pull needs {format_bytes(need)},"
            f" {format_bytes(free)} free"
        )
    store.write_manifest(entry, manifest)

    was_disabled = are_progress_bars_disabled()
    if not progress:
        disable_progress_bars()
    got = 0
    try:
        for n, (i, f, final) in enumerate(todo, 1):
            if on_file is not None:
                on_file(n, len(todo), f)
            final.unlink(missing_ok=True)
            got += _fetch(sel, f, final, tok)
            manifest.files[i].verified = True
            store.write_manifest(entry, manifest)
    finally:
        if not progress and not was_disabled:
            enable_progress_bars()
    manifest.complete = True
    manifest.downloaded_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    store.write_manifest(entry, manifest)
    return PullResult(store.entry_from_manifest(entry, manifest), got, resumed, reused)


def _cleanup_failed(entry: Path, *, remove_dir: bool) -> None:
    """After a failed pull: if no verified file and no partial download remain, remove the trace."""
    manifest = store.read_manifest(entry)
    has_files = manifest is not None and any(m.verified for m in manifest.files)
    has_partial = any(p.name.endswith(store.PARTIAL_SUFFIX) for p in entry.rglob("*"))
    if has_files or has_partial:
        return
    (entry / store.MANIFEST_NAME).unlink(missing_ok=True)
    if remove_dir:
        for d in sorted((p for p in entry.rglob("*") if p.is_dir()), reverse=True):
            with contextlib.suppress(OSError):
                d.rmdir()
        with contextlib.suppress(OSError):
            entry.rmdir()
        with contextlib.suppress(OSError):
            entry.parent.rmdir()
