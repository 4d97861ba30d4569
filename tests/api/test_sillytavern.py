"""Replays of the calls SillyTavern makes for its KoboldCpp and Default (Oobabooga) types."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from tests.api.sillytavern import st_body

pytestmark = pytest.mark.slow  # starts real servers or browsers: not in `make test-fast`


def sse_events(resp: httpx.Response) -> list[str]:
    """The `data:` payloads of an SSE response, split the way ST's parser does."""
    out = []
    for block in resp.text.replace("\r\n", "\n").split("\n\n"):
        for line in block.split("\n"):
            if line.startswith("data:"):
                out.append(line[5:].strip())
    return out


def test_connect_status_calls(client: httpx.Client) -> None:
    models = client.get("/v1/models")
    assert models.status_code == 200
    assert models.json()["data"][0]["id"] == "SmolLM2-135M-Instruct.Q4_1"
    info = client.get("/v1/internal/model/info")  # ooba: the name shown and remote tokenizer on
    assert info.status_code == 200
    assert info.json()["model_name"] == "SmolLM2-135M-Instruct.Q4_1"
    props = client.get("/props").json()  # newer ST reads the true context and template
    assert props["default_generation_settings"]["n_ctx"] == 2048
    assert "<|im_start|>" in props["chat_template"]
    assert client.get("/api/extra/true_max_context_length").json() == {"value": 2048}
    assert client.get("/api/v1/config/max_context_length").json() == {"value": 2048}


@pytest.mark.parametrize("api_type", ["koboldcpp", "ooba"])
def test_generate_non_stream(client: httpx.Client, api_type: str) -> None:
    r = client.post("/v1/completions", json=st_body(api_type))
    assert r.status_code == 200, r.text
    text = r.json()["choices"][0]["text"]
    assert text.strip()
    assert "\nUser:" not in text  # stop strings honoured


@pytest.mark.parametrize("api_type", ["koboldcpp", "ooba"])
def test_generate_stream(client: httpx.Client, api_type: str) -> None:
    body = st_body(api_type, stream=True)
    with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        r.read()
    events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["text"] for c in chunks)
    assert text.strip()
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    # same seed, same settings: the stream equals the non-streamed reply
    whole = client.post("/v1/completions", json=st_body(api_type)).json()["choices"][0]["text"]
    assert text == whole


def test_stop_string_cuts_the_reply(client: httpx.Client) -> None:
    body = st_body("koboldcpp", prompt="Count: 1, 2, 3,", length=40)
    body.update(temperature=0, stop=[" 6"], stopping_strings=[" 6"])
    text = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert "6" not in text
    assert "5" in text


def test_token_count_routes(client: httpx.Client) -> None:
    text = "Hello there, general Kenobi!"
    kc = client.post("/api/extra/tokencount", json={"prompt": text}).json()
    ooba = client.post("/v1/internal/encode", json={"text": text}).json()
    assert kc["value"] == len(kc["ids"]) == ooba["length"] == len(ooba["tokens"])
    assert kc["ids"] == ooba["tokens"]
    assert client.post("/v1/internal/decode", json={"tokens": kc["ids"]}).json()["text"] == text
    assert (
        client.post("/v1/internal/token-count", json={"text": text}).json()["length"] == kc["value"]
    )
    assert client.post("/detokenize", json={"tokens": kc["ids"]}).json()["content"] == text


def test_token_count_does_not_wait_for_generation(client: httpx.Client, server) -> None:
    body = st_body("koboldcpp", stream=True, length=400)
    body.update(ban_eos_token=True, stop=[], stopping_strings=[])
    started = threading.Event()

    def long_stream() -> None:
        with (
            httpx.Client(base_url=server.url, timeout=60) as c,
            c.stream("POST", "/v1/completions", json=body) as r,
        ):
            for _ in r.iter_lines():
                started.set()

    t = threading.Thread(target=long_stream)
    t.start()
    assert started.wait(30)
    t0 = time.monotonic()
    r = client.post("/api/extra/tokencount", json={"prompt": "count me " * 200})
    elapsed = time.monotonic() - t0
    assert r.status_code == 200 and r.json()["value"] > 100
    assert elapsed < 1.0
    assert client.post("/api/extra/abort").json()["success"] == "true"
    t.join(30)
    assert not t.is_alive()


def test_kobold_abort_stops_a_stream(client: httpx.Client, server) -> None:
    """ST's Stop for koboldcpp: POST /api/extra/abort, no body, no auth; the stream ends."""
    body = st_body("koboldcpp", stream=True, length=1000)
    body.update(ban_eos_token=True, stop=[], stopping_strings=[])
    got: list[str] = []
    done = threading.Event()

    def stream() -> None:
        with (
            httpx.Client(base_url=server.url, timeout=60) as c,
            c.stream("POST", "/v1/completions", json=body) as r,
        ):
            for line in r.iter_lines():
                got.append(line)
        done.set()

    t = threading.Thread(target=stream)
    t.start()
    deadline = time.monotonic() + 30
    while not any(x.startswith("data: {") for x in got) and time.monotonic() < deadline:
        time.sleep(0.05)
    r = httpx.post(f"{server.url}/api/extra/abort")  # exactly as ST: no body, no headers
    assert r.status_code == 200
    assert done.wait(10), "the stream kept going after abort"
    chunks = [json.loads(x[5:]) for x in got if x.startswith("data: {")]
    n_tokens = len(chunks)
    assert n_tokens < 500
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    t.join()


def test_kobold_classic_api(client: httpx.Client) -> None:
    assert client.get("/api/v1/model").json()["result"] == "innkeeper/SmolLM2-135M-Instruct.Q4_1"
    assert client.get("/api/v1/info/version").json()["result"] == "1.2.5"
    assert client.get("/api/extra/version").json()["result"] == "KoboldCpp"
    body = {
        "prompt": "Count: 1, 2, 3,",
        "max_context_length": 2048,
        "max_length": 30,
        "rep_pen": 1.0,
        "rep_pen_range": 320,
        "temperature": 0.0,
        "top_k": 0,
        "top_p": 1,
        "sampler_order": [6, 0, 1, 3, 4, 2, 5],
        "stop_sequence": [" 6"],
        "use_default_badwordsids": False,
        "singleline": False,
    }
    r = client.post("/api/v1/generate", json=body).json()["results"][0]
    assert r["text"].endswith(" 6")  # KoboldCpp keeps the stop string unless trim_stop
    assert r["finish_reason"] == "stop"
    trimmed = client.post("/api/v1/generate", json={**body, "trim_stop": True}).json()["results"][0]
    assert trimmed["text"] == r["text"][: -len(" 6")]
    with client.stream("POST", "/api/extra/generate/stream", json=body) as s:
        s.read()
    events = [json.loads(e) for e in sse_events(s)]
    assert "".join(e["token"] for e in events) == r["text"]
    assert events[-1]["finish_reason"] == "stop"
    assert client.get("/api/extra/generate/check").json()["results"][0]["text"] == trimmed["text"]
    perf = client.get("/api/extra/perf").json()
    assert perf["total_gens"] >= 3 and perf["last_token_count"] > 0 and perf["idle"] == 1


def test_legacy_ooba_token_count(client: httpx.Client) -> None:
    r = client.post("/api/v1/token-count", json={"prompt": "one two three"})
    assert r.json()["results"][0]["tokens"] == 3


def test_unknown_fields_are_ignored(client: httpx.Client) -> None:
    body = {"prompt": "Hi", "max_tokens": 2, "totally_unknown": {"nested": [1, 2]}, "api_type": "x"}
    assert client.post("/v1/completions", json=body).status_code == 200
