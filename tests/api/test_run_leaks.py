"""A request that fails as a whole leaves no run behind (issue 10, defect 4).

A prompt list whose later prompt is invalid, or more runs than the queue holds (prompts x
`n`), used to leave the runs already started registered forever: memory grew with every
such request, and `/api/extra/abort` reported stopping them.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.helpers import ServerProcess, run_server

pytestmark = pytest.mark.slow  # starts real servers or browsers: not in `make test-fast`


def in_flight(client: httpx.Client) -> int:
    return client.get("/api/innkeeper/status").json()["perf"]["requests_in_flight"]


def assert_nothing_running(client: httpx.Client) -> None:
    assert client.post("/api/extra/abort").json()["success"] == "false"  # nothing to stop
    assert in_flight(client) == 0


def test_partial_start_failures_leak_nothing(server: ServerProcess) -> None:
    """200 requests whose second prompt holds an invalid token id: each a 400, none leaks."""
    valid = list(range(100, 400))
    with httpx.Client(base_url=server.url, timeout=60) as c:

        def bad(i: int) -> int:
            body = {"prompt": [valid, [-5 - i]], "max_tokens": 1}
            return c.post("/v1/completions", json=body).status_code

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            codes = list(pool.map(bad, range(200)))
        assert codes == [400] * 200
        assert_nothing_running(c)
        r = c.post("/v1/completions", json={"prompt": [valid, valid], "max_tokens": 1})
        assert r.status_code == 200 and len(r.json()["choices"]) == 2
        assert_nothing_running(c)


@pytest.fixture(scope="module")
def tiny_queue() -> Iterator[ServerProcess]:
    with run_server(
        "--ctx-size", "512", "--parallel", "1", "--max-queue", "3", name="tiny-queue"
    ) as srv:
        yield srv


def test_queue_overflow_leaks_nothing(tiny_queue: ServerProcess) -> None:
    """prompts x n beyond --max-queue: a 503 with Retry-After, and every started run undone."""
    with httpx.Client(base_url=tiny_queue.url, timeout=60) as c:
        for path, body in [
            ("/v1/completions", {"prompt": ["a", "b", "c"], "n": 4, "max_tokens": 1}),
            (
                "/v1/chat/completions",
                {"messages": [{"role": "user", "content": "Hi"}], "n": 16, "max_tokens": 1},
            ),
            ("/v1/completions", {"prompt": "Hi", "n": 16, "max_tokens": 1, "stream": True}),
        ]:
            for _ in range(10):
                r = c.post(path, json=body)
                assert r.status_code == 503, r.text
                assert r.headers["retry-after"]
            assert_nothing_running(c)
        deadline = time.monotonic() + 10  # the engine drops the cancelled queue entries
        while c.get("/api/extra/perf").json()["queue"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        ok = c.post("/v1/completions", json={"prompt": "Hi", "n": 2, "max_tokens": 2})
        assert ok.status_code == 200 and len(ok.json()["choices"]) == 2
        assert_nothing_running(c)
