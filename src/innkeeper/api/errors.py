"""Errors in the shape each client family expects, and the handlers that produce them.

OpenAI clients read `{"error": {"message", "type"}}`; KoboldAI/KoboldCpp clients and
text-generation-webui read `{"detail": …}`; llama.cpp's server answers
`{"error": {"code", "message", "type"}}`; Ollama's routes answer `{"error": "..."}`.
SillyTavern shows any of them as a toast.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from innkeeper.engine.events import ErrorKind, FinishEvent
from innkeeper.serving import errors as serving

log = logging.getLogger("innkeeper.api")


class ApiError(Exception):
    """Raised by route code: becomes a response in the caller's family shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.headers = headers


# The one table from the runtime's refusals to HTTP: (status, error type). Looked up along
# the exception's class hierarchy, so a new subclass inherits its parent's row.
SERVING_STATUS: dict[type[serving.ServingError], tuple[int, str]] = {
    serving.ServingError: (500, "server_error"),
    serving.ParamError: (400, "invalid_request_error"),
    serving.ClientGone: (400, "invalid_request_error"),
    serving.ModelNotFound: (404, "not_found_error"),
    serving.NotFound: (404, "not_found"),
    serving.ModelNotLoaded: (409, "model_not_loaded"),
    serving.AdminRequired: (403, "permission_error"),
    serving.ModelBusy: (503, "service_unavailable"),
    serving.BadLoadRequest: (400, "invalid_request_error"),
    serving.InsufficientMemory: (409, "insufficient_memory"),
    serving.LoadFailed: (500, "load_error"),
    serving.Conflict: (409, "invalid_request_error"),
    serving.TooManyJobs: (429, "rate_limit_error"),
    serving.StoreFailed: (500, "server_error"),
    serving.WorkerLost: (502, "server_error"),  # as ERROR_KINDS[WORKER_LOST]
}

# How each kind of engine failure reaches the client: (HTTP status, error type).
ERROR_KINDS: dict[ErrorKind, tuple[int, str]] = {
    ErrorKind.GRAMMAR: (400, "invalid_request_error"),
    ErrorKind.CONTEXT_OVERFLOW: (503, "service_unavailable"),
    ErrorKind.TIMEOUT: (504, "timeout_error"),
    ErrorKind.WORKER_LOST: (502, "server_error"),
    ErrorKind.SAMPLING: (500, "server_error"),
    ErrorKind.INTERNAL: (500, "server_error"),
}


def from_serving(exc: serving.ServingError) -> ApiError:
    """A runtime refusal as an HTTP error (the family's shape is applied when it is sent)."""
    status, type_ = next(SERVING_STATUS[cls] for cls in type(exc).__mro__ if cls in SERVING_STATUS)
    headers = None
    if exc.retry_after is not None:
        headers = {"Retry-After": f"{exc.retry_after:g}"}
    return ApiError(status, exc.message, type_, headers=headers)


def finish_error(ev: FinishEvent) -> ApiError:
    """The error response for a request the engine ended with reason "error"."""
    status, type_ = ERROR_KINDS[ev.error_kind or ErrorKind.INTERNAL]
    return ApiError(status, ev.error or "generation failed", type_)


def check_finish(ev: FinishEvent) -> None:
    """An engine-side failure of one request becomes that request's error response."""
    if ev.reason == "error":
        raise finish_error(ev)


# Ollama's routes (its docs/api.md), by exact path: the rest of /api/ is KoboldAI/KoboldCpp's
# (/api/v1/*, /api/extra/*) and innkeeper's (/api/innkeeper/*), each with its own shape. The
# Ollama routes innkeeper does not serve are listed too, so an Ollama client reads their 404.
OLLAMA_PATHS = frozenset(
    {
        "/api/version",
        "/api/tags",
        "/api/show",
        "/api/ps",
        "/api/generate",
        "/api/chat",
        "/api/pull",
        "/api/delete",
        "/api/embed",
        "/api/embeddings",
        "/api/create",
        "/api/copy",
        "/api/push",
    }
)


def family(path: str) -> str:
    if path in OLLAMA_PATHS:
        return "ollama"
    if path.startswith("/v1/internal"):
        return "ooba"
    if path.startswith("/api/"):
        return "kobold"
    if path.startswith("/v1/"):
        return "openai"
    return "llamacpp"


def error_body(path: str, status: int, message: str, type_: str) -> dict[str, Any]:
    fam = family(path)
    if fam == "openai":
        return {"error": {"message": message, "type": type_, "param": None, "code": status}}
    if fam == "kobold":
        return {"detail": {"msg": message, "type": type_}}
    if fam == "ooba":
        return {"detail": message}
    if fam == "ollama":
        return {"error": message}
    return {"error": {"code": status, "message": message, "type": type_}}


def error_response(
    path: str, status: int, message: str, type_: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        error_body(path, status, message, type_), status_code=status, headers=headers
    )


def validation_message(exc: RequestValidationError) -> str:
    """One readable line per problem: `field: what is wrong`."""
    parts = []
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x not in ("body",)]
        where = ".".join(loc) or "body"
        if err.get("type") == "json_invalid":
            parts.append(f"the request body is not valid JSON ({err.get('msg', '')})")
        else:
            parts.append(f"{where}: {err.get('msg', 'invalid value')}")
    return "; ".join(dict.fromkeys(parts)) or "invalid request"


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(request.url.path, exc.status, exc.message, exc.type, exc.headers)

    @app.exception_handler(serving.ServingError)
    async def _serving_error(request: Request, exc: serving.ServingError) -> JSONResponse:
        err = from_serving(exc)
        return error_response(request.url.path, err.status, err.message, err.type, err.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        path = request.url.path
        status = 400 if family(path) in ("openai", "llamacpp", "ollama") else 422
        return error_response(path, status, validation_message(exc), "invalid_request_error")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return error_response(
            request.url.path, exc.status_code, str(exc.detail), type_, getattr(exc, "headers", None)
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return error_response(request.url.path, 500, f"internal error: {exc}", "server_error")
