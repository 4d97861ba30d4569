"""llama-server's slot actions: save a slot's tokens and KV state to a file, restore, erase.

Files live in one folder (`--slot-save-path`); a client names a file, never a path, so a
name that could leave the folder (separators, `..`, NUL) is refused before anything touches
the disk. Each save also writes a small sidecar naming the model, so a restore with another
model is refused with a clear message instead of garbage output; a file without a sidecar
(written by llama-server itself) is left to llama.cpp's own checks of the state's shapes.
The work runs on the engine thread (the only one that may touch the context), and only on
an idle slot: a slot that is processing a request is a Conflict.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from innkeeper.engine.engine import EngineLost, SlotView
from innkeeper.engine.slots import SlotBusy, SlotFileError
from innkeeper.serving.errors import Conflict, NotFound, ParamError, ServingError, WorkerLost
from innkeeper.serving.service import Service

SIDECAR = ".innkeeper.json"  # beside each saved file: which model wrote it
MAX_NAME_BYTES = 255 - len(SIDECAR)  # the sidecar's name must fit the file system's 255


@dataclass(frozen=True)
class SlotFileResult:
    tokens: int
    size: int  # bytes written or read
    ms: float


def slot_path(directory: Path, name: str) -> Path:
    """The file `name` inside `directory`, or a ParamError for a name that is not a plain
    file name (a path, `..`, a hidden or control character, a sidecar's name)."""
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError as exc:  # a lone surrogate: no file can have that name
        raise ParamError("filename is not valid Unicode text") from exc
    if not 0 < size <= MAX_NAME_BYTES:
        raise ParamError(f"filename must be 1 to {MAX_NAME_BYTES} bytes of UTF-8")
    if any(c in name for c in "/\\") or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ParamError("filename must be a plain file name: no path separators or control bytes")
    if name.startswith(".") or name != name.strip() or name.endswith(SIDECAR):
        raise ParamError(f"filename {name[:100]!r} is not allowed (hidden, padded or reserved)")
    root = directory.resolve()
    path = root / name
    if path.resolve().parent != root:  # a symlink in the folder that points elsewhere
        raise ParamError(f"filename {name[:100]!r} leads outside the slot folder")
    return path


def _identity(service: Service) -> dict[str, Any]:
    """What tells models apart (not the file name: a renamed model is the same model)."""
    info = service.info
    return {
        "description": info.description,
        "n_vocab": info.n_vocab,
        "n_params": info.n_params,
        "size_bytes": info.size_bytes,
    }


def views(service: Service) -> tuple[SlotView, ...]:
    """Each slot's state now, for GET /slots."""
    return service.engine.slots()


def _check_slot(service: Service, slot_id: int) -> None:
    n = service.stats().slots
    if not 0 <= slot_id < n:
        raise NotFound(f"no slot {slot_id}: this model has slots 0 to {n - 1}")


async def _on_engine(future: Any) -> Any:
    try:
        return await asyncio.wrap_future(future)
    except SlotBusy as exc:
        raise Conflict(f"{exc}: try again when it is idle") from exc
    except EngineLost as exc:  # the engine's guard: a lost worker ended the wait
        raise WorkerLost(exc.message) from exc


async def save(service: Service, slot_id: int, path: Path) -> SlotFileResult:
    _check_slot(service, slot_id)
    t0 = time.monotonic()
    try:
        tokens, size = await _on_engine(service.engine.save_slot(slot_id, path))
    except SlotFileError as exc:
        raise ServingError(str(exc)) from exc
    sidecar = path.with_name(path.name + SIDECAR)
    record = {"model": service.info.path.name, **_identity(service)}
    sidecar.write_text(json.dumps(record), encoding="utf-8")
    return SlotFileResult(tokens, size, (time.monotonic() - t0) * 1000)


async def restore(service: Service, slot_id: int, path: Path) -> SlotFileResult:
    _check_slot(service, slot_id)
    if not path.is_file():
        raise NotFound(f"no slot file {path.name!r}")
    sidecar = path.with_name(path.name + SIDECAR)
    if sidecar.is_file():
        try:
            saved = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ParamError(f"the slot file's model record is unreadable: {exc}") from exc
        if not isinstance(saved, dict):
            raise ParamError("the slot file's model record is not a JSON object")
        ours = _identity(service)
        if {k: saved.get(k) for k in ours} != ours:
            raise ParamError(
                f"slot file {path.name!r} was saved with model {saved.get('model')!r}, "
                f"not {service.info.path.name!r}"
            )
    t0 = time.monotonic()
    try:
        tokens, size = await _on_engine(service.engine.restore_slot(slot_id, path))
    except SlotFileError as exc:
        raise ParamError(str(exc)) from exc
    return SlotFileResult(tokens, size, (time.monotonic() - t0) * 1000)


async def erase(service: Service, slot_id: int) -> int:
    _check_slot(service, slot_id)
    n: int = await _on_engine(service.engine.erase_slot(slot_id))
    return n
