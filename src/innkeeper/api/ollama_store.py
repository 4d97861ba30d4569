"""Ollama's /api/pull and /api/delete over innkeeper's store, admin actions as the page's.

Names are innkeeper's pull refs (`owner/repo`, `owner/repo:QUANT`, `owner/repo/file.gguf`)
and store names, not Ollama's registry names. A pull is a `PullJobs` job, the page's own:
its progress goes out as Ollama's NDJSON status lines, polled from the job. A client that
hangs up leaves the pull running (the page may be watching it; it resumes if pulled again).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import Field

from innkeeper.api.admin import require_admin
from innkeeper.api.errors import ApiError
from innkeeper.api.ollama_models import LATEST, OllamaRoute
from innkeeper.api.params import JsonBody
from innkeeper.api.state import registry_of
from innkeeper.api.store_routes import jobs_of
from innkeeper.api.streaming import NDJSON_TYPE, ndjson_line
from innkeeper.models import store
from innkeeper.serving.errors import NotFound
from innkeeper.serving.store_jobs import PullJob, delete_model

router = APIRouter(tags=["Ollama"], route_class=OllamaRoute, dependencies=[Depends(require_admin)])

POLL_SECONDS = 0.25


class StoreBody(JsonBody):
    model: str | None = None
    name: str | None = Field(None, description="Ollama's older spelling of `model`")
    stream: bool = True
    insecure: bool = False

    def target(self) -> str:
        name = (self.model or self.name or "").strip()
        if not name:
            raise ApiError(400, "model is required")
        return name


def _progress(job: PullJob) -> dict[str, Any]:
    return {
        "status": f"pulling {job.file or job.ref}",
        "digest": job.file or job.ref,
        "total": job.bytes_total,
        "completed": job.bytes_done,
    }


async def _statuses(job: PullJob) -> AsyncIterator[dict[str, Any]]:
    """Ollama's pull lines, from the job's state until it ends."""
    yield {"status": "pulling manifest"}
    last: dict[str, Any] | None = None
    while job.state == "running":
        if job.bytes_total:
            now = _progress(job)
            if now != last:
                yield now
                last = now
        await asyncio.sleep(POLL_SECONDS)
    if job.state == "done":
        if job.bytes_total:
            yield _progress(job)
        yield {"status": "verifying sha256 digest"}
        yield {"status": "writing manifest"}
        yield {"status": "success"}
    elif job.state == "cancelled":
        yield {"error": "the pull was cancelled"}
    else:
        yield {"error": job.error or "the pull failed"}


@router.post("/api/pull", include_in_schema=False)
async def pull(request: Request, body: StoreBody) -> Response:
    """Pull into the store; streamed as Ollama's status lines (each line its own chunk)."""
    job, _new = jobs_of(request).start(body.target())
    if body.stream:

        async def lines() -> AsyncIterator[bytes]:
            async for status in _statuses(job):
                yield ndjson_line(status)

        return StreamingResponse(lines(), media_type=NDJSON_TYPE)
    last: dict[str, Any] = {}
    async for status in _statuses(job):
        last = status
    if "error" in last:
        return JSONResponse(last, status_code=500)
    return JSONResponse(last)


@router.delete("/api/delete", include_in_schema=False)
async def delete(request: Request, body: StoreBody) -> Response:
    """Delete a store model (unloading it first); `name:latest` names `name` too."""
    name = body.target()
    registry, jobs, root = registry_of(request), jobs_of(request), store.models_dir()
    try:
        await delete_model(registry, jobs, name, root)
    except NotFound:
        if not name.lower().endswith(LATEST):
            raise ApiError(404, f"model '{name}' not found", "not_found_error") from None
        try:
            await delete_model(registry, jobs, name[: -len(LATEST)], root)
        except NotFound:
            raise ApiError(404, f"model '{name}' not found", "not_found_error") from None
    return Response(status_code=200)
