"""`innkeeper tune` over HTTP, for the page's Models panel: start, poll, cancel, and which
models are tuned. Admin actions (`require_admin`): a tune saturates the machine for its budget.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from innkeeper.api.admin import ADMIN_OPENAPI, require_admin
from innkeeper.api.state import registry_of
from innkeeper.serving.tune_jobs import MAX_BUDGET_S, TuneJobs, tuned_models

router = APIRouter(prefix="/api/innkeeper", dependencies=[Depends(require_admin)])


class TuneBody(BaseModel):
    model: str | None = Field(None, max_length=400, description="a model id; none: the default")
    budget_s: float = Field(90.0, gt=0, le=MAX_BUDGET_S, description="time for the search")
    allow_kv_quant: bool = Field(False, description="also try quantized KV caches")
    prompt_tokens: int = Field(256, ge=1, le=4096, description="prompt tokens per run")
    gen_tokens: int = Field(32, ge=2, le=1024, description="tokens decoded per run")


def tune_jobs_of(request: Request) -> TuneJobs:
    """The app's tune jobs, made on first use (the app factory need not know about them)."""
    jobs = getattr(request.app.state, "tune_jobs", None)
    if jobs is None:
        jobs = TuneJobs(registry_of(request))
        request.app.state.tune_jobs = jobs
    return jobs


@router.post("/tune", tags=["innkeeper"], openapi_extra=ADMIN_OPENAPI)
async def start_tune(body: TuneBody, request: Request) -> dict[str, Any]:
    """Measure which settings run a model fastest here and save them as its profile (one tune
    at a time; each candidate runs in a child process, nothing is loaded into the server)."""
    job = tune_jobs_of(request).start(
        body.model,
        body.budget_s,
        allow_kv_quant=body.allow_kv_quant,
        n_prompt=body.prompt_tokens,
        n_gen=body.gen_tokens,
    )
    return job.to_json()


@router.get("/tune", tags=["innkeeper"], openapi_extra=ADMIN_OPENAPI)
async def tuned(request: Request) -> dict[str, Any]:
    """The models that have a tuned profile: used on this machine, or why not."""
    registry = registry_of(request)
    return {"models": await registry.off_loop(lambda: tuned_models(registry))}


@router.get("/tune/{job_id}", tags=["innkeeper"], openapi_extra=ADMIN_OPENAPI)
async def tune_status(job_id: str, request: Request) -> dict[str, Any]:
    return tune_jobs_of(request).get(job_id).to_json()


@router.post("/tune/{job_id}/cancel", tags=["innkeeper"], openapi_extra=ADMIN_OPENAPI)
async def cancel_tune(job_id: str, request: Request) -> dict[str, Any]:
    """Stop a tune now: its running measurement ends, nothing is saved."""
    job = tune_jobs_of(request).get(job_id)
    job.cancel.set()
    return job.to_json()
