"""llama-server's slot routes: GET /slots, POST /slots/{id}?action=save|restore|erase.

Not admin actions: they change no model and no setting, only one slot's prompt cache (what
the next request on that slot reuses), which any client's requests change all the time. So
the API key suffices, and the Origin check applies as to every other POST. Save and restore
need `--slot-save-path` (without it a 403: llama-server answers 501, but here a 5xx always
means the server failed) and take a file name, never a path. A status read never loads a
model: /slots describes the loaded default model (or `?model=`); one that is not loaded has
no slots to show.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Query, Request

from innkeeper.api.errors import ApiError
from innkeeper.api.llamacpp_completion import params_json
from innkeeper.api.offload import OffLoopBodyRoute
from innkeeper.api.params import JsonBody
from innkeeper.api.state import registry_of, use_model
from innkeeper.serving import slot_files
from innkeeper.serving.errors import ModelNotLoaded

router = APIRouter(tags=["llama.cpp"], route_class=OffLoopBodyRoute)


class SlotFileBody(JsonBody):
    filename: str = ""


@router.get("/slots")
async def slots(
    request: Request, model: str | None = None, fail_on_no_slot: int = 0
) -> list[dict[str, Any]]:
    """Each slot of the model: whether it is processing, with which samplers, and how far."""
    entry = registry_of(request).entry_for(model)
    service = entry.service if entry.ready else None
    if service is None:
        raise ModelNotLoaded(f"model {entry.id!r} is not loaded: it has no slots to show")
    out = []
    for s in slot_files.views(service):
        busy = s.state != "idle"
        params: dict[str, Any] = {"n_predict": s.max_tokens if busy else -1}
        if s.params is not None:
            params.update(params_json(s.params))
        out.append(
            {
                "id": s.id,
                "id_task": s.request_id if s.request_id is not None else -1,
                "n_ctx": service.n_ctx,
                "speculative": False,
                "is_processing": busy,
                "state": s.state,
                "n_cached": s.n_cached,
                "params": params,
                "next_token": {
                    "has_next_token": busy,
                    "n_remain": s.max_tokens - s.n_decoded if busy else -1,
                    "n_decoded": s.n_decoded,
                },
            }
        )
    if fail_on_no_slot and all(s["is_processing"] for s in out):
        raise ApiError(503, "no slot available", "unavailable_error")
    return out


def _folder(request: Request) -> Path:
    folder = request.app.state.config.slot_save_path
    if not folder:
        raise ApiError(  # llama-server's 501; innkeeper keeps 5xx for its own failures
            403,
            "slot save and restore are off: start the server with --slot-save-path DIR",
            "not_supported_error",
        )
    path = Path(folder).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


@router.post("/slots/{id_slot}")
async def slot_action(
    request: Request,
    id_slot: int,
    action: Literal["save", "restore", "erase"] = Query(...),
    body: SlotFileBody | None = None,
) -> dict[str, Any]:
    service = await use_model(request)
    if action == "erase":
        n = await slot_files.erase(service, id_slot)
        return {"id_slot": id_slot, "n_erased": n}
    name = body.filename if body is not None else ""
    path = slot_files.slot_path(_folder(request), name)
    if action == "save":
        res = await slot_files.save(service, id_slot, path)
        return {
            "id_slot": id_slot,
            "filename": name,
            "n_saved": res.tokens,
            "n_written": res.size,
            "timings": {"save_ms": round(res.ms, 3)},
        }
    res = await slot_files.restore(service, id_slot, path)
    return {
        "id_slot": id_slot,
        "filename": name,
        "n_restored": res.tokens,
        "n_read": res.size,
        "timings": {"restore_ms": round(res.ms, 3)},
    }
