"""The list of models a client may name: where they come from and what each one is.

Models come from three places: the embedded default, the store (`innkeeper pull`) and each
`--models-dir` (one GGUF per file, split GGUFs by their first part, one-model subfolders). A
name from a client resolves only to an entry of this list, never to a path. The list is
rebuilt by `scan` and merged into the old one by `merge`, which keeps what the runtime knows
about an entry (its state, its service, its settings) when the same file is found again.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from innkeeper.engine.embeddings import model_kind
from innkeeper.engine.planning import model_id_for
from innkeeper.models import store
from innkeeper.models.filenames import quant_label, shard_of, unsharded
from innkeeper.models.gguf_header import read_header
from innkeeper.models.projector import models_in, projector_for
from innkeeper.models.sources import FileSource
from innkeeper.models.spec import ModelFormatError

if TYPE_CHECKING:
    from innkeeper.models.memory import AutoSettings, MemoryPlan
    from innkeeper.serving.service import Service

log = logging.getLogger("innkeeper.serving")


class ModelState(str, enum.Enum):
    """Where a model is in its life; the one field that says so (shown to clients by value)."""

    UNLOADED = "unloaded"
    LOADING = "loading"
    LOADED = "loaded"
    DRAINING = "draining"  # being unloaded: running requests finish, new ones wait
    FAILED = "failed"  # the last load failed; `error` says why


@dataclass
class ModelEntry:
    """One model a client may name, and what the runtime knows about it."""

    id: str
    source: str  # "embedded" | "store" | "dir"
    path: Path
    size_bytes: int
    quantization: str | None = None
    store_name: str | None = None
    names: set[str] = field(default_factory=set)  # other spellings that resolve to it
    state: ModelState = ModelState.UNLOADED
    error: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # per-load settings last given
    service: Service | None = None  # set exactly while LOADED or DRAINING
    loading: asyncio.Future[Service] | None = None  # set exactly while LOADING
    keep_alive: float | None = None  # None: --idle-unload decides
    loaded_plan: MemoryPlan | None = None
    plan_cache: tuple[tuple[Any, ...], AutoSettings | None] | None = None
    chat_template: str | None = None  # --chat-template applies to the model serve was given
    load_seconds: float | None = None
    kind: str = "chat"  # "embedding" / "rerank": a pooling model (from its GGUF header)
    mmproj: Path | None = None  # its vision projector: --mmproj, or an mmproj*.gguf beside it

    @property
    def status(self) -> str:
        return self.state.value

    @property
    def ready(self) -> bool:
        """Loaded and taking new requests."""
        return self.state is ModelState.LOADED and self.service is not None


def walk_dir(root: Path) -> list[tuple[str, Path]]:
    """(id, first GGUF) for each model under a --models-dir: files and one-model subfolders."""
    found: list[tuple[str, Path]] = []
    if not root.is_dir():
        log.warning("--models-dir %s is not a folder", root)
        return found
    for p in models_in(root):
        found.append((model_id_for(Path(unsharded(p.name))), p))
    for sub in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")):
        inner = models_in(sub)
        if len(inner) == 1:
            found.append((sub.name, inner[0]))
        else:  # several models in one folder: each by its file name
            found.extend((model_id_for(Path(unsharded(p.name))), p) for p in inner)
    return found


def find_in_models_dirs(name: str, folders: list[str] | tuple[str, ...]) -> Path | None:
    """The model a --models-dir offers under `name` (for `serve NAME --models-dir DIR`)."""
    wanted = name.strip().lower()
    for folder in folders:
        for model_id, path in walk_dir(Path(folder).expanduser()):
            if wanted in (model_id.lower(), path.name.lower()):
                return path
    return None


def file_size(path: Path) -> int:
    """Bytes of a model file, all parts of a split GGUF together."""
    try:
        shard = shard_of(path.name)
        if shard:
            base = unsharded(path.name)
            parts = [p for p in path.parent.glob("*.gguf") if unsharded(p.name) == base]
            return sum(p.stat().st_size for p in parts)
        return path.stat().st_size
    except OSError:
        return 0


def same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return a == b


def _dir_entry(model_id: str, path: Path) -> ModelEntry:
    return ModelEntry(
        id=model_id,
        source="dir",
        path=path,
        size_bytes=file_size(path),
        quantization=quant_label(path.name),
        names={path.name},
    )


def scan(
    models_dirs: tuple[str, ...],
    default_path: Path,
    chat_template: str | None,
    alias: str | None,
    mmproj: Path | None = None,
) -> tuple[list[ModelEntry], ModelEntry]:
    """Every model found now, and the entry of the model `serve` was given (the default);
    each paired with the projector beside it, serve's model with `mmproj` if given."""
    found: list[ModelEntry] = []
    embedded = store.embedded_entry()
    if embedded is not None:
        found.append(
            ModelEntry(
                id=embedded.name,
                source="embedded",
                path=embedded.path,
                size_bytes=embedded.size,
                quantization=embedded.quant.upper() if embedded.quant else None,
                names={embedded.path.name},
            )
        )
    try:
        pulled = store.list_models()
    except OSError as exc:
        log.warning("cannot read the model store: %s", exc)
        pulled = []
    for e in pulled:
        if e.format != "gguf" or not e.complete:
            continue
        found.append(
            ModelEntry(
                id=e.name,
                source="store",
                path=e.path,
                size_bytes=e.size,
                quantization=e.quant,
                store_name=e.name,
                names={e.path.name},
            )
        )
    for folder in models_dirs:
        for model_id, path in walk_dir(Path(folder).expanduser()):
            found.append(_dir_entry(model_id, path))
    # The model `serve` was given: the default, under --alias if one was given.
    default = next((e for e in found if same_file(e.path, default_path)), None)
    if default is None:
        default = _dir_entry(model_id_for(Path(unsharded(default_path.name))), default_path)
        found.insert(0, default)
    default.chat_template = chat_template
    for e in found:
        if e.source != "embedded":
            e.mmproj = projector_for(e.path)
    if mmproj is not None:
        default.mmproj = mmproj
    if alias:
        default.names.add(default.id)
        default.id = alias
    return found, default


def kind_of_file(path: Path) -> str:
    """The model's kind (`model_kind`: chat, embedding, rerank) from the GGUF header alone,
    a few KB read; "chat" when unreadable (loading the file reports what is wrong with it)."""
    try:
        with FileSource(path) as src:
            meta = read_header(src).metadata
    except (ModelFormatError, OSError) as exc:
        log.debug("cannot read the header of %s: %s", path, exc)
        return "chat"
    return model_kind(meta.get)


def merge(found: list[ModelEntry], old: dict[str, ModelEntry]) -> dict[str, ModelEntry]:
    """The new list by id: an entry found again keeps its runtime state; a file reached by
    a second path (a symlink, a second folder) adds its names to the first entry; a model in
    use is never forgotten, even if its file vanished."""
    new: dict[str, ModelEntry] = {}
    kept: list[ModelEntry] = []
    for e in found:
        first = next((k for k in kept if same_file(k.path, e.path)), None)
        if first is not None:
            first.names |= e.names | {e.id}
            continue
        base, n = e.id, 2
        while e.id in new:
            e.id = f"{base}-{n}"
            n += 1
        previous = old.get(e.id)
        if previous is not None and same_file(previous.path, e.path):
            previous.names |= e.names
            previous.size_bytes = e.size_bytes or previous.size_bytes
            previous.mmproj = e.mmproj
            e = previous  # keep state, service and settings
        else:
            e.kind = kind_of_file(e.path)  # read once per file found, not per scan
        new[e.id] = e
        kept.append(e)
    for e in old.values():
        if e.id not in new and (e.service is not None or e.loading is not None):
            new[e.id] = e
    return new
