"""Access to the per-app objects routes need (kept on `app.state`, set by the app factory).

Routes reach a model only through its `Service`: `use_model` picks it (by name, or the
current default), loading or waiting for it, and holds it for the request's whole life so
the registry never unloads a model a request is still using (`ModelLeaseMiddleware`
releases it when the response is over, streams included).
"""

from __future__ import annotations

from typing import Any

from fastapi import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from innkeeper.api.admin import caller_of
from innkeeper.serving.registry import ModelRegistry
from innkeeper.serving.service import Service

LEASES = "innkeeper.leases"


def registry_of(request: Request) -> ModelRegistry:
    return request.app.state.registry


async def use_model(request: Request, name: str | None = None, keep_alive: Any = None) -> Service:
    """The service for the model a request names (None: the default), held until the
    response ends; every route that uses a model calls this first."""
    chosen = getattr(request.state, "service", None)
    if chosen is not None and (not name or registry_of(request).resolve(name).service is chosen):
        return chosen
    service = await registry_of(request).service_for(name, keep_alive, caller=caller_of(request))
    service.users += 1
    leases = request.scope.get(LEASES)
    if leases is None:  # not behind the middleware (an app without it): release at once
        service.users -= 1
    else:
        leases.append(service)
    request.state.service = service
    return service


class ModelLeaseMiddleware:
    """Hands back the models a request held once its response (or stream) is over."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        leases: list[Service] = []
        scope[LEASES] = leases
        try:
            await self.app(scope, receive, send)
        finally:
            for service in leases:
                service.users -= 1
                service.touch()
