"""Limits: body size cap, bounded queue (503 + Retry-After), per-request timeout, SSE pings.

One server with one slot and a queue of one, so "busy" is easy to reach on purpose.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.helpers import ServerProcess, run_server

pytestmark = pytest.mark.slow  # starts real servers or browsers: not in `make test-fast`

TIMEOUT_S = 5.0
LONG = {"prompt": "Tell me a very long story.", "max_tokens": 1500, "ignore_eos": True}


LIMITED_ARGS = (
    "--ctx-size", "2048", "--parallel", "1", "--max-queue", "1", "--threads", "1",
    "--max-body", "64K", "--sse-ping-interval", "0.2",
)  # fmt: skip


def _started(*args: str, name: str) -> Iterator[ServerProcess]:
    with run_server(*args, name=name) as srv:
        httpx.post(f"{srv.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=60)
        yield srv


@pytest.fixture(scope="module")
def limited() -> Iterator[ServerProcess]:
    """One slot, a queue of one, small bodies, fast pings."""
    yield from _started(*LIMITED_ARGS, name="limits")


@pytest.fixture(scope="module")
def timed() -> Iterator[ServerProcess]:
    """The same, plus --request-timeout (its own server, so the other tests' timing is free)."""
    yield from _started(*LIMITED_ARGS, "--request-timeout", str(TIMEOUT_S), name="timeout")


@pytest.fixture()
def c(limited: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=limited.url, timeout=60) as client:
        yield client


def wait_for(check: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def perf(c: httpx.Client) -> dict:
    return c.get("/api/extra/perf").json()


def idle(c: httpx.Client) -> bool:
    p = perf(c)
    return p["busy_slots"] == 0 and p["queue"] == 0


def test_body_over_the_cap_is_413_in_each_family_shape(c: httpx.Client) -> None:
    big = {"prompt": "x" * 70_000, "max_tokens": 1}
    r = c.post("/v1/completions", json=big)
    assert r.status_code == 413
    assert "--max-body" in r.json()["error"]["message"]
    r = c.post("/api/v1/generate", json={"prompt": "x" * 70_000})
    assert r.status_code == 413 and "--max-body" in r.json()["detail"]["msg"]
    r = c.post("/v1/internal/encode", json={"text": "x" * 70_000})
    assert r.status_code == 413 and "--max-body" in r.json()["detail"]
    # under the cap, an over-long prompt is the context check's business (a 400, not a 413)
    r = c.post("/v1/completions", json={"prompt": "word " * 12_000, "max_tokens": 1})
    assert r.status_code == 400 and "context" in r.json()["error"]["message"]


def test_chunked_body_is_capped_while_reading(c: httpx.Client) -> None:
    """No Content-Length to trust: the cap counts bytes as they arrive."""

    def chunks() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"y" * 4096
        yield b'", "max_tokens": 1}'

    r = c.post("/v1/completions", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.request.headers.get("transfer-encoding") == "chunked"
    assert r.status_code == 413
    assert "--max-body" in r.json()["error"]["message"]
    r = c.post("/api/extra/abort", content=chunks())  # a route that reads the raw body itself
    assert r.status_code == 413 and "detail" in r.json()
    assert c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 1}).status_code == 200


def test_full_queue_is_503_with_retry_after_and_waiting_streams_get_pings(
    limited: ServerProcess, c: httpx.Client
) -> None:
    url = limited.url
    with (
        httpx.Client(base_url=url, timeout=60) as ca,
        httpx.Client(base_url=url, timeout=60) as cb,
        ca.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as ra,
    ):
        assert ra.status_code == 200
        wait_for(lambda: perf(c)["busy_slots"] == 1, "the first request to take the slot")
        with cb.stream(
            "POST", "/api/extra/generate/stream", json={"prompt": "Hi", "max_length": 50}
        ) as rb:
            assert rb.status_code == 200
            wait_for(lambda: perf(c)["queue"] == 1, "the second request to queue")

            # the waiting stream gets keep-alive comments (every 0.2 s here) and no data yet
            pings, t0 = 0, time.monotonic()
            # Keep the line iterator referenced: a dropped httpx iterator closes the stream,
            # which (correctly) cancels the queued request on the server.
            lines = rb.iter_lines()
            for line in lines:
                assert not line.startswith("data:"), "the queued stream got data while waiting"
                pings += line.startswith(": ping")
                if pings >= 3:
                    break
            assert time.monotonic() - t0 < 3

            # slot busy, queue full: every generate route answers 503 + Retry-After at once
            r = c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
            assert r.status_code == 503 and int(r.headers["retry-after"]) > 0
            assert "busy" in r.json()["error"]["message"]
            r = c.post(
                "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
            )
            assert r.status_code == 503 and r.headers["retry-after"]
            r = c.post("/api/v1/generate", json={"prompt": "Hi", "max_length": 2})
            assert r.status_code == 503 and r.headers["retry-after"]
            assert "busy" in r.json()["detail"]["msg"]
            r = c.post("/api/extra/generate/stream", json={"prompt": "Hi", "max_length": 2})
            assert r.status_code == 503 and "detail" in r.json()
            # token counting never waits behind generations
            t = time.monotonic()
            assert c.post("/api/extra/tokencount", json={"prompt": "Hi there"}).status_code == 200
            assert time.monotonic() - t < 2
    wait_for(lambda: idle(c), "the slot and queue to empty")
    assert c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200


def test_request_timeout_cancels_the_generation(timed: ServerProcess) -> None:
    """A non-streaming request past --request-timeout gets a 504; a stream gets an in-band
    error in its family's shape; both slots are freed."""
    limited = timed
    c = httpx.Client(base_url=timed.url, timeout=60)
    aborted = perf(c)["total_aborted"]
    result: dict = {}

    def streaming() -> None:  # queued behind the first: its deadline passes while it waits
        with (
            httpx.Client(base_url=limited.url, timeout=60) as cs,
            cs.stream(
                "POST", "/api/extra/generate/stream", json={"prompt": "Hi", "max_length": 1500}
            ) as r,
        ):
            result["stream"] = [line for line in r.iter_lines() if line.startswith("data:")]

    def non_streaming() -> None:
        with httpx.Client(base_url=limited.url, timeout=60) as cn:
            result["r"] = cn.post("/v1/completions", json=LONG)

    t0 = time.monotonic()
    first = threading.Thread(target=non_streaming)
    first.start()
    wait_for(lambda: perf(c)["busy_slots"] == 1, "the first request to take the slot")
    second = threading.Thread(target=streaming)
    second.start()
    first.join(60)
    second.join(60)
    elapsed = time.monotonic() - t0
    r = result["r"]
    assert r.status_code == 504, r.text
    err = r.json()["error"]
    assert "--request-timeout" in err["message"] and err["type"] == "timeout_error"
    assert TIMEOUT_S - 0.5 < elapsed < TIMEOUT_S + 10
    assert any("--request-timeout" in line for line in result["stream"]), result["stream"]
    assert '"detail"' in result["stream"][-1]
    wait_for(lambda: idle(c), "slots to be freed")
    assert perf(c)["total_aborted"] == aborted + 2
