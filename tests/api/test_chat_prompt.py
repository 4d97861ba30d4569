"""Templates rendered server-side: per-request format, continue, and keyed aborts."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from tests.helpers import ServerProcess

pytestmark = pytest.mark.slow  # starts real servers or browsers: not in `make test-fast`

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour."},
]


def prompt_for(client: httpx.Client, **kw) -> dict:
    r = client.post("/v1/internal/chat-prompt", json={"messages": MESSAGES, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def test_model_template_and_builtins(client: httpx.Client) -> None:
    own = prompt_for(client)
    assert own["prompt"].endswith("<|im_start|>assistant\n")
    assert "<|im_end|>" in own["stop"]
    alpaca = prompt_for(client, instruction_template="alpaca")
    assert (
        alpaca["prompt"] == "You are terse.\n\n### Instruction:\nName a colour.\n\n### Response:\n"
    )
    assert "### Instruction:" in alpaca["stop"]
    llama3 = prompt_for(client, instruction_template="Llama-3")["prompt"]
    assert llama3.startswith(
        "<|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
    )
    names = {t["name"] for t in client.get("/v1/internal/templates").json()["builtin"]}
    assert names == {"alpaca", "chatml", "mistral", "llama3", "gemma", "phi3", "vicuna", "metharme"}


def test_continue_leaves_the_last_message_open(client: httpx.Client) -> None:
    msgs = [*MESSAGES, {"role": "assistant", "content": "Blue is"}]
    for template in (None, "alpaca", "chatml"):
        kw = {"instruction_template": template} if template else {}
        r = client.post(
            "/v1/internal/chat-prompt", json={"messages": msgs, "continue_": True, **kw}
        ).json()
        assert r["prompt"].endswith("Blue is"), (template, r["prompt"])
    out = client.post(
        "/v1/chat/completions",
        json={"messages": msgs, "continue_": True, "max_tokens": 6, "temperature": 0},
    ).json()
    assert out["choices"][0]["message"]["content"]


def test_keyed_abort_stops_only_its_own_run(server: ServerProcess, client: httpx.Client) -> None:
    body = {"prompt": "A long story:", "max_tokens": 60, "ignore_eos": True, "temperature": 0.8}
    results: dict[str, dict] = {}

    def run(name: str, extra: dict) -> None:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            results[name] = c.post("/v1/completions", json={**body, **extra}).json()

    threads = [
        threading.Thread(target=run, args=("mine", {"genkey": "page-1"})),
        threading.Thread(target=run, args=("other", {})),
    ]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 20
    while client.get("/api/extra/perf").json()["busy_slots"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert client.post("/api/extra/abort", json={"genkey": "page-1"}).json()["success"] == "true"
    for t in threads:
        t.join(60)
    assert results["mine"]["usage"]["completion_tokens"] < 60
    assert results["other"]["usage"]["completion_tokens"] == 60
