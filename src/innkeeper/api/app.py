"""The FastAPI factory: every route family on one port, auth, error shapes, the web page."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Receive, Scope, Send

from innkeeper import __version__
from innkeeper.api import (
    embeddings,
    kobold,
    llamacpp,
    metrics,
    model_routes,
    ollama,
    ooba,
    openai,
    openai_models,
    status,
    store_routes,
    tune_routes,
)
from innkeeper.api.docs import install_docs
from innkeeper.api.errors import family, install_handlers
from innkeeper.api.limits import BodyLimitMiddleware
from innkeeper.api.params import TOKEN_BANS_SYNTAX
from innkeeper.api.security import (
    LOOPBACK_ORIGIN_REGEX,
    ApiKeyMiddleware,
    HostGuardMiddleware,
)
from innkeeper.api.state import ModelLeaseMiddleware
from innkeeper.api.streaming import SERVER_SEND
from innkeeper.engine.templates import BUILTIN_FORMATS
from innkeeper.serving.registry import ModelRegistry
from innkeeper.settings.server import ServerConfig

STATIC = Path(__file__).resolve().parent.parent / "web" / "static"


NO_CACHE = {"Cache-Control": "no-cache"}
# Middlewares whose `send` wrapper only looks at (or changes) `http.response.start`.
STREAM_SAFE_MIDDLEWARE: frozenset[Any] = frozenset(
    {
        ModelLeaseMiddleware,
        ApiKeyMiddleware,
        BodyLimitMiddleware,
        CORSMiddleware,
        HostGuardMiddleware,
    }
)
# Module scripts load only with a JavaScript type; the OS's MIME table (Windows' registry)
# may map .js to text/plain, so the page's scripts do not depend on it.
JS_TYPE = "text/javascript; charset=utf-8"


class RevalidatedStaticFiles(StaticFiles):
    """The page's files, revalidated on every load so an upgrade is picked up at once
    (ES modules import each other, so query-string versioning cannot reach them)."""

    def file_response(self, full_path: Any, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(full_path, *args, **kwargs)
        response.headers.update(NO_CACHE)
        if response.status_code == 200 and str(full_path).endswith(".js"):
            response.headers["content-type"] = JS_TYPE
        return response


class InnkeeperApp(FastAPI):
    """FastAPI that leaves the server's own `send` in the scope: streams write their body
    messages there, past the middlewares, each of which would otherwise wrap every token's
    write in a coroutine of its own. Every middleware here (`install_guards`, Starlette's
    error and exception layers) looks at `http.response.start` only; one that rewrites
    bodies (compression) is refused until streams are taught to write through it."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope[SERVER_SEND] = send
        await super().__call__(scope, receive, send)

    def build_middleware_stack(self) -> ASGIApp:
        unsafe = [m.cls for m in self.user_middleware if m.cls not in STREAM_SAFE_MIDDLEWARE]
        if unsafe:
            raise TypeError(f"streams would write past these middlewares' send: {unsafe}")
        return super().build_middleware_stack()


def create_app(registry: ModelRegistry, config: ServerConfig) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        registry.start()  # idle unload runs on the server's event loop
        try:
            yield
        finally:
            await registry.stop()

    app = InnkeeperApp(
        lifespan=lifespan,
        title="innkeeper",
        version=__version__,
        description=(
            "A self-hosted LLM server. One port serves the OpenAI, KoboldAI/KoboldCpp, "
            "text-generation-webui and llama.cpp route families."
        ),
        docs_url=None,  # install_docs serves /docs and /redoc without CDNs
        redoc_url=None,
    )
    app.state.registry = registry
    app.state.config = config
    install_handlers(app)
    for module in (
        model_routes,
        openai,
        openai_models,
        embeddings,
        kobold,
        ooba,
        llamacpp,
        status,
        metrics,
    ):
        app.include_router(module.router)
    app.include_router(store_routes.router)  # pull and delete, for the page's Models panel
    app.include_router(tune_routes.router)  # `innkeeper tune` for the page's Models panel
    app.include_router(ollama.router)  # Ollama's API (SillyTavern's Ollama type)
    install_docs(app)

    index = STATIC / "index.html"
    if STATIC.is_dir():
        app.mount("/static", RevalidatedStaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def root() -> object:
        if index.is_file():
            return FileResponse(index, headers=NO_CACHE)
        return JSONResponse(
            {"name": "innkeeper", "version": __version__, "model": registry.default_id}
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
    {
        "/v1/completions",
        "/v1/chat/completions",
        "/api/v1/generate",
        "/api/extra/generate/stream",
        "/completion",
        "/infill",
    }
)
# One server-sent event (OpenAPI 3.1: the `schema` of an event stream describes each event):
# `data` is a JSON chunk in the family's shape, or `[DONE]`; keep-alive comments carry none.
SSE_EVENT: dict[str, Any] = {
    "type": "object",
    "required": ["data"],
    "properties": {"event": {"type": "string"}, "data": {"type": "string"}},
}
SSE_ONLY_PATHS = frozenset({"/api/extra/generate/stream"})
# Routes that never resolve, load or wait for a model (everything else may answer 404 for an
# unknown name, 409 with --no-autoload or a plan that does not fit, 500 for a failed load,
# 503 while it loads).
MODEL_FREE_PATHS = frozenset(
    {
        "/health",
        "/v1/internal/health",
        "/v1/models",
        "/models",
        "/api/innkeeper/models",
        "/v1/internal/model/list",
        "/v1/internal/model/info",
        "/v1/internal/stop-generation",
        "/api/v1/model",
        "/api/v1/info/version",
        "/api/v1/config/max_length",
        "/api/v1/config/soft_prompts_list",
        "/api/v1/config/soft_prompt",
        "/api/extra/version",
        "/api/extra/abort",
        "/api/extra/generate/check",
        "/metrics",
    }
)
STATUS_TEXT = {
    "400": "Bad request: invalid parameters, or an unknown Host on a loopback server",
    "401": "Missing or wrong API key (when the server has one)",
    "403": "A browser page from an origin the server does not allow (see --cors-origin)",
    "404": "Not found (for a model name: the message lists the available models)",
    "409": "The model is not loaded (--no-autoload) or does not fit in memory (load routes)",
    "500": "The model failed to load (the message says why; the previous default still serves)",
    "413": "Request body larger than --max-body",
    "422": "Invalid request body",
    "503": "Every slot busy and the queue full (--parallel, --max-queue), or the model still "
    "loading: retry after Retry-After",
    "504": "The generation took longer than --request-timeout and was stopped",
}


# Fields whose integers are token ids; lengths in tokens, bounded by the context.
IMAGE_FIELDS = frozenset({"images", "image_data"})  # base64 images (KoboldCpp, llama.cpp)
TOKEN_ID_FIELDS = frozenset({"prompt", "tokens", "custom_token_bans", "input", "content"})
# Text with a language of its own, named as a string `format` (tests register generators)
TEXT_FORMATS = {
    "grammar": "gbnf",
    "grammar_string": "gbnf",
    "dry_sequence_breakers": "json-string-list",
}
LENGTH_FIELDS = frozenset(
    {"max_tokens", "max_new_tokens", "max_completion_tokens", "num_predict", "max_length"}
)


def _bound_integers(node: Any, low: int, high: int) -> None:
    """Give every integer schema under `node` the range [low, high]."""
    if isinstance(node, dict):
        if node.get("type") == "integer":
            node["minimum"], node["maximum"] = low, high
        for value in node.values():
            _bound_integers(value, low, high)
    elif isinstance(node, list):
        for value in node:
            _bound_integers(value, low, high)


def decimal_range(high: int) -> str:
    """A regex matching the decimal numbers 0..high (no leading zeros, no sign)."""
    digits = str(high)
    parts = ["0", *("[1-9]" + "[0-9]" * (n - 1) for n in range(1, len(digits)))]
    for i, d in enumerate(digits):
        low = 1 if i == 0 else 0
        if int(d) > low:
            rest = "[0-9]" * (len(digits) - i - 1)
            parts.append(f"{digits[:i]}[{low}-{int(d) - 1}]{rest}")
    parts.append(digits)
    return "^(" + "|".join(dict.fromkeys(parts)) + ")$"


def template_names(default_template: str) -> str:
    """A regex of the template names a request may give: built-ins and the model's own,
    in any case, with `-`, `_` or spaces anywhere (as `template_by_name` compares them)."""
    sep = "[-_ ]*"
    names = dict.fromkeys(["model", "default", "gguf", default_template, *BUILTIN_FORMATS])
    spelled = [
        sep
        + "".join(
            f"[{c.lower()}{c.upper()}]{sep}" if c.isalpha() else f"{re.escape(c)}{sep}"
            for c in name.lower().replace("-", "").replace("_", "").replace(" ", "")
        )
        for name in names
    ]
    return "^(" + "|".join([sep, *spelled]) + ")$"


def _string_branch(prop: dict[str, Any]) -> dict[str, Any]:
    """The `{"type": "string"}` alternative of a property (or the property itself)."""
    for branch in prop.get("anyOf", []):
        if branch.get("type") == "string":
            return branch
    return prop


def _image_lists(prop: dict[str, Any], max_images: int) -> None:
    """Bound a list of images (`images`, `image_data`) by what the server takes: none when
    the model cannot see, else `--max-images` base64 images (`format: image-base64`)."""
    for branch in prop.get("anyOf", [prop]):
        if branch.get("type") != "array":
            continue
        branch["maxItems"] = max_images
        items = branch.get("items", {})
        target = items.get("properties", {}).get("data", items)  # llama.cpp's {"data", "id"}
        if max_images and target.get("type") == "string":
            target["format"] = "image-base64"


def document_limits(
    schema: dict[str, Any],
    *,
    n_ctx: int,
    n_vocab: int,
    default_template: str,
    max_images: int = 0,
) -> None:
    """Write into the request bodies what the server enforces beyond JSON types: token ids
    within the vocabulary and lengths within the context (known once the model is loaded),
    the syntax of text-valued lists, the template names, and OpenAI's logprobs rule."""
    for body in schema.get("components", {}).get("schemas", {}).values():
        props = body.get("properties", {})
        for name, prop in props.items():
            if name in TOKEN_ID_FIELDS:
                _bound_integers(prop, 0, n_vocab - 1)
                if name == "custom_token_bans":  # or as text, "1,2,3"
                    ids = decimal_range(n_vocab - 1)[1:-1]
                    _string_branch(prop)["pattern"] = f"^{TOKEN_BANS_SYNTAX.format(id=ids)}$"
            elif name in LENGTH_FIELDS:
                prop.update(minimum=1, maximum=n_ctx)
            elif name == "n_predict":  # llama.cpp's -1: until the context is full
                prop.update(minimum=-1, maximum=n_ctx, description="-1: until the context is full")
                prop["not"] = {"const": 0}
            elif name in ("truncation_length", "max_context_length"):
                prop["not"] = {"const": 1}  # 0: no limit; 1 leaves no room to generate
            elif name in TEXT_FORMATS:
                _string_branch(prop)["format"] = TEXT_FORMATS[name]
            elif name == "logit_bias":  # keys are token ids
                for branch in prop.get("anyOf", [prop]):
                    if branch.get("type") == "object":
                        branch["propertyNames"] = {"pattern": decimal_range(n_vocab - 1)}
            elif name in ("instruction_template", "chat_template"):
                prop["pattern"] = template_names(default_template)
            elif name == "sampler_order":
                _bound_integers(prop, 0, 6)  # KoboldCpp's sampler ids
            elif name in IMAGE_FIELDS:
                _image_lists(prop, max_images)
        if body.get("title") == "ImageData" and max_images:  # llama.cpp's {"data", "id"}
            props["data"]["format"] = "image-base64"
        if "top_logprobs" in props and "logprobs" in props:  # OpenAI: a 400 otherwise
            needs = {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}
            unset = {"properties": {"top_logprobs": {"type": "null"}}}
            body["dependentSchemas"] = {"top_logprobs": {"anyOf": [unset, needs]}}


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
        service = app.state.registry.default.service
        if service is not None:  # the limits are the default model's
            document_limits(
                schema,
                n_ctx=service.n_ctx,
                n_vocab=service.n_vocab,
                default_template=service.template.name,
                max_images=app.state.config.max_images if service.vision else 0,
            )
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
                if path not in MODEL_FREE_PATHS:  # names or loads a model, or uses the default
                    codes += ["404", "409", "500", "503"]
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
    Pages on this machine (any loopback port) get CORS by default, as with Ollama; other
    origins need `--cors-origin`.
    """
    # An admin key also opens the API (an admin may use what they manage).
    api_keys = (*config.api_keys, *config.admin_keys) if config.api_keys else ()
    app.add_middleware(ModelLeaseMiddleware)
    app.add_middleware(ApiKeyMiddleware, keys=api_keys)
    app.add_middleware(BodyLimitMiddleware, max_body=config.max_body)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=config.cors_origins,
        allow_origin_regex=LOOPBACK_ORIGIN_REGEX,
        allow_methods=["*"],
        allow_headers=["*"],
        allow_private_network=True,  # Chromium's preflight from an https page (hosted Lite)
        max_age=600,
    )
    app.add_middleware(
        HostGuardMiddleware,
        bound_host=config.host,
        port=config.port,
        allowed_hosts=config.allowed_hosts,
        cors_origins=config.cors_origins,
        check_host=config.loopback,
        check_origin=not config.api_keys,
    )
