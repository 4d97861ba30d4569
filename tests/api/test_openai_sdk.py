"""The official `openai` SDK against /v1/completions and /v1/chat/completions."""

from __future__ import annotations

import openai
import pytest

from tests.helpers import ServerProcess

pytestmark = pytest.mark.slow  # starts real servers or browsers: not in `make test-fast`


@pytest.fixture()
def oai(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=60)


def test_models_lists_the_loaded_gguf(oai: openai.OpenAI) -> None:
    models = oai.models.list()
    assert [m.id for m in models.data] == ["SmolLM2-135M-Instruct.Q4_1"]


def test_completion_reports_real_token_counts(oai: openai.OpenAI, client) -> None:
    prompt = "The capital of France is"
    out = oai.completions.create(model="x", prompt=prompt, max_tokens=8, temperature=0)
    assert out.choices[0].finish_reason in ("length", "stop")
    n_prompt = len(
        client.post("/tokenize", json={"content": prompt, "add_special": True}).json()["tokens"]
    )
    assert out.usage.prompt_tokens == n_prompt
    generated = client.post("/tokenize", json={"content": out.choices[0].text}).json()["tokens"]
    assert out.usage.completion_tokens == 8 or out.choices[0].finish_reason == "stop"
    assert abs(len(generated) - out.usage.completion_tokens) <= 2
    assert "Paris" in out.choices[0].text


def test_completion_stream_matches_non_stream(oai: openai.OpenAI) -> None:
    kw = dict(model="x", prompt="Once upon a time", max_tokens=16, temperature=0)
    whole = oai.completions.create(**kw).choices[0].text
    pieces = [c.choices[0].text for c in oai.completions.create(stream=True, **kw) if c.choices]
    assert len([p for p in pieces if p]) > 1  # really streamed, token by token
    assert "".join(pieces) == whole


def test_chat_completion_uses_the_gguf_template(oai: openai.OpenAI) -> None:
    out = oai.chat.completions.create(
        model="x",
        messages=[
            {"role": "user", "content": "What is the capital of France? Answer in one word."}
        ],
        max_tokens=10,
        temperature=0,
    )
    msg = out.choices[0].message
    assert msg.role == "assistant"
    assert "Paris" in msg.content
    assert "<|im_end|>" not in msg.content  # the template's end marker stops generation
    assert out.usage.prompt_tokens > 20  # the ChatML system prompt of the template is there


def test_chat_stream(oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model="x",
        messages=[{"role": "user", "content": "Count from one to five."}],
        max_tokens=24,
        temperature=0,
        stream=True,
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_logprobs(oai: openai.OpenAI) -> None:
    out = oai.completions.create(
        model="x", prompt="1, 2, 3,", max_tokens=3, temperature=0, logprobs=3
    )
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == 3
    assert all(v <= 0 for v in lp.token_logprobs)
    # greedy: the chosen token is the most likely one
    assert all(
        max(top.values()) == pytest.approx(chosen, abs=1e-4)
        for top, chosen in zip(lp.top_logprobs, lp.token_logprobs, strict=True)
    )
    chat = oai.chat.completions.create(
        model="x",
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=2,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) >= 1 and len(content[0].top_logprobs) == 2


def test_n_choices_and_echo(oai: openai.OpenAI) -> None:
    out = oai.completions.create(
        model="x", prompt="Hello", max_tokens=4, n=2, temperature=0.9, seed=5, echo=True
    )
    assert [c.index for c in out.choices] == [0, 1]
    assert all(c.text.startswith("Hello") for c in out.choices)
