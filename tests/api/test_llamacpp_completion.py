"""llama-server's /completion, /infill and /apply-template on innkeeper's port, as
SillyTavern's "llama.cpp" Text Completion type and llama.cpp clients call them."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx
import pytest

from tests.api.sillytavern import st_body
from tests.helpers import ServerProcess

pytestmark = pytest.mark.slow  # uses the session's real server

PROMPT = "Once upon a time, in a small village by the sea,"
GREEDY = {"temperature": 0, "top_k": 1}


def events(client: httpx.Client, body: dict[str, Any]) -> list[dict[str, Any]]:
    """Every `data:` event of a /completion stream, read with a real SSE client."""
    out = []
    with client.stream("POST", "/completion", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                out.append(json.loads(line[6:]))
    return out


def assert_llama_error(r: httpx.Response, status: int | None = None) -> None:
    assert 400 <= r.status_code < 500, r.text
    if status is not None:
        assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == r.status_code
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str)


def test_greedy_output_equals_openai_completions(client: httpx.Client) -> None:
    native = client.post("/completion", json={"prompt": PROMPT, "n_predict": 16, **GREEDY})
    openai = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 16, **GREEDY})
    assert native.status_code == 200, native.text
    body = native.json()
    assert body["content"] == openai.json()["choices"][0]["text"]
    assert body["content"]
    assert body["stop"] is True
    assert body["stop_type"] in ("limit", "eos")
    assert body["tokens_predicted"] == openai.json()["usage"]["completion_tokens"]
    assert body["prompt"].endswith(PROMPT)
    assert body["generation_settings"]["n_ctx"] == 2048
    assert body["generation_settings"]["temperature"] == 0
    assert body["id_slot"] in (0, 1)  # the slot that ran it


def test_stream_events_and_final_fields(client: httpx.Client) -> None:
    body = {"prompt": PROMPT, "n_predict": 12, "ignore_eos": True, **GREEDY}
    evs = events(client, body)
    *pieces, final = evs
    assert pieces and all(e["stop"] is False for e in pieces)
    assert all(isinstance(e["content"], str) and isinstance(e["tokens"], list) for e in pieces)
    assert final["stop"] is True
    assert final["stop_type"] == "limit"
    assert final["stopping_word"] == ""
    assert final["tokens_predicted"] == 12
    assert final["tokens_evaluated"] >= len(PROMPT.split())
    assert isinstance(final["tokens_cached"], int)
    assert final["truncated"] is False
    assert final["model"]
    assert final["generation_settings"]["n_predict"] == 12
    t = final["timings"]
    for key in ("prompt_n", "prompt_ms", "predicted_n", "predicted_ms", "predicted_per_second"):
        assert isinstance(t[key], int | float), key
    assert t["predicted_n"] == 12
    whole = client.post("/completion", json=body).json()["content"]
    assert "".join(e["content"] for e in pieces) == whole


def test_stop_string_reports_word(client: httpx.Client) -> None:
    text = client.post(
        "/completion", json={"prompt": PROMPT, "n_predict": 24, "ignore_eos": True, **GREEDY}
    ).json()["content"]
    words = text.split()
    assert len(words) >= 4, text
    stop = words[2]
    out = client.post(
        "/completion", json={"prompt": PROMPT, "n_predict": 24, "stop": [stop], **GREEDY}
    ).json()
    assert out["stop_type"] == "word"
    assert out["stopping_word"] == stop
    assert out["content"] == text[: text.index(stop)]
    final = events(client, {"prompt": PROMPT, "n_predict": 24, "stop": [stop], **GREEDY})[-1]
    assert (final["stop_type"], final["stopping_word"]) == ("word", stop)


def test_sillytavern_string_breakers_and_pairs(client: httpx.Client) -> None:
    """SillyTavern sends dry_sequence_breakers as a JSON string and logit_bias as pairs."""
    body = {
        "prompt": PROMPT,
        "n_predict": 4,
        "dry_multiplier": 0.8,
        "dry_sequence_breakers": '["\\n", ":", "\\"", "*"]',
        "logit_bias": [[1, -1.0], ["sea", False]],
        "samplers": ["top_k", "typ_p", "top_p", "min_p", "temperature"],
        "cache_prompt": True,
    }
    r = client.post("/completion", json=body)
    assert r.status_code == 200, r.text
    settings = r.json()["generation_settings"]
    assert settings["dry_sequence_breakers"] == ["\n", ":", '"', "*"]
    assert settings["samplers"] == ["top_k", "typical_p", "top_p", "min_p", "temperature"]
    assert [1, -1.0] in settings["logit_bias"]
    assert any(bias is False for _, bias in settings["logit_bias"])
    assert_llama_error(
        client.post("/completion", json={**body, "dry_sequence_breakers": "[1, 2"}), 400
    )


def test_json_schema_constrains_the_output(client: httpx.Client) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 8}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    out = client.post(
        "/completion",
        json={"prompt": "A person as JSON:", "n_predict": 48, "json_schema": schema, **GREEDY},
    ).json()
    assert out["generation_settings"]["grammar"]
    assert out["stop_type"] == "eos"  # the grammar ended with the object
    value = json.loads(out["content"])
    assert isinstance(value["name"], str) and isinstance(value["age"], int)
    too_many = {"type": "array", "minItems": 10**9}
    assert_llama_error(client.post("/completion", json={"prompt": "x", "json_schema": too_many}))
    remote = {"$ref": "https://example.com/schema.json"}
    assert_llama_error(client.post("/completion", json={"prompt": "x", "json_schema": remote}))


def test_sillytavern_llamacpp_body(client: httpx.Client) -> None:
    """SillyTavern's llama.cpp type: its whole generate body (every alias, ST's own keys),
    `samplers` instead of `sampler_priority`, empty logit_bias pairs, cache_prompt."""
    body = st_body("llamacpp", stream=True, length=8)
    body.pop("sampler_priority")
    body.update(
        {
            "samplers": ["top_k", "tfs_z", "typical_p", "top_p", "min_p", "temperature"],
            "logit_bias": [],
            "grammar": "",
            "cache_prompt": True,
        }
    )
    evs = events(client, body)
    assert evs[-1]["stop"] is True and evs[-1]["tokens_predicted"] <= 8
    assert evs[-1]["generation_settings"]["samplers"] == [
        "top_k",
        "typical_p",
        "top_p",
        "min_p",
        "temperature",
    ]
    text = "".join(e["content"] for e in evs)
    assert "\nUser:" not in text  # ST's stop strings apply
    r = client.post("/completion", json={**body, "stream": False})
    assert r.status_code == 200 and isinstance(r.json()["content"], str)


def test_prompt_forms(client: httpx.Client) -> None:
    """A string, its token ids, and a list of prompts (which answers a list)."""
    ids = client.post("/tokenize", json={"content": PROMPT, "add_special": True}).json()["tokens"]
    by_text = client.post("/completion", json={"prompt": PROMPT, "n_predict": 6, **GREEDY})
    by_ids = client.post("/completion", json={"prompt": ids, "n_predict": 6, **GREEDY})
    assert by_ids.json()["content"] == by_text.json()["content"]
    mixed = client.post(
        "/completion", json={"prompt": [*ids[:3], "Hello", ids[-1]], "n_predict": 2}
    )
    assert mixed.status_code == 200 and isinstance(mixed.json(), dict)
    many = client.post(
        "/completion", json={"prompt": [PROMPT, ids, "Hello"], "n_predict": 6, **GREEDY}
    )
    assert many.status_code == 200, many.text
    out = many.json()
    assert isinstance(out, list) and [o["index"] for o in out] == [0, 1, 2]
    # the same prompt as text and as ids (batched beside each other: no equality asked)
    assert out[0]["tokens_evaluated"] == out[1]["tokens_evaluated"] == len(ids)
    streamed = events(client, {"prompt": ["a b c", "d e f"], "n_predict": 3})
    assert {e["index"] for e in streamed if e["stop"]} == {0, 1}


def test_left_trimmed_prompt_is_reported_truncated(client: httpx.Client) -> None:
    """SillyTavern sends truncation_length: a prompt trimmed to fit says so."""
    out = client.post(
        "/completion", json={"prompt": PROMPT * 4, "n_predict": 2, "truncation_length": 16}
    ).json()
    assert out["truncated"] is True
    assert out["tokens_evaluated"] <= 16


def test_n_probs_in_llama_shape(client: httpx.Client) -> None:
    out = client.post(
        "/completion", json={"prompt": PROMPT, "n_predict": 3, "n_probs": 2, **GREEDY}
    ).json()
    probs = out["completion_probabilities"]
    assert len(probs) == 3
    for p in probs:
        assert set(p) == {"id", "token", "bytes", "logprob", "top_logprobs"}
        assert len(p["top_logprobs"]) == 2
        assert p["top_logprobs"][0]["id"] == p["id"]  # greedy: the chosen one is the top one
        assert p["bytes"] == list(p["token"].encode())
    evs = events(client, {"prompt": PROMPT, "n_predict": 3, "n_probs": 1, **GREEDY})
    assert all(len(e["completion_probabilities"]) == 1 for e in evs if not e["stop"])


def test_response_fields_and_return_tokens(client: httpx.Client) -> None:
    out = client.post(
        "/completion",
        json={
            "prompt": PROMPT,
            "n_predict": 3,
            "return_tokens": True,
            "response_fields": ["content", "tokens", "generation_settings/n_predict", "absent"],
        },
    ).json()
    assert set(out) == {"content", "tokens", "n_predict"}
    assert len(out["tokens"]) == 3 and out["n_predict"] == 3


def wait_idle(client: httpx.Client, timeout: float = 10) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        p = client.get("/api/extra/perf").json()
        if p["busy_slots"] == 0 and p["queue"] == 0:
            return p
        assert time.monotonic() < deadline, f"slots still busy: {p}"
        time.sleep(0.05)


def test_closed_stream_frees_its_slot(server: ServerProcess, client: httpx.Client) -> None:
    before = client.get("/api/extra/perf").json()["total_aborted"]
    body = {"prompt": PROMPT, "n_predict": 1500, "ignore_eos": True, "stream": True}
    with (
        httpx.Client(base_url=server.url, timeout=60) as c,
        c.stream("POST", "/completion", json=body) as r,
    ):
        lines = r.iter_lines()  # held: a generator dropped by `break` closes the connection
        n = 0
        while n < 5:
            n += next(lines).startswith("data: {")
        busy = [s for s in client.get("/slots").json() if s["is_processing"]]
        assert len(busy) == 1 and busy[0]["id_task"] > 0
        assert busy[0]["next_token"]["n_decoded"] >= 4
        assert busy[0]["params"]["n_predict"] == 1500
        # leaving the block closes the stream mid-way: the client hangs up
    t0 = time.monotonic()
    p = wait_idle(client)
    assert time.monotonic() - t0 < 2
    assert p["total_aborted"] == before + 1
    assert all(not s["is_processing"] for s in client.get("/slots").json())


def test_id_slot_pins_the_request(client: httpx.Client) -> None:
    for slot in (1, 0):
        prompt = f"Slot {slot} remembers this sentence about lanterns."
        out = client.post("/completion", json={"prompt": prompt, "n_predict": 3, "id_slot": slot})
        assert out.status_code == 200, out.text
        body = out.json()
        assert body["id_slot"] == slot
        cached = client.get("/slots").json()[slot]["n_cached"]
        # the prompt and every generated token but the last, which was never decoded
        assert cached == body["tokens_evaluated"] + body["tokens_predicted"] - 1


def test_pinned_request_waits_without_holding_up_others(
    server: ServerProcess, client: httpx.Client
) -> None:
    """A request pinned to a busy slot waits for it; a later unpinned one takes the free
    slot meanwhile instead of queueing behind it."""
    long = {"prompt": PROMPT, "n_predict": 1500, "ignore_eos": True, "stream": True, "id_slot": 0}
    pinned: dict[str, Any] = {}

    def send_pinned() -> None:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            pinned["out"] = c.post(
                "/completion", json={"prompt": "Hi", "n_predict": 2, "id_slot": 0}
            )

    with (
        httpx.Client(base_url=server.url, timeout=60) as c,
        c.stream("POST", "/completion", json=long) as r,
    ):
        lines = r.iter_lines()  # held: a generator dropped by `break` closes the connection
        while not next(lines).startswith("data: {"):
            pass
        waiter = threading.Thread(target=send_pinned)
        waiter.start()
        time.sleep(0.3)  # the pinned request is queued behind the busy slot 0
        free = client.post("/completion", json={"prompt": "Hello", "n_predict": 2})
        assert free.status_code == 200 and free.json()["id_slot"] == 1
        assert "out" not in pinned  # still waiting for slot 0
        assert client.get("/slots").json()[0]["is_processing"] is True
    waiter.join(timeout=30)
    assert pinned["out"].status_code == 200 and pinned["out"].json()["id_slot"] == 0


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": "hi", "n_predict": True},
        {"prompt": {}},
        {"prompt": "hi", "n_probs": "3"},
        {"prompt": "hi", "stop": 5},
        {"prompt": "hi", "logit_bias": [[1, 2, 3]]},
        {"prompt": "hi", "id_slot": 99},
        {"prompt": [[1.5]]},
        {"prompt": "hi", "logit_bias": [["a", "b"]]},
        {"prompt": "hi", "logit_bias": {"9" * 5000: 1.0}},
        {"prompt": ["x"] * 10_000},
        {"prompt": "word " * 200_000},
    ],
    ids=lambda b: ",".join(f"{k}={str(v)[:12]}" for k, v in b.items()),
)
def test_bad_input_is_a_llama_error(client: httpx.Client, body: dict[str, Any]) -> None:
    assert_llama_error(client.post("/completion", json=body))
    ok = client.post("/completion", json={"prompt": "Hi", "n_predict": 2})
    assert ok.status_code == 200 and ok.json()["stop"] is True


def test_logit_bias_ids_outside_the_vocabulary_are_ignored_as_llama_server_does(
    client: httpx.Client,
) -> None:
    body = {"prompt": "Hi", "n_predict": 2, "temperature": 0}
    plain = client.post("/completion", json=body)
    odd = client.post("/completion", json={**body, "logit_bias": [[10**12, 5.0], [-3, False]]})
    assert odd.status_code == 200 and odd.json()["content"] == plain.json()["content"]


def test_not_json_is_a_llama_error(client: httpx.Client) -> None:
    r = client.post("/completion", content=b"{nope", headers={"content-type": "application/json"})
    assert_llama_error(r, 400)


def test_infill_needs_fim_tokens(client: httpx.Client) -> None:
    """The embedded SmolLM2 has no FIM_PRE/SUF/MID tokens: a 409 (llama-server: 501) with
    llama-server's error type (no code model with FIM tokens is available to the test suite
    for the happy path)."""
    r = client.post("/infill", json={"input_prefix": "def f(", "input_suffix": "):"})
    assert r.status_code == 409
    err = r.json()["error"]
    assert err["type"] == "not_supported_error" and err["code"] == 409
    assert "fill-in-the-middle" in err["message"]


def test_apply_template(client: httpx.Client) -> None:
    r = client.post("/apply-template", json={"messages": [{"role": "user", "content": "Hi there"}]})
    assert r.status_code == 200, r.text
    prompt = r.json()["prompt"]
    assert "Hi there" in prompt and prompt.rstrip().endswith("assistant")
    assert_llama_error(client.post("/apply-template", json={"messages": []}), 400)
    bad_length = {"messages": [{"role": "user", "content": "Hi"}], "max_length": 0}
    assert_llama_error(client.post("/apply-template", json=bad_length), 400)


def test_slots_report_state(client: httpx.Client) -> None:
    slots = client.get("/slots").json()
    assert [s["id"] for s in slots] == [0, 1]
    for s in slots:
        assert s["n_ctx"] == 2048
        assert isinstance(s["is_processing"], bool)
        assert {"n_decoded", "n_remain", "has_next_token"} <= set(s["next_token"])
    # save and restore need --slot-save-path, as in llama-server
    r = client.post("/slots/0?action=save", json={"filename": "x.bin"})
    assert r.status_code == 403 and r.json()["error"]["type"] == "not_supported_error"
