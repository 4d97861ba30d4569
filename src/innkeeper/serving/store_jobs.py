"""Background pulls into the model store, and deleting store models, for the runtime.

A pull runs `innkeeper pull`'s own code (`hub.resolve`: the same choice, resumable,
sha256-verified, manifest written atomically last) in a worker thread, so the event loop never
downloads or hashes. A client polls the job for progress and may cancel it: the download stops
at the next chunk and keeps its `.incomplete` file, so pulling the same ref again resumes it.
At most `MAX_RUNNING_PULLS` run at once; more are refused (TooManyJobs) rather than each
getting a thread. A finished pull re-scans the registry, so the new model is listed at once.
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

from innkeeper.models import hub, store
from innkeeper.models.hardware import Hardware
from innkeeper.models.spec import ModelFormatError
from innkeeper.serving.catalog import ModelState, same_file
from innkeeper.serving.errors import (
    AdminRequired,
    BadLoadRequest,
    Conflict,
    LoadFailed,
    ModelBusy,
    ModelNotFound,
    ModelNotLoaded,
    NotFound,
    ServingError,
    StoreFailed,
    TooManyJobs,
)
from innkeeper.serving.policy import Caller
from innkeeper.serving.registry import ModelRegistry
from innkeeper.serving.routing import LOAD_WAIT_SECONDS

log = logging.getLogger("innkeeper.serving.store")

MAX_RUNNING_PULLS = 4
"""Pulls downloading at once; a fifth is refused until one ends (each holds a thread and a
share of the network)."""
KEEP_FINISHED = 32
"""Finished jobs remembered for the page to read their outcome; older ones are forgotten."""


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
    path: Path | None = None  # the pulled file, once done: a request served after autopull
    failure: Exception | None = None  # why it failed, by type (autopull's status)

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
        try:
            parsed = hub.parse_ref(text)
        except hub.HubRefError as exc:
            raise BadLoadRequest(str(exc)) from None
        key = ref_key(parsed)
        with self.lock:
            running = [j for j in self.jobs.values() if j.state == "running"]
            for job in running:
                if job.key == key:
                    return job, False
            if len(running) >= MAX_RUNNING_PULLS:
                raise TooManyJobs(
                    f"{len(running)} pulls are running, the most this server runs at once: "
                    "wait for one to finish, or cancel one",
                    retry_after=10,
                )
            job = PullJob(id=secrets.token_hex(6), ref=text.strip(), key=key)
            self.jobs[job.id] = job
            self._forget_old()
        threading.Thread(
            target=self._run, args=(job, parsed), name=f"pull-{job.id}", daemon=True
        ).start()
        return job, True

    def get(self, job_id: str) -> PullJob:
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFound(f"no pull job {job_id!r} (finished jobs are kept a while)")
        return job

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

        def on_selected(sel: hub.Selection) -> None:
            job.bytes_total = sel.size
            job.model = store.store_name(sel.repo_id, sel.variant, sel.format)

        def on_file(n: int, total: int, f: hub.RepoFile) -> None:
            job.file = f.path

        def on_bytes(done: int, total: int) -> None:
            job.bytes_done, job.bytes_total = done, total

        try:
            result = hub.resolve(
                ref,
                self.root,
                machine=hub.Machine.for_serve(self.hardware),
                gguf_only=True,
                on_selected=on_selected,
                progress=False,
                on_file=on_file,
                on_bytes=on_bytes,
                cancel=job.cancel,
            )
            job.model, job.path = result.entry.name, result.entry.path
            job.bytes_done = job.bytes_total
            try:
                self.on_pulled()
            except Exception:  # the model is in the store even if the listing lags
                log.exception("refreshing the model list after pulling %s failed", job.ref)
            self._finish(job, "done")
        except hub.PullCancelled:
            self._finish(job, "cancelled")
        except (hub.HubError, ModelFormatError, ValueError) as exc:
            job.failure = exc
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


AUTOPULL_WAIT_SECONDS = LOAD_WAIT_SECONDS
"""How long a request naming an unpulled hub model waits for its download, as it would for a
loading model; then a 503 with Retry-After and the job's id (a retry joins the same job)."""
AUTOPULL_RETRY_SECONDS = 10.0


def _autopull_ref(registry: ModelRegistry, name: str | None) -> hub.HubRef | None:
    """The hub model a request's `model` asks to pull: a hub ref the server does not list.

    Where a name picks nothing (one model: `entry_for` serves it whatever the client sends,
    "openai/gpt-4o" included), only a ref that can only mean a hub GGUF (`:QUANT`, a .gguf
    file, a repo named …GGUF) pulls; elsewhere autopull answers what would be a 404.
    """
    if not name or "/" not in name:
        return None
    try:
        registry.resolve(name)
        return None
    except ModelNotFound:
        pass
    try:
        ref = hub.parse_ref(name)
    except hub.HubRefError:
        return None
    gguf = ref.quant is not None or "gguf" in f"{ref.repo_id}/{ref.filename or ''}".lower()
    return ref if gguf or len(registry.entries_by_id) > 1 else None


def _listed(registry: ModelRegistry, path: Path) -> str:
    """The registry's id for a store file (re-scanned if the list is behind the store)."""
    for _ in range(2):
        for e in registry.entries():
            if same_file(e.path, path):
                return e.id
        registry.refresh()
    raise LoadFailed(f"{path.name} was pulled but is not in the model list")


def _job_failure(job: PullJob, name: str) -> ServingError:
    if isinstance(job.failure, (hub.RepoNotFoundError, hub.QuantNotFoundError)):
        return ModelNotFound(f"model {name!r}: {job.error}")
    if job.state == "cancelled":
        return ModelBusy(f"the pull of {name!r} was cancelled", retry_after=AUTOPULL_RETRY_SECONDS)
    return LoadFailed(f"pulling {name!r} failed: {job.error}")


async def autopull(
    registry: ModelRegistry, jobs: PullJobs, name: str | None, caller: Caller
) -> str | None:
    """For a request naming an unpulled `owner/repo[:QUANT]` (or file, or URL): pull it as
    `innkeeper pull` would, in a `PullJobs` job, and return the id to serve it by; None when
    the name is not such a request (the registry answers it as always).

    An admin action, as autoload is: refused to other callers (403) and with --no-autoload
    (409). A model already pulled is served from the store without asking the hub (to any
    caller: loading it is then the registry's admin rule, as for any listed model). The
    request waits up to AUTOPULL_WAIT_SECONDS for the download, then gets a 503 with
    Retry-After naming the job (GET /api/innkeeper/pull/{job} shows its progress).
    """
    ref = _autopull_ref(registry, name)
    if ref is None or name is None:
        return None
    try:
        found = await registry.off_loop(lambda: hub.pulled_entry(ref, jobs.root))
    except store.ModelNotFoundError as exc:
        raise ModelNotFound(str(exc)) from None
    if found is not None:
        return _listed(registry, found.path)
    if not caller.admin:
        raise AdminRequired(
            f"model {name!r} is not in the store, and pulling it from the hub is an admin "
            "action: send the server's --admin-key, or ask the admin to pull it"
        )
    if not registry.config.autoload:
        raise ModelNotLoaded(
            f"model {name!r} is not in the store and this server does not load models on "
            "demand (--no-autoload): pull it first (POST /api/innkeeper/pull, or the page)"
        )
    job, _new = jobs.start(name)
    deadline = time.monotonic() + AUTOPULL_WAIT_SECONDS
    while job.state == "running" and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    if job.state == "running":
        got = f"{hub.format_bytes(job.bytes_done)} of {hub.format_bytes(job.bytes_total)}"
        raise ModelBusy(
            f"model {name!r} is being pulled from the hub ({got}, job {job.id}: "
            f"GET /api/innkeeper/pull/{job.id}); try again shortly",
            retry_after=AUTOPULL_RETRY_SECONDS,
        )
    if job.state != "done" or job.path is None:
        raise _job_failure(job, name)
    return _listed(registry, job.path)


async def delete_model(registry: ModelRegistry, jobs: PullJobs, name: str, root: Path) -> None:
    """Delete a pulled model, or what a cancelled pull left, from the store (unloading it
    first); never the embedded model or a file of a `--models-dir`, which the user put there,
    nor the model serve was started with. Holds the registry's lock throughout, so a load of
    the same model cannot start from a file that is being deleted."""
    async with registry.lock:
        entries = registry.entries()
        entry = next((e for e in entries if e.store_name == name), None)
        if entry is None:
            other = next((e for e in entries if e.id == name), None)
            if other is not None:
                where = "the embedded model" if other.source == "embedded" else "not in the store"
                raise BadLoadRequest(
                    f"{name!r} is {where}: only models pulled into the store can be deleted"
                )
            # A cancelled or failed pull is not listed, but its partial download takes disk.
            listed = await asyncio.to_thread(store.list_models, root)
            if not any(e.name == name and e.repo is not None for e in listed):
                raise NotFound(f"no model {name!r} in the store")
        elif same_file(entry.path, registry.default_path):
            raise Conflict(f"{name!r} is the model the server was started with: it stays")
        pulling = jobs.running_for(name)
        if pulling is not None:
            raise Conflict(f"{name!r} is being pulled (job {pulling.id}): cancel it first")
        if entry is not None and entry.state is not ModelState.UNLOADED:
            await registry.unload_locked(entry, "deleted")
        try:
            await asyncio.to_thread(store.remove_model, name, root)
        except store.ModelNotFoundError as exc:
            raise NotFound(str(exc)) from None
        except OSError as exc:
            raise StoreFailed(f"could not delete {name!r}: {exc}") from None
        finally:
            registry.refresh()
