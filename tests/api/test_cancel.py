"""A client that goes away frees its slot: streaming or not, by disconnect or abort route."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

from tests.helpers import ServerProcess

pytestmark = pytest.mark.slow  # starts real servers or browsers: not in `make test-fast`


def perf(client: httpx.Client) -> dict:
    return client.get("/api/extra/perf").json()


def wait_idle(client: httpx.Client, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        p = perf(client)
        if p["busy_slots"] == 0 and p["queue"] == 0:
            return p
        assert time.monotonic() < deadline, f"slots still busy: {p}"
        time.sleep(0.05)


LONG = {
    "prompt": "Tell me a very long story.",
    "max_tokens": 1500,
    "ignore_eos": True,
    "temperature": 0.8,
}


def test_closed_stream_frees_its_slot(server: ServerProcess, client: httpx.Client) -> None:
    before = perf(client)["total_aborted"]
    with (
        httpx.Client(base_url=server.url, timeout=60) as c,
        c.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r,
    ):
        n = 0
        for line in r.iter_lines():
            if line.startswith("data: {"):
                n += 1
            if n >= 5:
                break  # the client hangs up mid-stream
    t0 = time.monotonic()
    p = wait_idle(client)
    assert time.monotonic() - t0 < 2
    assert p["total_aborted"] == before + 1
    # the next request is served normally
    out = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 3}).json()
    assert out["usage"]["completion_tokens"] >= 1


def test_non_stream_disconnect_cancels(server: ServerProcess, client: httpx.Client) -> None:
    before = perf(client)["total_aborted"]
    host, port = server.url.removeprefix("http://").split(":")
    body = httpx.Request("POST", f"{server.url}/v1/completions", json=LONG).read()
    with socket.create_connection((host, int(port))) as sock:
        head = (
            f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        sock.sendall(head + body)
        deadline = time.monotonic() + 10
        while perf(client)["busy_slots"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    # socket closed without reading the answer
    p = wait_idle(client)
    assert p["total_aborted"] == before + 1


def test_stop_generation_route(server: ServerProcess, client: httpx.Client) -> None:
    import threading

    result: dict = {}

    def run() -> None:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            result["r"] = c.post("/v1/completions", json=LONG).json()

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 10
    while perf(client)["busy_slots"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(0.2)
    assert client.post("/v1/internal/stop-generation").json() == "OK"
    t.join(10)
    assert not t.is_alive()
    usage = result["r"]["usage"]
    assert 0 < usage["completion_tokens"] < 1500
    wait_idle(client)


def test_second_request_does_not_interrupt_the_first(
    server: ServerProcess, client: httpx.Client
) -> None:
    """Two streams at once (two slots): both run to their full length."""
    import concurrent.futures

    def go(seed: int) -> dict:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            return c.post(
                "/v1/completions",
                json={
                    "prompt": f"Story {seed}:",
                    "max_tokens": 40,
                    "ignore_eos": True,
                    "seed": seed,
                },
            ).json()

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        results = list(pool.map(go, [1, 2, 3]))
    assert [r["usage"]["completion_tokens"] for r in results] == [40, 40, 40]
    assert all(r["choices"][0]["finish_reason"] == "length" for r in results)
