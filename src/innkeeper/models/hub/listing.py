"""A repo at one commit: every file with its size and published hashes, in one request, and
reading a listed file (a header, a small JSON) at that commit."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from innkeeper.models.hub.client import (
    METADATA_TIMEOUT_S,
    HubSource,
    endpoint,
    hub_errors,
    token,
)
from innkeeper.models.hub.errors import HubError
from innkeeper.models.spec import ModelFormatError

JSON_LIMIT_BYTES = 16 * 1024**2
"""The largest config/tokenizer JSON `read_json` fetches (real ones are well under 1 MiB)."""


@dataclass(frozen=True)
class RepoFile:
    """One file of a repo (or of a local model folder): its path, size and published hashes."""

    path: str
    size: int
    sha256: str | None = None
    blob_id: str | None = None


@dataclass(frozen=True)
class RepoListing:
    """All files of a repo at one commit."""

    repo_id: str
    revision: str
    files: tuple[RepoFile, ...]

    def get(self, path: str) -> RepoFile | None:
        for f in self.files:
            if f.path == path:
                return f
        return None


def list_repo(repo_id: str, revision: str | None = None) -> RepoListing:
    """Every file of a repo with size and LFS sha256, in one `model_info(files_metadata=True)`.

    One request, no retries: `inspect`, `fit` and `pull` all list through here, so an
    unreachable hub fails them at once with the same message (`list_repo_tree` would retry
    for ~24 s first).
    """
    from huggingface_hub import HfApi

    tok = token()
    with hub_errors(repo_id, has_token=tok is not None):
        info = HfApi(endpoint=endpoint(), token=tok).model_info(
            repo_id, revision=revision, files_metadata=True, timeout=METADATA_TIMEOUT_S
        )
    files: list[RepoFile] = []
    for sib in info.siblings or []:
        lfs = sib.lfs
        sha = None
        if lfs is not None:
            sha = lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)
        size = sib.size
        if size is None and lfs is not None:
            size = lfs.get("size") if isinstance(lfs, dict) else getattr(lfs, "size", None)
        files.append(RepoFile(sib.rfilename, int(size or 0), sha, sib.blob_id))
    if not info.sha:
        raise HubError(f"{repo_id}: the hub did not say which commit it listed")
    return RepoListing(repo_id, info.sha, tuple(files))


def source(listing: RepoListing, f: RepoFile) -> HubSource:
    """A file of the listing, read at the listed commit (the size is known: no extra request)."""
    return HubSource(listing.repo_id, f.path, revision=listing.revision, size=f.size)


def read_json(listing: RepoListing, path: str) -> dict[str, Any]:
    """A small JSON object from the repo (config.json, tokenizer_config.json…)."""
    f = listing.get(path)
    if f is None:
        raise ModelFormatError(f"{listing.repo_id} has no {path}")
    if f.size > JSON_LIMIT_BYTES:
        raise ModelFormatError(f"{listing.repo_id}/{path} is too large to be a config file")
    try:
        data = json.loads(source(listing, f).read(0, f.size) or b"{}")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"{listing.repo_id}/{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ModelFormatError(f"{listing.repo_id}/{path} should be a JSON object")
    return data


def format_bytes(n: float) -> str:
    """A listed size as the hub's pages and `pull` show it (one decimal: `24.0 MiB`)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
