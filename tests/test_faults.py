"""Faults: clients that vanish mid-prompt, one request's engine error, the model file
disappearing from disk while it is served, and SIGTERM with streams open."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from innkeeper.models.store import default_model_path
from tests.helpers import ServerProcess, run_server

pytestmark = pytest.mark.slow  # starts real servers or browsers: not in `make test-fast`

LONG = {"prompt": "Tell me a very long story.", "max_tokens": 1500, "ignore_eos": True}


@pytest.fixture(scope="module")
def model_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "served.gguf"
    shutil.copyfile(default_model_path(), path)
    return path


@pytest.fixture(scope="module")
def faulty(model_copy: Path) -> Iterator[ServerProcess]:
    # Small prompt batches so a long prompt takes many decode steps (cancellable between them).
    with run_server(
        str(model_copy),
        "--ctx-size",
        "2048",
        "--parallel",
        "2",
        "--threads",
        "1",
        "--batch-size",
        "64",
        "--ubatch-size",
        "64",
        name="faults",
    ) as srv:
        yield srv


@pytest.fixture()
def c(faulty: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=faulty.url, timeout=60) as client:
        yield client


def wait_for(check: Callable[[], bool], what: str, timeout: float = 20) -> float:
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.01)
    return time.monotonic() - t0


def perf(c: httpx.Client) -> dict:
    return c.get("/api/extra/perf").json()


def idle(c: httpx.Client) -> bool:
    p = perf(c)
    return p["busy_slots"] == 0 and p["queue"] == 0


def test_disconnect_mid_prompt_frees_the_slot(faulty: ServerProcess, c: httpx.Client) -> None:
    """The client leaves while a ~1800-token prompt is being evaluated in 64-token steps:
    the slot is freed after the current step, long before the prompt would have finished."""
    prompt = " ".join(f"line {i}: the quick brown fox." for i in range(170))
    n_prompt = len(
        c.post("/tokenize", json={"content": prompt, "add_special": True}).json()["tokens"]
    )
    assert 1500 < n_prompt < 2000
    aborted = perf(c)["total_aborted"]
    with httpx.Client(base_url=faulty.url, timeout=60) as cs:
        with cs.stream(
            "POST", "/v1/completions", json={"prompt": prompt, "max_tokens": 50, "stream": True}
        ) as r:
            assert r.status_code == 200
            wait_for(lambda: perf(c)["busy_slots"] == 1, "the prompt to start")
        t_close = time.monotonic()  # the stream is closed here, before any token
    freed_in = wait_for(lambda: idle(c), "the slot to be freed")
    assert freed_in < 1.5, f"slot freed {freed_in:.2f} s after the disconnect"
    assert perf(c)["total_aborted"] == aborted + 1
    evaluated = max(c.get("/api/innkeeper/status").json()["context"]["used_by_slots"])
    assert evaluated < n_prompt, "the whole prompt was evaluated despite the disconnect"
    assert time.monotonic() - t_close < 10
    assert c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200


def test_an_engine_error_fails_only_its_own_request(faulty: ServerProcess, c: httpx.Client) -> None:
    """A request the engine cannot start (a grammar llama.cpp rejects) fails alone while
    another stream keeps going to its full length."""
    with (
        httpx.Client(base_url=faulty.url, timeout=60) as cs,
        cs.stream(
            "POST",
            "/v1/completions",
            json={
                "prompt": "Count:",
                "max_tokens": 40,
                "ignore_eos": True,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        ) as r,
    ):
        lines = r.iter_lines()
        got = 0
        for line in lines:
            if line.startswith("data: {"):
                got += 1
                break
        bad = c.post(
            "/v1/completions", json={"prompt": "Hi", "max_tokens": 5, "grammar": "root ::= ("}
        )
        assert bad.status_code == 400 and "grammar" in bad.json()["error"]["message"]
        bad = c.post(
            "/api/v1/generate", json={"prompt": "Hi", "max_length": 5, "grammar": 'root ::= "a'}
        )
        assert bad.status_code == 422 and "grammar" in bad.json()["detail"]["msg"]
        chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 40  # OpenAI's last, choice-less chunk
    wait_for(lambda: idle(c), "idle")


def test_model_file_deleted_or_replaced_while_serving(model_copy: Path, c: httpx.Client) -> None:
    """The weights are memory-mapped from an open file: unlinking it or renaming another file
    over it leaves the mapping (the old inode) intact. (Truncating the file *in place* would
    break any mmap-ing server with SIGBUS; --no-mmap reads the weights into RAM instead.)"""

    def works() -> None:
        r = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "seed": 1})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
        assert c.get("/api/innkeeper/status").status_code == 200
        assert c.get("/props").status_code == 200

    works()
    model_copy.unlink()
    works()
    other = model_copy.with_name("other.tmp")
    other.write_bytes(b"GGUF" + os.urandom(1 << 20))
    os.replace(other, model_copy)  # a different file renamed over the served path
    works()
    model_copy.unlink()
    works()


def test_sigterm_ends_streams_cleanly_and_exits_zero() -> None:
    with run_server(
        "--ctx-size", "2048", "--parallel", "1", "--threads", "1", name="sigterm"
    ) as srv:
        with (
            httpx.Client(base_url=srv.url, timeout=60) as cs,
            cs.stream(
                "POST",
                "/v1/completions",
                json={**LONG, "stream": True, "stream_options": {"include_usage": True}},
            ) as r,
        ):
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data: {"):
                    break  # the stream is running
            t0 = time.monotonic()
            srv.proc.send_signal(signal.SIGTERM)
            rest = list(lines)  # the stream ends by itself, with its finish event
            code = srv.proc.wait(timeout=15)
            took = time.monotonic() - t0
        assert code == 0, srv.log()
        assert took < 10, f"shutdown took {took:.1f} s"
        data = [line for line in rest if line.startswith("data:")]
        assert data[-1] == "data: [DONE]"
        final = json.loads(data[-3][6:])
        assert final["choices"][0]["finish_reason"] is not None
        assert json.loads(data[-2][6:])["usage"]["completion_tokens"] < 1500
        assert "Traceback" not in srv.log()
