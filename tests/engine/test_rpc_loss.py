"""An RPC worker killed mid-generation: the server survives it. Its requests end at once with
an error naming the worker (a stream's error event, a 502 for the others), /health and the
status name the worker, a load while it is down fails fast, and once it is restarted on the
same port the next load reaches it again and answers as the local model does."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import httpx
import pytest

from innkeeper.engine import rpc
from innkeeper.engine.events import EngineLost, ErrorKind, FinishEvent
from innkeeper.engine.planning import plan_settings
from innkeeper.models.hardware import GPU, Hardware
from innkeeper.models.store import default_model_path
from innkeeper.serving.worker_loss import Stranded
from innkeeper.settings.engine import EngineConfig
from tests.engine.conftest import Runner, make_engine
from tests.engine.test_rpc import PROMPT, greedy, run_worker
from tests.helpers import free_port, run_server

needs_rpc = pytest.mark.skipif(
    not rpc.available(), reason="this llama-cpp-python has no RPC backend"
)

LONG = {"prompt": PROMPT, "max_tokens": 480, "ignore_eos": True, "temperature": 0}


def stream_until_killed(url: str, worker: subprocess.Popen[bytes]) -> tuple[list[str], float]:
    """Stream LONG, kill -9 the worker after a few chunks; the lines, and the seconds from
    the kill to the stream's end."""
    lines: list[str] = []
    killed = 0.0
    with httpx.stream(
        "POST", f"{url}/v1/completions", json={**LONG, "stream": True}, timeout=30
    ) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            lines.append(line)
            if len(lines) == 4:
                worker.kill()
                killed = time.monotonic()
    assert killed, lines
    return lines, time.monotonic() - killed


def error_of(lines: list[str]) -> dict[str, Any]:
    """The error event of an OpenAI stream (`data: {"error": …}`)."""
    events = [json.loads(x[6:]) for x in lines if x.startswith("data: {")]
    errors = [e["error"] for e in events if "error" in e]
    assert errors, lines[-5:]
    return errors[-1]


@needs_rpc
@pytest.mark.slow
def test_a_worker_killed_mid_stream_ends_its_requests_and_a_reload_reaches_it_again() -> None:
    local, _ = greedy()
    port = free_port()
    endpoint = f"127.0.0.1:{port}"
    args = ("--rpc", endpoint, "--ctx-size", "512", "--parallel", "2")
    with run_worker(port) as worker, run_server(*args, name="rpc-loss") as srv:
        c = httpx.Client(base_url=srv.url, timeout=60)
        # A non-streaming request shares the decode with the stream, and must not hang.
        plain: dict[str, httpx.Response] = {}
        waiting = threading.Thread(
            target=lambda: plain.setdefault("r", c.post("/v1/completions", json=LONG))
        )
        waiting.start()
        lines, after_kill = stream_until_killed(srv.url, worker)
        waiting.join(30)
        assert after_kill < 5, after_kill  # the error came at once: no hang
        err = error_of(lines)
        assert endpoint in err["message"] and "gone" in err["message"]
        assert not waiting.is_alive()
        r = plain["r"]
        assert r.status_code == 502, r.text
        assert endpoint in r.json()["error"]["message"]

        health = c.get("/health")
        assert health.status_code == 200
        assert [w["endpoint"] for w in health.json()["rpc_workers_lost"]] == [endpoint]
        status = c.get("/api/innkeeper/status").json()
        assert status["model"]["status"] == "failed" and endpoint in status["model"]["error"]
        assert [m["workers"] for m in status["models_stranded"]] == [[endpoint]]
        assert status["rpc_workers_lost"][0]["endpoint"] == endpoint

        # While the worker is down, a request (autoload) fails fast and names it.
        t0 = time.monotonic()
        down = c.post("/v1/completions", json={**LONG, "max_tokens": 4})
        assert down.status_code >= 500 and endpoint in down.text
        assert time.monotonic() - t0 < 20

        # The worker is back on the same port: the next load reaches it under a new spelling.
        with run_worker(port) as worker2:
            again = c.post("/v1/completions", json={**LONG, "max_tokens": 24, "ignore_eos": False})
            assert again.status_code == 200, again.text
            assert again.json()["choices"][0]["text"] == local
            assert "rpc_workers_lost" not in c.get("/health").json()
            # Lost a second time: the same again (one more leading zero on the port).
            lines, after_kill = stream_until_killed(srv.url, worker2)
            assert after_kill < 5 and endpoint in error_of(lines)["message"]
        assert c.get("/health").status_code == 200
        assert srv.proc.poll() is None
        c.close()


# An engine with no server around it (a script, `innkeeper run`): nothing listens for a lost
# worker, so the process ends as ggml would, with one line naming the worker.
BARE_ENGINE = """
import sys
from innkeeper.engine.engine import Engine, EngineConfig
from innkeeper.engine.events import GenerationRequest
from innkeeper.engine.sampling import SamplingParams
from innkeeper.models.store import default_model_path
engine = Engine(EngineConfig(model_path=default_model_path(), ctx_size=512, threads=1,
                             parallel=1, gpu_layers=99, rpc=(sys.argv[1],)))
def seen(ev):
    print("token", flush=True)
engine.submit(GenerationRequest(engine.tokenize("Once upon a time"), SamplingParams(),
                                480, seen))
import time; time.sleep(120)
"""


@needs_rpc
@pytest.mark.slow
def test_without_a_server_a_lost_worker_ends_the_process_naming_it() -> None:
    port = free_port()
    endpoint = f"127.0.0.1:{port}"
    with run_worker(port) as worker:
        proc = subprocess.Popen(
            [sys.executable, "-c", BARE_ENGINE, endpoint],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            for _ in range(3):
                assert proc.stdout.readline() == "token\n"
            worker.kill()
            _, stderr = proc.communicate(timeout=30)
        finally:
            with contextlib.suppress(OSError):
                proc.kill()
    assert proc.returncode != 0
    errors = [x for x in stderr.splitlines() if x.startswith("error:")]
    assert errors and endpoint in errors[-1] and "stopped answering" in errors[-1], stderr[-2000:]


def test_wreck_ends_running_and_queued_requests_from_another_thread() -> None:
    """What the server does when a worker is lost, on a local engine: every request ends at
    once with the reason, the running one and the one still queued, and nothing after."""
    engine = make_engine(parallel=1, ctx_size=512)
    runner = Runner(engine)
    prompt = engine.tokenize(PROMPT)
    _, running_done, running = runner.submit(prompt, max_tokens=400, ignore_eos=True)
    _, queued_done, queued = runner.submit(prompt, max_tokens=400, ignore_eos=True)
    while not running:
        time.sleep(0.01)
    assert engine.wreck("RPC worker 10.0.0.9:50052 is gone") == 2
    assert running_done.is_set() and queued_done.is_set()  # delivered by wreck itself
    for events in (running, queued):
        fin = events[-1]
        assert isinstance(fin, FinishEvent) and fin.reason == "error"
        assert fin.error_kind is ErrorKind.WORKER_LOST and "10.0.0.9:50052" in (fin.error or "")
    seen = len(running)
    time.sleep(0.3)
    assert len(running) == seen and len(queued) == 1  # the engine thread sends nothing more
    engine.close()  # frees nothing (a wrecked engine's buffers would wait on a dead worker)
    assert engine.model.ptr is not None


@needs_rpc
@pytest.mark.slow
def test_embeddings_in_flight_when_their_worker_dies_end_with_a_502() -> None:
    """An embedding decode on a lost worker never returns (its thread waits in llama.cpp for
    good): the request in flight, and the one queued behind it, still end at once."""
    port = free_port()
    endpoint = f"127.0.0.1:{port}"
    args = ("--rpc", endpoint, "--ctx-size", "512", "--parallel", "1")
    with run_worker(port) as worker, run_server(*args, name="rpc-loss-embed") as srv:
        c = httpx.Client(base_url=srv.url, timeout=60)
        warm = c.post("/v1/embeddings", json={"input": PROMPT})  # its context, on the worker
        assert warm.status_code == 200, warm.text
        inputs = [f"{PROMPT} ({i})" * 6 for i in range(400)]  # a minute of decodes or more
        answers: dict[str, httpx.Response] = {}
        posts = [
            threading.Thread(
                target=lambda k=k: answers.setdefault(
                    k, c.post("/v1/embeddings", json={"input": inputs})
                )
            )
            for k in ("running", "queued")
        ]
        for t in posts:
            t.start()
            time.sleep(1.5)
        assert not answers  # both still in flight
        worker.kill()
        killed = time.monotonic()
        for t in posts:
            t.join(30)
        assert time.monotonic() - killed < 5  # no hang
        assert sorted(answers) == ["queued", "running"]
        for r in answers.values():
            assert r.status_code == 502, r.text
            assert endpoint in r.json()["error"]["message"]
        status = c.get("/api/innkeeper/status").json()
        assert status["model"]["status"] == "failed"
        assert c.get("/health").status_code == 200 and srv.proc.poll() is None
        c.close()


def test_wreck_ends_every_wait_on_the_engine_and_refuses_what_comes_after(
    tmp_path: Path,
) -> None:
    """A slot save queued behind a long prompt decode, and work stuck for good (a future
    nobody settles, as an embedding decode on a lost worker) end with EngineLost the moment
    the engine is wrecked; afterwards nothing reaches the engine."""
    engine = make_engine(parallel=2, ctx_size=4096, batch_size=512)
    runner = Runner(engine)
    prompt = engine.tokenize(" ".join([PROMPT] * 250))[:2000]
    runner.submit(prompt, max_tokens=8)
    while engine.slots()[0].state != "prompt":
        time.sleep(0.01)
    time.sleep(0.2)  # inside a decode of 512 tokens: seconds on one thread
    save = engine.save_slot(1, tmp_path / "s1")  # waits for the engine thread
    stuck: Future[int] = Future()
    waits = [save, engine.guard(stuck)]
    assert not any(f.done() for f in waits)
    t0 = time.monotonic()
    engine.wreck("RPC worker 10.0.0.9:50052 is gone")
    for f in waits:
        exc = f.exception(timeout=1)
        assert isinstance(exc, EngineLost) and exc.kind is ErrorKind.WORKER_LOST
        assert "10.0.0.9:50052" in exc.message
    assert time.monotonic() - t0 < 0.5
    assert not stuck.done()  # the stuck work itself is left alone
    # Arriving after the wreck: refused at once, before the engine thread could see them.
    for late in (engine.save_slot(1, tmp_path / "s2"), engine.erase_slot(1), engine.guard(stuck)):
        assert isinstance(late.exception(timeout=0), EngineLost)
    with pytest.raises(EngineLost):
        runner.submit(prompt[:8])
    assert not (tmp_path / "s1").exists() and not (tmp_path / "s2").exists()
    engine.close()  # frees nothing, waits for nothing


def test_a_guarded_wait_settles_with_its_work_and_a_cancel_reaches_the_work() -> None:
    """While the engine runs, `guard` is transparent: the work's result or error passes
    through, and a waiter that gives up cancels work that has not started."""
    engine = make_engine(parallel=1, ctx_size=512)
    try:
        done: Future[int] = Future()
        waited = engine.guard(done)
        done.set_result(7)
        assert waited.result(timeout=0) == 7
        failed: Future[int] = Future()
        waited = engine.guard(failed)
        failed.set_exception(KeyError("x"))
        assert isinstance(waited.exception(timeout=0), KeyError)
        pending: Future[int] = Future()
        assert engine.guard(pending).cancel()
        assert pending.cancelled()
        assert not engine._waiters  # nothing left for a wreck to fail
    finally:
        engine.close()


def test_a_stranded_model_holds_its_memory_except_on_the_lost_workers() -> None:
    """The memory plan of later loads still counts a stranded model here and on the workers
    alive, not on the lost worker (its process died and gave it back)."""
    lost, alive = "10.0.0.9:50052", "10.0.0.9:500521"
    gpus = [GPU(i, f"RPC {e}", 2**30, 2**30, e) for i, e in enumerate((lost, alive))]
    hw = Hardware(8 * 2**30, 8 * 2**30, (*gpus, GPU(2, f"RPC {lost} #1", 2**30, 2**30, lost)))
    cfg = EngineConfig(model_path=default_model_path(), ctx_size=512, parallel=1, gpu_layers=30)
    auto = plan_settings(cfg, hw)
    assert auto is not None
    names = [d.name for d in auto.plan.devices]
    assert len(names) == 4 and all(d.layers for d in auto.plan.devices if d.kind == "gpu")
    held = Stranded("m", None, auto.plan, (lost,), "gone", 0.0).held_plan()  # type: ignore[arg-type]
    assert held is not None
    kept = [d.name for d in held.devices]
    assert kept == [n for n in names if n == "RAM" or n.endswith(f"RPC {alive}")]
    assert len(kept) == 2
