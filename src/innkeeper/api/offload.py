"""Large JSON bodies are parsed and validated on the service's worker threads.

FastAPI parses a request's JSON body and validates it against the route's model on the event
loop, before the route runs. That costs ~5 us per chat message: a 40k-message chat stalled
every other client for ~0.25 s, a 32 MiB body of tiny messages for seconds. Routes of the
routers that use `OffLoopBodyRoute` get their large bodies parsed and validated off the
loop; FastAPI then finds the validated model in Starlette's per-request JSON cache, and a
model instance validates again in microseconds. Small bodies take FastAPI's usual path.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from innkeeper.api.state import registry_of

OFF_LOOP_BODY_BYTES = 64 * 1024  # smaller bodies cost the loop a few milliseconds at most


class OffLoopBodyRoute(APIRoute):
    """An APIRoute whose large JSON body model is built on a worker thread."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()
        model = self.body_field.field_info.annotation if self.body_field is not None else None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return handler

        async def route(request: Request) -> Response:
            ctype = request.headers.get("content-type", "")
            if ctype.split(";")[0].strip().lower() == "application/json":
                body = await request.body()  # Starlette keeps it for the handler
                if len(body) >= OFF_LOOP_BODY_BYTES:
                    # Starlette's Request.json() returns this cached value: FastAPI uses it.
                    request._json = await registry_of(request).off_loop(  # type: ignore[attr-defined]
                        lambda: _parse(model, body)
                    )
            return await handler(request)

        return route


def _parse(model: type[BaseModel], body: bytes) -> Any:
    """The body as a validated model, or the errors FastAPI itself would have raised."""
    try:
        data = json.loads(body)
    except json.JSONDecodeError as exc:
        raise RequestValidationError(
            [
                {
                    "type": "json_invalid",
                    "loc": ("body", exc.pos),
                    "msg": "JSON decode error",
                    "input": {},
                    "ctx": {"error": exc.msg},
                }
            ]
        ) from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        raise RequestValidationError(
            [{**err, "loc": ("body", *err["loc"])} for err in errors]
        ) from None
