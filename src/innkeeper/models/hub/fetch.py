"""From a hub reference to a store entry, pulling only when needed: the one path that `pull`,
`serve owner/repo` and the server's pull jobs take, so they share one choice rule and one
download (resume, sha256, split files, manifest written last).

`pull` always asks the hub (a newer revision replaces the old one; verified files are reused);
`serve` first looks in the store by the manifests alone, so a model pulled once starts with no
network at all.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from innkeeper.models import store
from innkeeper.models.filenames import normalize_quant
from innkeeper.models.hub.choice import Machine
from innkeeper.models.hub.download import (
    BytesHook,
    ProgressHook,
    PullResult,
    free_disk_bytes,
    pull,
)
from innkeeper.models.hub.errors import HubError, NotPulledError
from innkeeper.models.hub.listing import format_bytes, list_repo
from innkeeper.models.hub.refs import HubRef
from innkeeper.models.hub.selection import Selection, select
from innkeeper.models.hub.variants import projector_of


@dataclass(frozen=True)
class Resolved:
    """The store entry a ref ended at; `selection` and `result` are None when the store
    already had it and the hub was not asked."""

    entry: store.StoreEntry
    selection: Selection | None = None
    result: PullResult | None = None


def _names(entry: store.StoreEntry, ref: HubRef) -> bool:
    """Whether a pulled entry is what `ref` asks for (repo, then quant or file, then revision)."""
    if entry.repo is None or entry.repo.lower() != ref.repo_id.lower():
        return False
    if ref.quant is not None and normalize_quant(entry.quant or "") != normalize_quant(ref.quant):
        return False
    if ref.filename is not None and ref.filename.lower() not in {f.lower() for f in entry.files}:
        return False
    if ref.revision in (None, "main"):  # a URL's `blob/main/`: the branch plain refs mean too
        return True
    return (entry.revision or "").startswith(ref.revision)


def pulled_entry(ref: HubRef, root: Path) -> store.StoreEntry | None:
    """The complete store entry `ref` names, from the manifests alone (no network); None when
    there is none, so the caller pulls (an incomplete one is then resumed).

    `owner/repo` with several variants pulled and none named is refused, as a store name is:
    which one the hub's choice would take cannot be known offline.
    """
    found = [e for e in store.list_models(root) if e.complete and _names(e, ref)]
    if len(found) > 1:
        names = ", ".join(e.name for e in found)
        raise store.ModelNotFoundError(
            f"{ref.repo_id} has several models in the store ({names}): name one, as"
            f" {ref.repo_id}:QUANT"
        )
    return found[0] if found else None


def describe(sel: Selection) -> str:
    """The one line said before a download: what was chosen, how big, and why."""
    what = sel.main_file if len(sel.files) == 1 else f"{sel.main_file} + {len(sel.files) - 1}"
    line = f"{sel.repo_id}: {what} ({sel.variant}, {format_bytes(sel.size)})"
    return f"{line}, {sel.reason}" if sel.reason else line


def resolve(
    ref: HubRef,
    root: Path,
    *,
    machine: Machine | None,
    use_store: bool = False,
    download: bool = True,
    gguf_only: bool = False,
    on_selected: Callable[[Selection], None] | None = None,
    progress: bool = True,
    on_file: ProgressHook | None = None,
    on_bytes: BytesHook | None = None,
    cancel: threading.Event | None = None,
) -> Resolved:
    """The store entry for `ref`, pulled if needed, by `pull`'s one rule and one download.

    `use_store`: a complete entry already in the store answers at once, with no network.
    `download` False refuses to fetch anything (NotPulledError) before any network is used.
    `gguf_only`: refuse (before downloading) a repo whose choice is not a GGUF, for the
    callers that must serve it. `on_selected` hears the choice before the first byte.
    """
    if use_store:
        found = pulled_entry(ref, root)
        if found is not None:
            return Resolved(found)
    if not download:
        raise NotPulledError(
            f"{ref.repo_id} is not in the store ({root}) and downloading was refused"
            " (--no-pull): pull it with `innkeeper pull`, or drop --no-pull"
        )
    listing = list_repo(ref.repo_id, ref.revision)
    sel = select(listing, quant=ref.quant, filename=ref.filename, machine=machine)
    if gguf_only and sel.format != "gguf":
        raise HubError(
            f"{sel.repo_id} has no GGUF files ({sel.format} weights): innkeeper serves"
            " GGUF models; pull a GGUF repo, or this one with `innkeeper pull` to inspect"
        )
    # A vision model's projector goes beside it (its header is read to be sure it is one;
    # not when the disk cannot hold the model anyway: the pull below says so, nothing read).
    room = sel.format == "gguf" and free_disk_bytes(root) >= sel.size
    proj = projector_of(listing, sel.main_file) if room else None
    if proj is not None and proj not in sel.files:
        sel = replace(sel, files=(*sel.files, proj))
    if on_selected is not None:
        on_selected(sel)
    result = pull(sel, root, progress=progress, on_file=on_file, on_bytes=on_bytes, cancel=cancel)
    return Resolved(result.entry, sel, result)
