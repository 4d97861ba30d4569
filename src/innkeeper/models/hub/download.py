"""Download a selection into the store: resume, verify against the hub's hashes, move in.

Why not `hf_hub_download`: since huggingface_hub 1.x it downloads into a process-unique temporary
file and deletes it on failure, so an interrupted multi-GB pull starts again from zero. We keep
our own `.incomplete` file beside the final place and hand `http_get` its size as `resume_size`
(a Range request), then hash the finished file against the hub's LFS sha256 before moving it in.

Never in place: a file's final name only ever appears by `os.replace` of a complete, verified
download, and a file being replaced (a new revision, a damaged copy) is unlinked first, never
opened for writing or truncated. A server that mmapped the old file keeps reading its inode;
writing into it would kill that server with SIGBUS at its next token.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from innkeeper.models import store
from innkeeper.models.hub.client import endpoint, hub_errors, is_transport_error, token
from innkeeper.models.hub.errors import DiskSpaceError, HubError, IntegrityError, PullCancelled
from innkeeper.models.hub.listing import RepoFile, format_bytes
from innkeeper.models.hub.selection import Selection


@dataclass
class PullResult:
    """What a pull did: the store entry, and how many bytes came over the wire this time."""

    entry: store.StoreEntry
    downloaded_bytes: int
    resumed_from_bytes: int
    reused_files: int


ProgressHook = Callable[[int, int, RepoFile], None]
"""Called before each file: (index from 1, count, file)."""

BytesHook = Callable[[int, int], None]
"""Called as bytes land: (bytes of the selection on disk now, bytes of the whole selection)."""


class _WatchedFile:
    """The `.incomplete` file as `http_get` sees it: each written chunk reports the bytes now on
    disk and checks the cancel flag, so a pull can show progress and stop between chunks
    without owning the download loop. Everything else goes to the real file."""

    def __init__(
        self, fh: Any, on_size: Callable[[int], None] | None, cancel: threading.Event | None
    ) -> None:
        self._fh = fh
        self._on_size = on_size
        self._cancel = cancel

    def write(self, data: bytes) -> int:
        n = self._fh.write(data)
        if self._on_size is not None:
            self._on_size(self._fh.tell())
        if self._cancel is not None and self._cancel.is_set():
            raise PullCancelled()
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)


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


def _verify(path: Path, f: RepoFile) -> bool:
    if f.sha256:
        return _digest(path, True) == f.sha256.lower()
    if f.blob_id:
        return _digest(path, False) == f.blob_id.lower()
    return path.stat().st_size == f.size


def _origin(url: str) -> tuple[str, str, int | None]:
    p = urlparse(url)
    return p.scheme, (p.hostname or "").lower(), p.port


def _fetch(
    sel: Selection,
    f: RepoFile,
    final: Path,
    tok: str | None,
    on_size: Callable[[int], None] | None = None,
    cancel: threading.Event | None = None,
) -> int:
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
    if on_size is not None:
        on_size(resume)
    for attempt in (1, 2):
        try:
            with part.open("ab", buffering=0) as fh:
                http_get(
                    location,
                    _WatchedFile(fh, on_size, cancel),  # type: ignore[arg-type]
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
            if isinstance(exc, (OSError, HfHubHTTPError)) or is_transport_error(exc):
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
    on_bytes: BytesHook | None = None,
    cancel: threading.Event | None = None,
) -> PullResult:
    """Download a selection into the store, resuming, verifying and moving each file in.

    The manifest is written as incomplete before the first byte, updated as each verified file
    lands and marked complete last; every write is atomic, so the store never shows a half-pulled
    model as whole. A failed pull that leaves nothing to resume leaves nothing behind.
    `on_bytes` reports progress as chunks land; setting `cancel` stops the pull at the next
    chunk with `PullCancelled`, keeping what came as a resumable `.incomplete` file.
    """
    from huggingface_hub.utils import WeakFileLock

    root = root if root is not None else store.models_dir()
    entry = store.entry_dir(root, sel.repo_id, sel.variant)
    for f in sel.files:
        store.safe_relative_path(f.path)
    lock = store.lock_path(root, entry)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with WeakFileLock(lock):
        existed = entry.exists()
        entry.mkdir(parents=True, exist_ok=True)
        try:
            return _pull_locked(sel, root, entry, progress, on_file, free_bytes, on_bytes, cancel)
        except BaseException:
            _cleanup_failed(entry, remove_dir=not existed)
            if not entry.exists():  # nothing left to guard; removed while held, as a delete does
                lock.unlink(missing_ok=True)
            raise


def _pull_locked(
    sel: Selection,
    root: Path,
    entry: Path,
    progress: bool,
    on_file: ProgressHook | None,
    free_bytes: Callable[[Path], int],
    on_bytes: BytesHook | None = None,
    cancel: threading.Event | None = None,
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
    todo: list[tuple[int, RepoFile, Path]] = []
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
    landed = sum(f.size for f, m in zip(sel.files, manifest.files, strict=True) if m.verified)
    try:
        for n, (i, f, final) in enumerate(todo, 1):
            if cancel is not None and cancel.is_set():
                raise PullCancelled()
            if on_file is not None:
                on_file(n, len(todo), f)
            final.unlink(missing_ok=True)  # a loaded copy keeps its inode; frees its disk if not
            on_size = None
            if on_bytes is not None:
                on_size = functools.partial(_report, on_bytes, landed, sel.size)
            got += _fetch(sel, f, final, tok, on_size, cancel)
            landed += f.size
            manifest.files[i].verified = True
            store.write_manifest(entry, manifest)
    finally:
        if not progress and not was_disabled:
            enable_progress_bars()
    manifest.complete = True
    manifest.downloaded_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    store.write_manifest(entry, manifest)
    return PullResult(store.entry_from_manifest(entry, manifest), got, resumed, reused)


def _report(on_bytes: BytesHook, landed: int, total: int, present: int) -> None:
    """One file's bytes on disk, as the selection's: the files already landed plus this one."""
    on_bytes(landed + present, total)


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
