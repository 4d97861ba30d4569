"""Listing, loading and unloading models, in each client family's own shape.

- text-generation-webui: /v1/internal/model/list, /load, /unload (its Model tab's API);
- llama-server's router mode: GET /models, POST /models/load, POST /models/unload;
- innkeeper's page: /api/innkeeper/models, /load, /unload (entries with plan and settings).

Loads through text-generation-webui and innkeeper make the model the default (what requests
that name no model, such as SillyTavern's KoboldCpp and Oobabooga types, go to); a
llama-server load does not (there, every request names its model). Load and unload are
admin actions (api/admin.py).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse
from pydantic import ConfigDict, Field, create_model

from innkeeper.api.admin import ADMIN_OPENAPI, caller_of, require_admin
from innkeeper.api.params import JsonBody
from innkeeper.api.state import registry_of
from innkeeper.settings.load import load_fields, load_schema_rules

router = APIRouter()
admin = [Depends(require_admin)]

OK = '"OK"'


class TgwLoadBody(JsonBody):
    model_config = ConfigDict(
        extra="ignore", populate_by_name=True, strict=True, protected_namespaces=()
    )
    model_name: str
    args: dict[str, Any] | None = Field(
        None,
        description="ctx_size (n_ctx, max_seq_len), gpu_layers (n_gpu_layers), cache_type, "
        "flash_attn, parallel; other loader arguments are ignored",
    )
    settings: dict[str, Any] | None = None


class _LoadSettingsBody(JsonBody):
    model_config = ConfigDict(
        extra="forbid",
        populate_by_name=True,
        strict=True,
        json_schema_extra=load_schema_rules(),  # llama.cpp: a quantized V needs flash attention
    )

    def given(self) -> dict[str, Any] | None:
        """The settings given, or None (the entry's last settings, else the plan's)."""
        return self.model_dump(exclude_none=True) or None


# Fields, bounds and descriptions from the declarations (settings/load.py), as HTTP loads
# parse them: a loadable setting added to EngineConfig appears here by itself.
LoadSettings = create_model(
    "LoadSettings",
    __base__=_LoadSettingsBody,
    __doc__="Per-load settings; those left out come from the memory plan, as `serve` picks them.",
    **load_fields(),
)


class LlamaLoadBody(LoadSettings):
    """llama-server's router: `{"model"}`, here with any load setting beside it."""

    model: str


class ModelBody(JsonBody):
    model: str | None = None


class InnkeeperLoadBody(JsonBody):
    model: str
    settings: LoadSettings | None = None


# ---- text-generation-webui ----------------------------------------------------------------
@router.post(
    "/v1/internal/model/load",
    tags=["text-generation-webui"],
    dependencies=admin,
    openapi_extra=ADMIN_OPENAPI,
)
async def tgw_load(request: Request, body: TgwLoadBody) -> PlainTextResponse:
    """Load a model and make it the one requests without a model go to."""
    raw = {**(body.args or {})}
    await registry_of(request).load(
        body.model_name, raw, caller=caller_of(request), make_default=True, strict=False
    )
    return PlainTextResponse(OK, media_type="application/json")


@router.post(
    "/v1/internal/model/unload",
    tags=["text-generation-webui"],
    dependencies=admin,
    openapi_extra=ADMIN_OPENAPI,
)
async def tgw_unload(request: Request) -> PlainTextResponse:
    """Unload the current default model (it stays the default: the next request loads it)."""
    await registry_of(request).unload(None, caller=caller_of(request))
    return PlainTextResponse(OK, media_type="application/json")


# ---- llama-server router mode ---------------------------------------------------------------
@router.get("/models", tags=["llama.cpp"])
async def llama_models(request: Request) -> dict[str, Any]:
    registry = registry_of(request)
    await registry.rescan()
    caller = caller_of(request)
    rows = await registry.off_loop(
        lambda: [
            {
                "id": e.id,
                "object": "model",
                "owned_by": "innkeeper",
                "status": {"value": e.status, **({"failed": True} if e.error else {})},
                "args": registry.settings_of(e),
                "error": registry.shown(e.error, caller),
                "default": e.id == registry.default_id,
            }
            for e in registry.entries()
        ]
    )
    return {"object": "list", "data": rows}


@router.post("/models/load", tags=["llama.cpp"], dependencies=admin, openapi_extra=ADMIN_OPENAPI)
async def llama_load(request: Request, body: LlamaLoadBody) -> dict[str, Any]:
    settings = LoadSettings.model_validate(body.model_dump(exclude={"model"})).given()
    await registry_of(request).load(body.model, settings, caller=caller_of(request))
    return {"success": True}


@router.post("/models/unload", tags=["llama.cpp"], dependencies=admin, openapi_extra=ADMIN_OPENAPI)
async def llama_unload(request: Request, body: ModelBody) -> dict[str, Any]:
    await registry_of(request).unload(body.model, caller=caller_of(request))
    return {"success": True}


# ---- innkeeper (the page) -------------------------------------------------------------------
@router.get("/api/innkeeper/models", tags=["innkeeper"])
async def innkeeper_models(request: Request) -> dict[str, Any]:
    """Every available model with its status, plan on this machine and load settings."""
    registry = registry_of(request)
    await registry.rescan()
    caller = caller_of(request)
    models = await registry.off_loop(
        lambda: [registry.entry_json(e, caller) for e in registry.entries()]
    )
    return {"default": registry.default_id, "models": models, "memory": registry.memory_json()}


@router.post(
    "/api/innkeeper/models/load",
    tags=["innkeeper"],
    dependencies=admin,
    openapi_extra=ADMIN_OPENAPI,
)
async def innkeeper_load(request: Request, body: InnkeeperLoadBody) -> dict[str, Any]:
    """Load (blocks until loaded) and make it the default; 4xx with the reason otherwise."""
    registry = registry_of(request)
    settings = body.settings.given() if body.settings is not None else None
    await registry.load(body.model, settings, caller=caller_of(request), make_default=True)
    return {"success": True, "model": registry.resolve(body.model).id}


@router.post(
    "/api/innkeeper/models/unload",
    tags=["innkeeper"],
    dependencies=admin,
    openapi_extra=ADMIN_OPENAPI,
)
async def innkeeper_unload(request: Request, body: ModelBody) -> dict[str, Any]:
    entry = await registry_of(request).unload(body.model, caller=caller_of(request))
    return {"success": True, "model": entry.id}
