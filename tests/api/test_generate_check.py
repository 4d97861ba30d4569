"""/api/extra/generate/check shows a client only its own text (issue 10, defect 6).

KoboldCpp's rule: with a genkey, that job's text; an unknown genkey gets nothing; without a
genkey (a single-user client), the current or last job, but never another user's while
several generate, and never a job started with a genkey.
"""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.helpers import ServerProcess

pytestmark = pytest.mark.slow  # starts real servers or browsers: not in `make test-fast`

LONG = {"prompt": "Tell me a story.", "ignore_eos": True, "temperature": 0.8}


def check(client: httpx.Client, genkey: str | None = None) -> str:
    body = {"genkey": genkey} if genkey else None
    return client.post("/api/extra/generate/check", json=body).json()["results"][0]["text"]


def test_unknown_genkey_reads_nothing(client: httpx.Client) -> None:
    done = client.post(
        "/api/v1/generate", json={**LONG, "max_length": 8, "genkey": "KCPP-alice"}
    ).json()
    text = done["results"][0]["text"]
    assert text
    assert check(client, "KCPP-mallory") == ""
    assert check(client, "KCPP-alice") == text  # the owner's last poll still gets it
    assert check(client) != text  # a genkey's run is its owner's alone


def test_check_while_two_users_generate(server: ServerProcess, client: httpx.Client) -> None:

    def user(genkey: str) -> None:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            c.post("/api/v1/generate", json={**LONG, "max_length": 400, "genkey": genkey})

    threads = [threading.Thread(target=user, args=(k,)) for k in ("KCPP-a", "KCPP-b")]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 20
        while not (check(client, "KCPP-a") and check(client, "KCPP-b")):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert check(client) == ""  # two users: no genkey reads neither
        assert check(client, "KCPP-c") == ""
        a, b = check(client, "KCPP-a"), check(client, "KCPP-b")
        assert a and b
    finally:
        client.post("/api/extra/abort")
        for t in threads:
            t.join(30)
