"""The page's "Tune": start a tune over HTTP, watch it, cancel one; one at a time; admin only.

Mechanics on the embedded model with a tiny budget and prompt (the CPU is shared), not speed.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import run_server

pytestmark = pytest.mark.slow

TINY = {"budget_s": 5, "prompt_tokens": 16, "gen_tokens": 4}


def _wait(client: httpx.Client, job: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = client.get(f"/api/innkeeper/tune/{job}").json()
        if state["state"] != "running":
            return state
        time.sleep(0.3)
    raise AssertionError(f"tune {job} still running after {timeout} s")


def test_tune_over_http(tmp_path: Path) -> None:
    env = {"INNKEEPER_CONFIG": str(tmp_path)}
    with (
        run_server("--ctx-size", "512", "--parallel", "1", env=env, name="tune-http") as srv,
        httpx.Client(base_url=srv.url, timeout=30) as client,
    ):
        assert client.get("/api/innkeeper/tune").json() == {"models": {}}
        # the page's Tune button: the panel imports the module that drives these routes
        script = client.get("/static/tune.js")
        assert script.status_code == 200 and "/api/innkeeper/tune" in script.text
        assert 'from "./tune.js"' in client.get("/static/models.js").text
        job = client.post("/api/innkeeper/tune", json=TINY).json()
        assert job["state"] == "running"
        busy = client.post("/api/innkeeper/tune", json=TINY)
        assert busy.status_code == 409  # one tune at a time
        done = _wait(client, job["job"])
        assert done["state"] == "done", done
        assert done["trials"][0]["note"] == "default" and done["progress"] == 1.0
        saved = Path(done["result"]["profile"]["path"])
        assert saved.is_file() and saved.parent == tmp_path / "profiles"
        tuned = client.get("/api/innkeeper/tune").json()["models"]
        assert [v["used"] for v in tuned.values()] == [True]

        before = saved.stat().st_mtime_ns
        job = client.post("/api/innkeeper/tune", json={**TINY, "budget_s": 120}).json()
        time.sleep(1.0)
        cancelled = client.post(f"/api/innkeeper/tune/{job['job']}/cancel").json()
        assert cancelled["job"] == job["job"]
        assert _wait(client, job["job"], timeout=30)["state"] == "cancelled"
        assert saved.stat().st_mtime_ns == before  # nothing saved
        assert sorted(p.name for p in saved.parent.iterdir()) == [saved.name]

        assert client.post("/api/innkeeper/tune", json={"budget_s": 0}).status_code == 422
        assert client.get("/api/innkeeper/tune/nope").status_code == 404
        unknown = client.post("/api/innkeeper/tune", json={**TINY, "model": "no-such-model"})
        assert unknown.status_code == 404
    # the server is gone and so is every measuring process it started
    assert not [p for p in os.listdir("/proc") if p.isdigit() and _is_speed_child(p)]


def _is_speed_child(pid: str) -> bool:
    try:
        return b"innkeeper.engine.speed" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def test_tune_needs_the_admin_key(tmp_path: Path) -> None:
    env = {"INNKEEPER_CONFIG": str(tmp_path)}
    with run_server("--ctx-size", "512", "--admin-key", "adm1n", env=env, name="tune-adm") as s:
        for method, path in (("POST", "/tune"), ("GET", "/tune"), ("POST", "/tune/x/cancel")):
            r = httpx.request(method, f"{s.url}/api/innkeeper{path}", json=TINY, timeout=10)
            assert r.status_code == 401 and "admin" in r.json()["detail"]["msg"]
    assert not (tmp_path / "profiles").exists()
