"""OpenAI streaming shape (issue 10, defect 9): usage only with `include_usage`, in a last
chunk with `choices: []`; `n > 1` streams every choice by index; `top_logprobs` needs
`logprobs`. Checked with the `openai` SDK and on the raw event stream."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from tests.helpers import ServerProcess

pytestmark = pytest.mark.slow  # starts real servers or browsers: not in `make test-fast`

CHAT = {"messages": [{"role": "user", "content": "Count to ten."}]}
PATHS = [
    ("/v1/completions", {"prompt": "Once upon a time", "ignore_eos": True}),
    ("/v1/chat/completions", {**CHAT, "ignore_eos": True}),
]


@pytest.fixture()
def oai(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=60)


def raw_stream(client: httpx.Client, path: str, body: dict[str, Any]) -> list[Any]:
    """Every `data:` payload of a stream, JSON-decoded ("[DONE]" kept as is)."""
    out: list[Any] = []
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[6:]
                out.append(data if data == "[DONE]" else json.loads(data))
    return out


@pytest.mark.parametrize(("path", "body"), PATHS)
def test_no_usage_in_chunks_without_include_usage(
    client: httpx.Client, path: str, body: dict[str, Any]
) -> None:
    events = raw_stream(client, path, {**body, "max_tokens": 4})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks and all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(("path", "body"), PATHS)
def test_include_usage_adds_a_last_chunk(
    client: httpx.Client, path: str, body: dict[str, Any]
) -> None:
    events = raw_stream(
        client, path, {**body, "max_tokens": 4, "stream_options": {"include_usage": True}}
    )
    assert events[-1] == "[DONE]"
    *chunks, last = events[:-1]
    assert all(c["usage"] is None and c["choices"] for c in chunks)  # `usage: null` on each
    assert last["choices"] == []
    assert last["usage"]["completion_tokens"] == 4
    assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + 4


def test_sdk_include_usage(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model="x",
        max_tokens=5,
        stream=True,
        stream_options={"include_usage": True},
        **CHAT,
    )
    chunks = list(stream)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert all(c.usage is None for c in chunks[:-1])
    plain = list(oai.completions.create(model="x", prompt="Hi", max_tokens=3, stream=True))
    assert all(c.usage is None for c in plain) and plain[-1].choices[0].finish_reason


@pytest.mark.parametrize(("path", "body"), PATHS)
def test_n_streams_every_choice_by_index(
    client: httpx.Client, path: str, body: dict[str, Any]
) -> None:
    events = raw_stream(
        client,
        path,
        {**body, "max_tokens": 6, "n": 3, "stream_options": {"include_usage": True}},
    )
    assert events[-1] == "[DONE]"
    *chunks, usage = events[:-1]
    finishes: dict[int, list[str]] = {0: [], 1: [], 2: []}
    for c in chunks:
        (choice,) = c["choices"]
        if choice["finish_reason"]:
            finishes[choice["index"]].append(choice["finish_reason"])
    assert finishes == {0: ["length"], 1: ["length"], 2: ["length"]}  # one finish each
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 18


def test_sdk_n_stream_by_index(oai: openai.OpenAI) -> None:
    """Each streamed index carries a whole choice: text, its role (chat) and one finish.

    (Greedy choices are not compared with each other: two sequences decoded in one batch
    can round differently and part at a near tie.)"""
    kw: dict[str, Any] = dict(model="x", max_tokens=8, temperature=0, n=2)
    texts, finishes = ["", ""], [0, 0]
    for chunk in oai.completions.create(prompt="The sky is", stream=True, **kw):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            finishes[choice.index] += bool(choice.finish_reason)
    assert all(texts) and finishes == [1, 1]
    chat, roles = ["", ""], set()
    for chunk in oai.chat.completions.create(stream=True, **kw, **CHAT):
        for choice in chunk.choices:
            chat[choice.index] += choice.delta.content or ""
            if choice.delta.role:
                roles.add(choice.index)
    assert roles == {0, 1} and all(chat)


def test_top_logprobs_needs_logprobs(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        oai.chat.completions.create(model="x", max_tokens=1, top_logprobs=2, **CHAT)
    ok = oai.chat.completions.create(model="x", max_tokens=1, logprobs=True, top_logprobs=2, **CHAT)
    assert len(ok.choices[0].logprobs.content[0].top_logprobs) == 2
