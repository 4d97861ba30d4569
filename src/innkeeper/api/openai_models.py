"""OpenAI's model list: /v1/models and /v1/models/{id}, with llama-server's `status` and meta.

SillyTavern reads the list to show the connected model (its KoboldCpp type shows data[0]);
every model a request may name is listed, loaded or not.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from innkeeper.api.offload import OffLoopBodyRoute
from innkeeper.api.state import registry_of
from innkeeper.serving.catalog import ModelEntry
from innkeeper.serving.registry import ModelRegistry

router = APIRouter(tags=["OpenAI"], route_class=OffLoopBodyRoute)


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    """Every model a request may name, loaded or not, the current default first (SillyTavern's
    KoboldCpp type shows data[0] as the connected model). Always 200 with a `data` list:
    SillyTavern hangs on anything else."""
    registry = registry_of(request)
    await registry.rescan()
    return {"object": "list", "data": [_model_card(registry, e) for e in registry.entries()]}


@router.get("/v1/models/{model_id:path}")
async def get_model(request: Request, model_id: str) -> dict[str, Any]:
    registry = registry_of(request)
    return _model_card(registry, registry.resolve(model_id))


def _model_card(registry: ModelRegistry, e: ModelEntry) -> dict[str, Any]:
    """OpenAI's model object, with llama-server's `status` and the model's numbers."""
    card: dict[str, Any] = {
        "id": e.id,
        "object": "model",
        "created": int(e.service.started) if e.service else 0,
        "owned_by": "innkeeper",
        "status": {"value": e.status},
        "meta": {"size": e.size_bytes},
        # llama-server's names: "multimodal" when the model takes images (a projector)
        "capabilities": ["completion", "multimodal"] if e.mmproj else ["completion"],
    }
    if e.service is not None:
        info = e.service.info
        card["meta"] = {
            "n_ctx": e.service.n_ctx,
            "n_ctx_train": info.n_ctx_train,
            "n_params": info.n_params,
            "n_vocab": info.n_vocab,
            "size": info.size_bytes,
        }
    return card
