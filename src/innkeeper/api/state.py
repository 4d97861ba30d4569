"""Access to the per-app objects routes need (kept on `app.state`, set by the app factory)."""

from __future__ import annotations

from fastapi import Request

from innkeeper.api.service import Service


def service_of(request: Request) -> Service:
    return request.app.state.service
