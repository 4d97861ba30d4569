"""Pulling models into the store and deleting them, over HTTP, for the page's Models panel.

A pull runs `innkeeper pull`'s own code (`hub.list_repo`, `hub.select`, `hub.pull`: resumable,
sha256-verified, manifest written atomically last) in a worker thread, so the event loop never
downloads or hashes. The page polls the job for progress and may cancel it: the download stops
at the next chunk and keeps its `.incomplete` file, so pulling the same ref again resumes it.
A finished pull re-scans the registry, so the new model is listed (and loadable) at once.

All of these are admin actions (`require_admin`): they fill or empty the disk.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from innkeeper.api.admin import ADMIN_OPENAPI, require_admin
from innkeeper.api.state import registry_of
from innkeeper.models import store
from innkeeper.serving.store_jobs import PullJobs, delete_model

router = APIRouter(prefix="/api/innkeeper", dependencies=[Depends(require_admin)])


class PullBody(BaseModel):
    ref: str = Field(min_length=3, max_length=400, description="owner/repo[:QUANT|/file.gguf]")


def jobs_of(request: Request) -> PullJobs:
    """The app's pull jobs, made on first use (the app factory need not know about them)."""
    app = request.app
    jobs = getattr(app.state, "pull_jobs", None)
    if jobs is None:
        registry = registry_of(request)
        loop = asyncio.get_running_loop()

        async def rescan() -> None:
            registry.refresh()

        def refresh() -> None:
            # The registry belongs to the event loop: re-scan there, and wait, so a job reads
            # "done" only once its model is listed.
            asyncio.run_coroutine_threadsafe(rescan(), loop).result(timeout=60)

        jobs = PullJobs(
            store.models_dir(),  # the store the registry lists and `innkeeper pull` fills
            registry.hardware,
            refresh,
        )
        app.state.pull_jobs = jobs
    return jobs


@router.post("/pull", tags=["innkeeper"], openapi_extra=ADMIN_OPENAPI)
async def start_pull(body: PullBody, request: Request) -> dict[str, Any]:
    """Start pulling `owner/repo`, `owner/repo:QUANT` or `owner/repo/file.gguf` into the store."""
    job, new = jobs_of(request).start(body.ref)
    return {"job": job.id, "started": new}


@router.get("/pull/{job_id}", tags=["innkeeper"], openapi_extra=ADMIN_OPENAPI)
async def pull_status(job_id: str, request: Request) -> dict[str, Any]:
    return jobs_of(request).get(job_id).to_json()


@router.post("/pull/{job_id}/cancel", tags=["innkeeper"], openapi_extra=ADMIN_OPENAPI)
async def cancel_pull(job_id: str, request: Request) -> dict[str, Any]:
    """Stop a pull at its next chunk; what came stays as a resumable partial download."""
    job = jobs_of(request).get(job_id)
    job.cancel.set()
    return job.to_json()


@router.delete("/models/{name}", tags=["innkeeper"], openapi_extra=ADMIN_OPENAPI)
async def delete_store_model(name: str, request: Request) -> dict[str, Any]:
    """Delete a pulled model from the store (unloading it first); see `delete_model`."""
    await delete_model(registry_of(request), jobs_of(request), name, store.models_dir())
    return {"success": True, "deleted": name}
