"""Ollama's NDJSON on the wire, as SillyTavern 1.12.6 reads it: it parses everything received
so far as one JSON value, so every line must arrive as its own HTTP chunk (one ASGI body
message), never joined with the next. Read from a raw socket, chunk by chunk; and the request
SillyTavern's Ollama type sends (/api/tags, then /api/generate with its options), num_ctx
included."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from innkeeper.api.app import create_app
from innkeeper.models.store import default_model_path
from innkeeper.serving.registry import ModelRegistry
from innkeeper.settings.engine import EngineConfig
from innkeeper.settings.server import ServerConfig
from tests.helpers import ServerProcess, run_server

pytestmark = pytest.mark.slow  # starts real servers or browsers: not in `make test-fast`

CTX = 2048
SMOL = default_model_path().name.removesuffix(".gguf") + ":latest"


@pytest.fixture(scope="module")
def srv() -> Iterator[ServerProcess]:
    with run_server("--ctx-size", str(CTX), "--parallel", "1", name="ollama-stream") as s:
        yield s


def raw_chunks(srv: ServerProcess, path: str, body: dict[str, Any]) -> list[tuple[float, bytes]]:
    """POST `body` and read the chunked answer off the socket: (arrival time, chunk data)."""
    host, port = srv.url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    ).encode()
    chunks: list[tuple[float, bytes]] = []
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(head + payload)
        buf = b""

        def need(n: int) -> None:
            nonlocal buf
            while len(buf) < n:
                data = sock.recv(65536)
                assert data, "the connection closed mid-answer"
                buf += data

        need(1)
        while b"\r\n\r\n" not in buf:
            need(len(buf) + 1)
        headers, buf = buf.split(b"\r\n\r\n", 1)
        assert headers.startswith(b"HTTP/1.1 200"), headers
        assert b"application/x-ndjson" in headers.lower()
        assert b"transfer-encoding: chunked" in headers.lower()
        while True:
            while b"\r\n" not in buf:
                need(len(buf) + 1)
            size_line, buf = buf.split(b"\r\n", 1)
            size = int(size_line.split(b";")[0], 16)
            need(size + 2)
            data, buf = buf[:size], buf[size + 2 :]
            if size == 0:
                return chunks
            chunks.append((time.monotonic(), data))


def one_json_line_each(chunks: list[tuple[float, bytes]]) -> list[dict[str, Any]]:
    """SillyTavern's reader: each chunk alone must be exactly one JSON object and its newline."""
    out = []
    for _t, data in chunks:
        assert data.endswith(b"\n") and data.count(b"\n") == 1, data
        out.append(json.loads(data))
    return out


def test_every_ndjson_line_is_its_own_chunk(srv: ServerProcess) -> None:
    name = httpx.get(f"{srv.url}/api/tags").json()["models"][0]["name"]
    body = {
        "model": name,
        "prompt": "Count to twenty:",
        "options": {"num_predict": 24, "ignore_eos": True},
    }
    chunks = raw_chunks(srv, "/api/generate", body)
    lines = one_json_line_each(chunks)
    assert len(lines) >= 10
    assert all(not line["done"] for line in lines[:-1]) and lines[-1]["done"]
    assert lines[-1]["eval_count"] == 24
    # the lines were sent as the tokens came, not gathered at the end
    assert chunks[-1][0] - chunks[0][0] > 0.01
    chat = {"model": name, "messages": [{"role": "user", "content": "Hi"}]}
    lines = one_json_line_each(
        raw_chunks(srv, "/api/chat", {**chat, "options": {"num_predict": 8}})
    )
    assert lines[-1]["done"] and all(line["message"]["role"] == "assistant" for line in lines)


def test_a_pull_streams_its_status_lines_one_per_chunk(srv: ServerProcess) -> None:
    lines = one_json_line_each(raw_chunks(srv, "/api/pull", {"model": "innkeeper-tests/none-GGUF"}))
    assert lines[0] == {"status": "pulling manifest"}
    assert "error" in lines[-1]  # no hub: the last line is the error the client raises


# What SillyTavern 1.12.6 sends for its Ollama type (text-completions.js: OLLAMA_KEYS in
# `options`, raw prompt, keep_alive from config.yaml's ollama.keepAlive, -1 by default).
def st_options(num_ctx: int) -> dict[str, Any]:
    return {
        "num_predict": 16,
        "num_ctx": num_ctx,
        "num_batch": 512,
        "stop": ["\nUser:", "<|im_end|>"],
        "temperature": 0.7,
        "repeat_penalty": 1.1,
        "presence_penalty": 0,
        "frequency_penalty": 0,
        "top_k": 40,
        "top_p": 0.95,
        "tfs_z": 1,
        "typical_p": 1,
        "seed": -1,
        "repeat_last_n": 64,
        "mirostat": 0,
        "mirostat_tau": 5,
        "mirostat_eta": 0.1,
        "min_p": 0.05,
    }


def test_sillytavern_ollama_type(srv: ServerProcess) -> None:
    tags = httpx.get(f"{srv.url}/api/tags", timeout=5)  # SillyTavern's status check
    assert tags.status_code == 200
    name = tags.json()["models"][0]["name"]
    prompt = "<|im_start|>user\nWrite a haiku.<|im_end|>\n<|im_start|>assistant\n"
    body = {
        "model": name,
        "prompt": prompt,
        "stream": True,
        "keep_alive": -1,
        "raw": True,
        "options": st_options(CTX),
    }
    lines = one_json_line_each(raw_chunks(srv, "/api/generate", body))
    assert lines[-1]["done"] and lines[-1]["done_reason"] in ("stop", "length")
    assert "".join(line["response"] for line in lines)
    whole = httpx.post(f"{srv.url}/api/generate", json={**body, "stream": False}, timeout=60)
    assert whole.status_code == 200 and whole.json()["done"]


def test_num_ctx_reloads_for_an_admin(srv: ServerProcess) -> None:
    """A keyless loopback server: everyone is its owner, so num_ctx reloads, as in Ollama."""
    name = httpx.get(f"{srv.url}/api/tags").json()["models"][0]["name"]

    def ctx() -> int:
        return httpx.get(f"{srv.url}/api/ps").json()["models"][0]["context_length"]

    body = {"model": name, "prompt": "Hi", "stream": False, "options": st_options(1024)}
    assert httpx.post(f"{srv.url}/api/generate", json=body, timeout=120).status_code == 200
    assert ctx() == 1024
    body["options"] = st_options(CTX)
    assert httpx.post(f"{srv.url}/api/generate", json=body, timeout=120).status_code == 200
    assert ctx() == CTX


def test_one_asgi_body_message_per_line() -> None:
    """In process, below HTTP: the app's `send` gets one body message per NDJSON line."""
    config = ServerConfig(
        engine=EngineConfig(model_path=default_model_path(), ctx_size=512, threads=1),
        port=5001,
    ).validate()
    registry = ModelRegistry(config, default_model_path())
    app = create_app(registry, config)
    request = json.dumps(
        {
            "model": SMOL,
            "prompt": "Count to ten:",
            "options": {"num_predict": 12, "ignore_eos": True},
        }
    ).encode()
    sent: list[dict[str, Any]] = []

    async def run() -> None:
        pending = [{"type": "http.request", "body": request, "more_body": False}]

        async def receive() -> dict[str, Any]:
            if pending:
                return pending.pop()
            await asyncio.Event().wait()  # the client stays until the answer is over
            raise AssertionError("unreachable")

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/api/generate",
            "raw_path": b"/api/generate",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"host", b"127.0.0.1:5001"), (b"content-type", b"application/json")],
            "client": ("127.0.0.1", 40000),
            "server": ("127.0.0.1", 5001),
        }
        await app(scope, receive, send)

    try:
        asyncio.run(run())
    finally:
        registry.close()
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    bodies = [m["body"] for m in sent[1:] if m["body"]]
    assert all(m["type"] == "http.response.body" for m in sent[1:])
    assert len(bodies) >= 6
    for body in bodies:
        assert body.endswith(b"\n") and body.count(b"\n") == 1, body
    lines = [json.loads(b) for b in bodies]
    assert lines[-1]["done"] and lines[-1]["eval_count"] == 12
    assert not any(line["done"] for line in lines[:-1])
