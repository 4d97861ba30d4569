"""`innkeeper tune` for the page: one background tune at a time, polled for progress.

A tune runs engine/tuner.py (the same code as the CLI) in a worker thread; each candidate is
measured in its own child process, so nothing is loaded into the server and a crashing
candidate cannot take it down (the child dies with the server, if the server goes first). Only one tune runs at once (each saturates the CPU or GPU; two
would measure each other), and its numbers are only as quiet as the server is: the page says
so. Cancelling stops the running measurement at once and saves nothing. A finished tune's
profile is what `serve` uses for that model at its next start; a load from the page does not
read profiles (its settings are the ones given there).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any

from innkeeper.engine.planning import ModelFileError, checked_model_file
from innkeeper.engine.speed import Cancelled
from innkeeper.engine.tune import Trial, flag_text
from innkeeper.engine.tuner import DoesNotFit, TuneFailed, tune_model
from innkeeper.models.spec import ModelFormatError
from innkeeper.serving.errors import BadLoadRequest, Conflict, NotFound
from innkeeper.serving.registry import ModelRegistry

log = logging.getLogger("innkeeper.serving.tune")

KEEP_FINISHED = 8
"""Finished tunes remembered for the page to read their outcome."""
MAX_BUDGET_S = 600.0


@dataclass
class TuneJob:
    """One tune as the page sees it; the worker thread writes it, the routes read it."""

    id: str
    model: str
    budget_s: float
    state: str = "running"  # running | done | failed | cancelled
    progress: float = 0.0  # share of the budget used
    current: str = "serve's defaults"
    trials: list[dict[str, Any]] = field(default_factory=list)
    result: dict[str, Any] | None = None
    error: str | None = None
    finished_at: float | None = None
    cancel: threading.Event = field(default_factory=threading.Event)

    def to_json(self) -> dict[str, Any]:
        return {
            "job": self.id,
            "model": self.model,
            "state": self.state,
            "budget_s": self.budget_s,
            "progress": round(self.progress, 3),
            "current": self.current,
            "trials": list(self.trials),
            "result": self.result,
            "error": self.error,
        }


class TuneJobs:
    """The server's tunes: at most one running; each in a daemon thread."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry
        self.jobs: dict[str, TuneJob] = {}
        self.lock = threading.Lock()

    def start(
        self,
        model: str | None,
        budget_s: float,
        *,
        allow_kv_quant: bool = False,
        n_prompt: int = 256,
        n_gen: int = 32,
    ) -> TuneJob:
        """Start tuning `model` (an id or name; None: the default), or refuse with the reason."""
        if not 0 < budget_s <= MAX_BUDGET_S:
            raise BadLoadRequest(f"budget_s must be more than 0 and at most {MAX_BUDGET_S:.0f}")
        entry = self.registry.resolve(model)
        try:
            path = checked_model_file(entry.path)
        except ModelFileError as exc:
            raise BadLoadRequest(str(exc)) from None
        # the settings this model loads with here: serve's, with what the page last gave it
        cfg = replace(self.registry.config.engine, model_path=path, **entry.overrides)
        with self.lock:
            running = next((j for j in self.jobs.values() if j.state == "running"), None)
            if running is not None:
                raise Conflict(
                    f"a tune of {running.model} is running (job {running.id}): one at a time, "
                    "since two would measure each other; wait for it or cancel it"
                )
            job = TuneJob(id=secrets.token_hex(6), model=entry.id, budget_s=budget_s)
            self.jobs[job.id] = job
            self._forget_old()
        threading.Thread(
            target=self._run,
            args=(
                job,
                cfg,
                {"allow_kv_quant": allow_kv_quant, "n_prompt": n_prompt, "n_gen": n_gen},
            ),
            name=f"tune-{job.id}",
            daemon=True,
        ).start()
        return job

    def get(self, job_id: str) -> TuneJob:
        job = self.jobs.get(job_id)
        if job is None:
            raise NotFound(f"no tune job {job_id!r} (finished jobs are kept a while)")
        return job

    def _forget_old(self) -> None:
        done = [j for j in self.jobs.values() if j.state != "running"]
        done.sort(key=lambda j: j.finished_at or 0)
        for job in done[: max(0, len(done) - KEEP_FINISHED)]:
            del self.jobs[job.id]

    def _run(self, job: TuneJob, cfg: Any, options: dict[str, Any]) -> None:
        def progress(trial: Trial, used: float) -> None:
            job.progress = used
            job.current = flag_text(trial.changes)
            job.trials.append(trial.to_json())

        try:
            tuned = tune_model(
                cfg.model_path,
                cfg,
                self.registry.hardware,
                budget_s=job.budget_s,
                progress=progress,
                cancel=job.cancel,
                **options,
            )
            job.result = tuned.to_json()
            job.progress = 1.0
            self._finish(job, "done")
        except Cancelled:
            self._finish(job, "cancelled")
        except (DoesNotFit, TuneFailed, ModelFormatError, ValueError, OSError) as exc:
            self._finish(job, "failed", str(exc))
        except Exception as exc:  # a bug must still end the job, not leave it "running"
            log.exception("tune of %s failed", job.model)
            self._finish(job, "failed", f"internal error: {exc}")

    def _finish(self, job: TuneJob, state: str, error: str | None = None) -> None:
        job.error = error
        job.finished_at = time.monotonic()
        job.state = state
        log.info("tune of %s %s%s", job.model, state, f": {error}" if error else "")


def tuned_models(registry: ModelRegistry) -> dict[str, dict[str, Any]]:
    """Each model with a tuned profile: used on this machine, or why not (blocking: it reads
    and hashes files, so routes run it off the event loop)."""
    from innkeeper.engine.tune import build_id
    from innkeeper.models.profiles import find_profile, profile_path

    out: dict[str, dict[str, Any]] = {}
    build: str | None = None
    for e in registry.entries():
        try:
            path = checked_model_file(e.path)
        except ModelFileError:
            continue
        if not profile_path(path).is_file():
            continue
        build = build or build_id()
        match = find_profile(path, build)
        settings = match.profile.settings if match.profile else None
        out[e.id] = {
            "used": match.profile is not None,
            "reason": match.reason,
            "settings": settings,
            "flags": flag_text(settings) if settings is not None else None,
        }
    return out
