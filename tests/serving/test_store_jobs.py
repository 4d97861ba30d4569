"""Pull jobs are bounded: at most MAX_RUNNING_PULLS download at once, more are refused."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from innkeeper.models.hardware import Hardware
from innkeeper.serving.errors import TooManyJobs
from innkeeper.serving.store_jobs import MAX_RUNNING_PULLS, PullJobs


def test_running_pulls_are_capped_and_the_same_ref_joins_its_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    started: list[str] = []

    def blocked_run(self: PullJobs, job: Any, ref: Any) -> None:
        started.append(job.ref)
        release.wait(10)
        self._finish(job, "done")

    monkeypatch.setattr(PullJobs, "_run", blocked_run)
    jobs = PullJobs(tmp_path, Hardware(2**34, 2**34), lambda: None)
    try:
        first = [jobs.start(f"owner/repo-{i}") for i in range(MAX_RUNNING_PULLS)]
        assert all(new for _, new in first)
        again, new = jobs.start("OWNER/repo-0")
        assert again is first[0][0] and not new  # the same ref joins the running job
        with pytest.raises(TooManyJobs) as err:
            jobs.start("owner/one-too-many")
        assert err.value.retry_after
        assert len(threading.enumerate()) < 50
    finally:
        release.set()
    for job, _ in first:
        for _ in range(100):
            if job.state != "running":
                break
            threading.Event().wait(0.05)
    job, new = jobs.start("owner/one-too-many")  # room again
    assert new
    release.set()
