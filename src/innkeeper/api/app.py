"""The FastAPI factory: every route family on one port, auth, error shapes, the web page."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles

from innkeeper import __version__
from innkeeper.api import kobold, llamacpp, metrics, ooba, openai, status
from innkeeper.api.errors import family, install_handlers
from innkeeper.api.limits import BodyLimitMiddleware
from innkeeper.api.security import ApiKeyMiddleware, HostGuardMiddleware
from innkeeper.api.service import Service
from innkeeper.config import ServerConfig

STATIC = Path(__file__).resolve().parent.parent / "web" / "static"


NO_CACHE = {"Cache-Control": "no-cache"}


class RevalidatedStaticFiles(StaticFiles):
    """The page's files, revalidated on every load so an upgrade is picked up at once
    (ES modules import each other, so query-string versioning cannot reach them)."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers.update(NO_CACHE)
        return response


def create_app(service: Service, config: ServerConfig) -> FastAPI:
    app = FastAPI(
        title="innkeeper",
        version=__version__,
        description=(
            "A self-hosted LLM server. One port serves the OpenAI, KoboldAI/KoboldCpp, "
            "text-generation-webui and llama.cpp route families."
        ),
    )
    app.state.service = service
    app.state.config = config
    app.state.memory_plan = None  # filled by the server from the memory calculator
    install_handlers(app)
    for module in (openai, kobold, ooba, llamacpp, status, metrics):
        app.include_router(module.router)

    index = STATIC / "index.html"
    if STATIC.is_dir():
        app.mount("/static", RevalidatedStaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def root() -> object:
        if index.is_file():
            return FileResponse(index, headers=NO_CACHE)
        return JSONResponse(
            {"name": "innkeeper", "version": __version__, "model": service.model_id}
        )

    install_guards(app, config)
    document_errors(app)
    return app


ERROR_SCHEMAS: dict[str, dict[str, Any]] = {
    "openai": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type"],
                "properties": {"message": {"type": "string"}, "type": {"type": "string"}},
            }
        },
    },
    "kobold": {
        "type": "object",
        "required": ["detail"],
        "properties": {
            "detail": {
                "type": "object",
                "required": ["msg", "type"],
                "properties": {"msg": {"type": "string"}, "type": {"type": "string"}},
            }
        },
    },
    "ooba": {
        "type": "object",
        "required": ["detail"],
        "properties": {"detail": {"type": "string"}},
    },
    "llamacpp": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message", "type"],
                "properties": {
                    "code": {"type": "integer"},
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                },
            }
        },
    },
}
# Routes that queue a generation: they may answer 503 (queue full) or 504 (--request-timeout).
GENERATE_PATHS = frozenset(
    {"/v1/completions", "/v1/chat/completions", "/api/v1/generate", "/api/extra/generate/stream"}
)
# One server-sent event (OpenAPI 3.1: the `schema` of an event stream describes each event):
# `data` is a JSON chunk in the family's shape, or `[DONE]`; keep-alive comments carry none.
SSE_EVENT: dict[str, Any] = {
    "type": "object",
    "required": ["data"],
    "properties": {"event": {"type": "string"}, "data": {"type": "string"}},
}
SSE_ONLY_PATHS = frozenset({"/api/extra/generate/stream"})
STATUS_TEXT = {
    "400": "Bad request: invalid parameters, or an unknown Host on a loopback server",
    "401": "Missing or wrong API key (when the server has one)",
    "403": "A browser page from an origin --cors-origin does not allow",
    "404": "Not found",
    "413": "Request body larger than --max-body",
    "422": "Invalid request body",
    "503": "Every slot busy and the queue full (--parallel, --max-queue): retry after Retry-After",
    "504": "The generation took longer than --request-timeout and was stopped",
}


def document_errors(app: FastAPI) -> None:
    """Describe each route family's real error answers in the OpenAPI document.

    FastAPI documents a 422 `HTTPValidationError` everywhere; the OpenAI and llama.cpp
    families answer 400 instead, and every family uses its own error shape. Clients and
    schema-driven fuzzers (schemathesis) read the document, so it must say what happens.
    """
    base = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = base()
        comps = schema.setdefault("components", {}).setdefault("schemas", {})
        for fam, body in ERROR_SCHEMAS.items():
            comps[f"Error_{fam}"] = body
        for path, item in schema.get("paths", {}).items():
            fam = family(path)
            ref = {"application/json": {"schema": {"$ref": f"#/components/schemas/Error_{fam}"}}}
            for op in item.values():
                responses = op.setdefault("responses", {})
                codes = ["400", "401", "403", "413"]
                if "requestBody" in op or "parameters" in op:
                    codes.append("422" if fam in ("kobold", "ooba") else "400")
                if "{" in path:
                    codes.append("404")
                if path in GENERATE_PATHS:
                    codes += ["503", "504"]
                    ok = responses.setdefault("200", {"description": "Successful Response"})
                    stream = {"text/event-stream": {"schema": SSE_EVENT}}
                    if path in SSE_ONLY_PATHS:
                        ok["content"] = stream
                    else:
                        ok.setdefault("content", {}).update(stream)
                if fam in ("openai", "llamacpp"):
                    responses.pop("422", None)
                for code in dict.fromkeys(codes):
                    responses[code] = {"description": STATUS_TEXT[code], "content": ref}
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def install_guards(app: FastAPI, config: ServerConfig) -> None:
    """Outermost first: Host/Origin guard, CORS, body cap, API key, then the routes.

    The guard runs before CORS so a rebinding page gets nothing; CORS runs before the key
    check so a browser can read a 401 and its preflight (which carries no key) succeeds.
    """
    app.add_middleware(ApiKeyMiddleware, keys=config.api_keys)
    app.add_middleware(BodyLimitMiddleware, max_body=config.max_body)
    if config.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=config.cors_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            max_age=600,
        )
    app.add_middleware(
        HostGuardMiddleware,
        bound_host=config.host,
        allowed_hosts=config.allowed_hosts,
        cors_origins=config.cors_origins,
        check_host=config.loopback,
        check_origin=not config.api_keys,
    )
