"""Bad input gets a 4xx in the route family's own error shape; the server keeps serving."""

from __future__ import annotations

import httpx
import pytest


def openai_error(r: httpx.Response) -> str:
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    body = r.json()
    assert set(body["error"]) >= {"message", "type"}
    return body["error"]["message"]


def kobold_error(r: httpx.Response) -> str:
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    detail = r.json()["detail"]
    return detail["msg"] if isinstance(detail, dict) else str(detail)


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"prompt": "Hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "Hi", "max_tokens": -5}, "max_tokens"),
        ({"prompt": "Hi", "max_tokens": 100000}, "context"),
        ({"prompt": "Hi", "temperature": -1}, "temperature"),
        ({"prompt": "Hi", "top_p": 1.5}, "top_p"),
        ({"prompt": "Hi", "min_p": 2}, "min_p"),
        ({"prompt": "Hi", "temperature": "hot"}, "temperature"),
        ({"prompt": "Hi", "max_tokens": "ten"}, "max_tokens"),
        ({"prompt": "Hi", "stop": 5}, "stop"),
        ({"prompt": "Hi", "logit_bias": {"abc": 1}}, "logit_bias"),
        ({"prompt": "Hi", "logit_bias": {"99999999": 1}}, "vocabulary"),
        ({"prompt": "Hi", "custom_token_bans": "1,x"}, "custom_token_bans"),
        ({"prompt": "Hi", "mirostat_mode": 3}, "mirostat_mode"),
        ({"prompt": "Hi", "repetition_penalty": 0}, "repetition_penalty"),
        ({"prompt": "Hi", "dry_sequence_breakers": "[not json"}, "dry_sequence_breakers"),
        ({"prompt": "Hi", "n": 0}, "n"),
        ({"prompt": [1, 2, 99999999]}, "vocabulary"),
        ({"prompt": "word " * 3000, "max_tokens": 10}, "context"),
        ({"prompt": "Hi", "grammar": "root ::= ("}, "grammar"),
    ],
    ids=lambda v: str(v)[:40] if isinstance(v, str) else None,
)
def test_openai_bad_inputs(client: httpx.Client, body: dict, needle: str) -> None:
    message = openai_error(client.post("/v1/completions", json=body))
    assert needle in message.lower()


def test_malformed_json(client: httpx.Client) -> None:
    r = client.post(
        "/v1/completions",
        content=b'{"prompt": "Hi", ',
        headers={"content-type": "application/json"},
    )
    assert "json" in openai_error(r).lower()
    r = client.post(
        "/api/v1/generate", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert "json" in kobold_error(r).lower()
    r = client.post(
        "/v1/internal/encode", content=b"[1,", headers={"content-type": "application/json"}
    )
    assert r.status_code == 422 and "json" in r.json()["detail"].lower()


def test_body_of_wrong_shape(client: httpx.Client) -> None:
    assert openai_error(client.post("/v1/completions", json=[1, 2, 3]))
    assert openai_error(client.post("/v1/chat/completions", json={"messages": []}))
    assert openai_error(
        client.post("/v1/chat/completions", json={"messages": [{"content": "no role"}]})
    )
    assert openai_error(
        client.post(
            "/v1/chat/completions",
            json={
                "messages": [{"role": "user", "content": "x"}],
                "instruction_template": "../../etc/passwd",
            },
        )
    )


def test_kobold_family_errors(client: httpx.Client) -> None:
    assert "max_length" in kobold_error(  # the field the client sent is named
        client.post("/api/v1/generate", json={"prompt": "Hi", "max_length": 0})
    )
    assert "temperature" in kobold_error(
        client.post("/api/v1/generate", json={"prompt": "Hi", "temperature": -2})
    )
    assert kobold_error(
        client.post("/api/extra/generate/stream", json={"prompt": "Hi", "top_p": 3})
    )
    assert kobold_error(client.post("/api/extra/tokencount", json={"prompt": ["not", "text"]}))


def test_llamacpp_and_ooba_errors(client: httpx.Client) -> None:
    r = client.post("/detokenize", json={"tokens": [-1]})
    assert r.status_code == 400 and "vocabulary" in r.json()["error"]["message"]
    r = client.post("/v1/internal/decode", json={"tokens": "abc"})
    assert r.status_code == 422 and "tokens" in r.json()["detail"]


def test_unknown_route_and_method(client: httpx.Client) -> None:
    assert client.get("/v1/nothing-here").status_code == 404
    assert "error" in client.get("/v1/nothing-here").json()
    assert client.get("/v1/completions").status_code == 405


def test_server_still_serves_after_bad_inputs(client: httpx.Client) -> None:
    for _ in range(3):
        client.post("/v1/completions", content=b"\xff\xfe garbage")
        client.post("/v1/completions", json={"prompt": "Hi", "grammar": "root ::= ("})
    r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    assert r.status_code == 200
    perf = client.get("/api/extra/perf").json()
    assert perf["busy_slots"] == 0


def test_bad_grammar_on_a_stream_is_a_400_before_streaming(client: httpx.Client) -> None:
    r = client.post(
        "/v1/completions", json={"prompt": "Hi", "stream": True, "grammar": "root ::= ("}
    )
    assert "grammar" in openai_error(r).lower()
    r = client.post("/api/extra/generate/stream", json={"prompt": "Hi", "grammar": "root ::= ("})
    assert "grammar" in kobold_error(r).lower()
