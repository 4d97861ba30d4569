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
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from innkeeper.api.admin import ADMIN_OPENAPI, require_admin
from innkeeper.api.errors import ApiError
from innkeeper.api.state import registry_of
from innkeeper.models import hub, store
from innkeeper.models.hardware import Hardware
from innkeeper.models.spec import ModelFormatError

log = logging.getLogger("innkeeper.api.store")

router = APIRouter(prefix="/api/innkeeper", dependencies=[Depends(require_admin)])

KEEP_FINISHED = 32
"""Finished jobs remembered for the page to read their outcome; older ones are forgotten."""


class PullBody(BaseModel):
    ref: str = Field(min_length=3, max_length=400, description="owner/repo[:QUANT|/file.gguf]")


@dataclass
class PullJob:
    """One pull as the page sees it; the worker thread updates it, the routes read it."""

    id: str
    ref: str
    key: str
    state: str = "running"  # running | done | failed | cancelled
    bytes_done: int = 0
    bytes_total: int = 0
    file: str | None = None
    error: str | None = None
    model: str | None = None
    finished_at: float | None = None
    cancel: threading.Event = field(default_factory=threading.Event)

    def to_json(self) -> dict[str, Any]:
        return {
            "job": self.id,
            "ref": self.ref,
            "state": self.state,
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
            "file": self.file,
            "error": self.error,
            "model": self.model,
        }


def ref_key(ref: hub.HubRef) -> str:
    """What makes two refs the same pull: repo, quant and file, compared without case."""
    parts = (ref.repo_id, ref.quant or "", ref.filename or "", ref.revision or "")
    return "|".join(p.lower() for p in parts)


class PullJobs:
    """The server's pull jobs: at most one per ref at a time, each in its own daemon thread
    (a multi-GB download must not hold up the server's shutdown)."""

    def __init__(
        self,
        root: Path,
        hardware: Hardware,
        on_pulled: Callable[[], None],
    ) -> None:
        self.root = root
        self.hardware = hardware  # the server's (with --ram/--vram): the quant choice fits it
        self.on_pulled = on_pulled
        self.jobs: dict[str, PullJob] = {}
        self.lock = threading.Lock()

    def start(self, text: str) -> tuple[PullJob, bool]:
        """A new job for `text`, or the running one for the same ref (then False)."""
        parsed = hub.parse_ref(text)
        key = ref_key(parsed)
        with self.lock:
            for job in self.jobs.values():
                if job.key == key and job.state == "running":
                    return job, False
            job = PullJob(id=secrets.token_hex(6), ref=text.strip(), key=key)
            self.jobs[job.id] = job
            self._forget_old()
        threading.Thread(
            target=self._run, args=(job, parsed), name=f"pull-{job.id}", daemon=True
        ).start()
        return job, True

    def get(self, job_id: str) -> PullJob | None:
        return self.jobs.get(job_id)

    def running_for(self, model: str) -> PullJob | None:
        """A running job that will produce (or is re-pulling) the store model `model`."""
        return next(
            (j for j in self.jobs.values() if j.state == "running" and j.model == model), None
        )

    def _forget_old(self) -> None:
        done = [j for j in self.jobs.values() if j.state != "running"]
        done.sort(key=lambda j: j.finished_at or 0)
        for job in done[: max(0, len(done) - KEEP_FINISHED)]:
            del self.jobs[job.id]

    def _run(self, job: PullJob, ref: hub.HubRef) -> None:
        """The worker: the same steps as `innkeeper pull`, reporting into the job."""
        try:
            listing = hub.list_repo(ref.repo_id, ref.revision)
            machine = hub.Machine.for_serve(self.hardware)
            sel = hub.select(listing, quant=ref.quant, filename=ref.filename, machine=machine)
            if sel.format != "gguf":
                raise hub.HubError(
                    f"{sel.repo_id} has no GGUF files ({sel.format} weights): innkeeper serves"
                    " GGUF models; pull a GGUF repo, or this one with `innkeeper pull` to inspect"
                )
            job.bytes_total = sel.size
            job.model = store.store_name(sel.repo_id, sel.variant, sel.format)

            def on_file(n: int, total: int, f: hub.RepoFile) -> None:
                job.file = f.path

            def on_bytes(done: int, total: int) -> None:
                job.bytes_done, job.bytes_total = done, total

            result = hub.pull(
                sel,
                self.root,
                progress=False,
                on_file=on_file,
                on_bytes=on_bytes,
                cancel=job.cancel,
            )
            job.model = result.entry.name
            job.bytes_done = job.bytes_total
            try:
                self.on_pulled()
            except Exception:  # the model is in the store even if the listing lags
                log.exception("refreshing the model list after pulling %s failed", job.ref)
            self._finish(job, "done")
        except hub.PullCancelled:
            self._finish(job, "cancelled")
        except (hub.HubError, ModelFormatError, ValueError) as exc:
            self._finish(job, "failed", str(exc))
        except OSError as exc:
            self._finish(job, "failed", f"could not write to the store {self.root}: {exc}")
        except Exception as exc:  # a bug must still end the job, not leave it "running"
            log.exception("pull of %s failed", job.ref)
            self._finish(job, "failed", f"internal error: {exc}")

    def _finish(self, job: PullJob, state: str, error: str | None = None) -> None:
        job.error = error
        job.finished_at = time.monotonic()
        job.state = state
        if state == "failed":
            log.warning("pull of %s failed: %s", job.ref, error)
        else:
            log.info("pull of %s %s", job.ref, state)


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


def _job_or_404(request: Request, job_id: str) -> PullJob:
    job = jobs_of(request).get(job_id)
    if job is None:
        raise ApiError(404, f"no pull job {job_id!r} (finished jobs are kept a while)", "not_found")
    return job


@router.post("/pull", tags=["innkeeper"], openapi_extra=ADMIN_OPENAPI)
async def start_pull(body: PullBody, request: Request) -> dict[str, Any]:
    """Start pulling `owner/repo`, `owner/repo:QUANT` or `owner/repo/file.gguf` into the store."""
    try:
        job, new = jobs_of(request).start(body.ref)
    except hub.HubRefError as exc:
        raise ApiError(400, str(exc)) from None
    return {"job": job.id, "started": new}


@router.get("/pull/{job_id}", tags=["innkeeper"], openapi_extra=ADMIN_OPENAPI)
async def pull_status(job_id: str, request: Request) -> dict[str, Any]:
    return _job_or_404(request, job_id).to_json()


@router.post("/pull/{job_id}/cancel", tags=["innkeeper"], openapi_extra=ADMIN_OPENAPI)
async def cancel_pull(job_id: str, request: Request) -> dict[str, Any]:
    """Stop a pull at its next chunk; what came stays as a resumable partial download."""
    job = _job_or_404(request, job_id)
    job.cancel.set()
    return job.to_json()


@router.delete("/models/{name}", tags=["innkeeper"], openapi_extra=ADMIN_OPENAPI)
async def delete_model(name: str, request: Request) -> dict[str, Any]:
    """Delete a pulled model, or what a cancelled pull left, from the store (unloading it
    first); never the embedded model or a file of a `--models-dir`, which the user put there,
    nor the model serve was started with."""
    registry = registry_of(request)
    entries = registry.entries()
    entry = next((e for e in entries if e.store_name == name), None)
    if entry is None:
        other = next((e for e in entries if e.id == name), None)
        if other is not None:
            where = "the embedded model" if other.source == "embedded" else "not in the store"
            raise ApiError(
                400, f"{name!r} is {where}: only models pulled into the store can be deleted"
            )
        # A cancelled or failed pull is not listed, but its partial download takes disk space.
        listed = await asyncio.to_thread(store.list_models, store.models_dir())
        if not any(e.name == name and e.repo is not None for e in listed):
            raise ApiError(404, f"no model {name!r} in the store", "not_found")
    elif _same_path(entry.path, registry.default_path):
        raise ApiError(409, f"{name!r} is the model the server was started with: it stays")
    pulling = jobs_of(request).running_for(name)
    if pulling is not None:
        raise ApiError(409, f"{name!r} is being pulled (job {pulling.id}): cancel it first")
    if entry is not None and entry.status in ("loaded", "loading"):
        await registry.unload(entry.id)
    try:
        await asyncio.to_thread(store.remove_model, name, store.models_dir())
    except store.ModelNotFoundError as exc:
        raise ApiError(404, str(exc), "not_found") from None
    except OSError as exc:
        raise ApiError(500, f"could not delete {name!r}: {exc}", "server_error") from None
    finally:
        registry.refresh()
    return {"success": True, "deleted": name}


def _same_path(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False
