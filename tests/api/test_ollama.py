"""Ollama's API with the real `ollama` client: listing, show, generate and chat (whole and
streamed), the load request, an abort that frees its slot, pull and delete errors, bad input
answered as Ollama's `{"error"}` while the server keeps serving."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime, timezone

import httpx
import ollama
import pytest

from innkeeper.models.store import default_model_path
from tests.helpers import ServerProcess, run_server

pytestmark = pytest.mark.slow  # starts real servers or browsers: not in `make test-fast`

SMOL = default_model_path().name.removesuffix(".gguf")
NAME = SMOL + ":latest"
CTX = 2048


@pytest.fixture(scope="module")
def srv() -> Iterator[ServerProcess]:
    """A server of its own: num_ctx reloads the model, which must not reach other modules."""
    with run_server("--ctx-size", str(CTX), "--parallel", "2", name="ollama") as s:
        yield s


@pytest.fixture()
def client(srv: ServerProcess) -> ollama.Client:
    return ollama.Client(host=srv.url, timeout=120)


def post(srv: ServerProcess, path: str, body: object, **kw: object) -> httpx.Response:
    return httpx.post(f"{srv.url}{path}", json=body, timeout=120, **kw)  # type: ignore[arg-type]


def perf(srv: ServerProcess) -> dict:
    return httpx.get(f"{srv.url}/api/extra/perf", timeout=30).json()


def wait_idle(srv: ServerProcess, timeout: float = 10) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        p = perf(srv)
        if p["busy_slots"] == 0 and p["queue"] == 0:
            return p
        assert time.monotonic() < deadline, f"slots still busy: {p}"
        time.sleep(0.05)


def test_version_and_probe(srv: ServerProcess) -> None:
    assert httpx.get(f"{srv.url}/api/version").json()["version"]
    assert httpx.head(f"{srv.url}/").status_code == 200
    page = httpx.get(f"{srv.url}/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]


def test_list_and_show(client: ollama.Client) -> None:
    models = client.list().models
    assert [m.model for m in models] == [NAME]
    m = models[0]
    assert m.size and m.size > 0 and m.digest
    assert m.details is not None and m.details.format == "gguf"
    assert m.details.family == "llama" and m.details.quantization_level == "Q4_1"
    assert m.details.parameter_size and m.details.parameter_size.endswith("M")
    for name in (NAME, SMOL):  # with or without the tag
        shown = client.show(name)
        assert shown.details is not None and shown.details.family == "llama"
        assert shown.modelinfo is not None and shown.modelinfo["llama.context_length"] > 0
        assert "im_start" in (shown.template or "")
        assert f"num_ctx         {CTX}" in (shown.parameters or "")
    with pytest.raises(ollama.ResponseError) as err:
        client.show("no-such-model:latest")
    assert (
        err.value.status_code == 404 and err.value.error == "model 'no-such-model:latest' not found"
    )


def test_generate_whole_and_streamed_agree(client: ollama.Client) -> None:
    options = {"num_predict": 6, "temperature": 0, "seed": 1}
    whole = client.generate(model=NAME, prompt="Name a color.", options=options, stream=False)
    assert whole.done and whole.done_reason == "length" and whole.eval_count == 6
    assert whole.prompt_eval_count and whole.prompt_eval_count > 5
    for field in ("total_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(getattr(whole, field), int) and getattr(whole, field) > 0
    assert whole.total_duration >= whole.eval_duration  # type: ignore[operator]
    parts = list(client.generate(model=NAME, prompt="Name a color.", options=options, stream=True))
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    assert parts[-1].done_reason == "length" and parts[-1].eval_count == 6
    assert parts[-1].response == "" and not parts[-1].context
    assert "".join(p.response for p in parts) == whole.response != ""


def test_chat_renders_as_openai_chat(srv: ServerProcess, client: ollama.Client) -> None:
    messages = [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    parts = list(
        client.chat(
            model=NAME, messages=messages, options={"num_predict": 8, "temperature": 0}, stream=True
        )
    )
    assert parts[-1].done and parts[-1].eval_count == 8
    assert all(p.message.role == "assistant" for p in parts)
    text = "".join(p.message.content or "" for p in parts)
    openai = post(
        srv, "/v1/chat/completions", {"messages": messages, "max_tokens": 8, "temperature": 0}
    ).json()
    assert text == openai["choices"][0]["message"]["content"] != ""
    assert parts[-1].prompt_eval_count == openai["usage"]["prompt_tokens"]


def test_raw_generate_is_the_completion(srv: ServerProcess, client: ollama.Client) -> None:
    prompt = "The capital of France is"
    raw = client.generate(
        model=NAME, prompt=prompt, raw=True, options={"num_predict": 5, "temperature": 0}
    )
    done = post(srv, "/v1/completions", {"prompt": prompt, "max_tokens": 5, "temperature": 0})
    assert raw.response == done.json()["choices"][0]["text"]


def test_format_json(client: ollama.Client) -> None:
    out = client.generate(
        model=NAME, prompt="A user as JSON:", format="json", options={"num_predict": 12}
    )
    assert out.response.lstrip().startswith("{")
    chat = client.chat(
        model=NAME,
        messages=[{"role": "user", "content": "A user as JSON."}],
        format="json",
        options={"num_predict": 12},
    )
    assert (chat.message.content or "").lstrip().startswith("{")
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model=NAME, prompt="x", format={"type": "object"})
    assert err.value.status_code == 400 and "schema" in err.value.error


def test_empty_prompt_is_a_load_request(srv: ServerProcess, client: ollama.Client) -> None:
    before = perf(srv)["total_gens"]
    out = client.generate(model=NAME, prompt="")
    assert out.done and out.done_reason == "load" and out.response == "" and not out.eval_count
    chat = post(srv, "/api/chat", {"model": NAME, "messages": []}).json()
    assert chat["done"] and chat["done_reason"] == "load" and chat["message"]["content"] == ""
    assert perf(srv)["total_gens"] == before  # nothing was generated


def test_closed_stream_frees_its_slot(srv: ServerProcess, client: ollama.Client) -> None:
    before = perf(srv)["total_aborted"]
    options = {"num_predict": 1500, "ignore_eos": True, "temperature": 0.8}
    stream = client.generate(
        model=NAME, prompt="Tell me a long story.", options=options, stream=True
    )
    for n, _part in enumerate(stream):
        if n >= 5:
            break
    stream.close()  # the client hangs up mid-stream
    t0 = time.monotonic()
    p = wait_idle(srv)
    assert time.monotonic() - t0 < 3
    assert p["total_aborted"] == before + 1
    assert client.generate(model=NAME, prompt="Hi", options={"num_predict": 2}).eval_count


def test_pull_and_delete_errors(client: ollama.Client) -> None:
    # No hub is reachable from the tests (and this repo does not exist): the client raises.
    with pytest.raises(ollama.ResponseError):
        for _status in client.pull("innkeeper-tests/no-such-repo-GGUF", stream=True):
            pass
    with pytest.raises(ollama.ResponseError):
        client.pull("innkeeper-tests/no-such-repo-GGUF")
    with pytest.raises(ollama.ResponseError) as err:
        client.pull("llama3.2")  # an Ollama library name is no hub reference
    assert err.value.status_code == 400
    with pytest.raises(ollama.ResponseError) as err:
        client.delete("no-such-model:latest")
    assert err.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as err:
        client.delete(NAME)  # the embedded model is not the store's to delete
    assert err.value.status_code == 400


@pytest.mark.parametrize(
    "path,body",
    [
        ("/api/generate", {"model": NAME, "prompt": 5}),
        ("/api/generate", {"model": NAME, "prompt": "x", "options": {"temperature": "hot"}}),
        ("/api/generate", {"model": NAME, "prompt": "x", "options": {"stop": 3}}),
        ("/api/generate", {"model": NAME, "prompt": "x", "options": {"num_predict": 0}}),
        ("/api/generate", {"model": NAME, "prompt": "x", "stream": "yes"}),
        ("/api/generate", {"model": NAME, "prompt": "x", "suffix": "y"}),
        ("/api/generate", {"model": NAME, "prompt": "x", "images": ["aGk="]}),
        ("/api/generate", {"model": NAME, "prompt": "x", "template": "{{ .Prompt }}"}),
        ("/api/generate", {"model": NAME, "prompt": "x", "keep_alive": "soon"}),
        ("/api/generate", {"model": NAME, "prompt": "x", "format": "yaml"}),
        ("/api/generate", {"model": NAME, "prompt": "x", "context": [10**9]}),
        ("/api/generate", {"prompt": "x"}),
        ("/api/generate", {"model": "", "prompt": "x"}),
        ("/api/generate", {"model": NAME, "prompt": "word " * 200_000}),
        ("/api/chat", {"model": NAME, "messages": "hi"}),
        ("/api/chat", {"model": NAME, "messages": [{"role": "user", "content": 1}]}),
        (
            "/api/chat",
            {"model": NAME, "messages": [{"role": "user", "content": "x"}], "tools": [{}]},
        ),
        ("/api/show", {}),
        ("/api/show", [1, 2]),
    ],
)
def test_bad_input_is_a_4xx_error(srv: ServerProcess, path: str, body: object) -> None:
    r = post(srv, path, body)
    assert 400 <= r.status_code < 500, r.text
    assert r.status_code != 404 or path == "/api/show"
    error = r.json()["error"]
    assert isinstance(error, str) and error


def test_unknown_model_and_unknown_options(srv: ServerProcess) -> None:
    r = post(srv, "/api/generate", {"model": "nope:7b", "prompt": "x"})
    assert r.status_code == 404 and r.json() == {"error": "model 'nope:7b' not found"}
    # Ollama ignores options it does not know (and its load options, such as num_gpu)
    opts = {
        "num_predict": 2,
        "ignore_eos": True,
        "not_an_option": 1,
        "num_gpu": 99,
        "num_thread": 3,
    }
    r = post(srv, "/api/generate", {"model": NAME, "prompt": "x", "stream": False, "options": opts})
    assert r.status_code == 200 and r.json()["eval_count"] == 2


def test_body_without_json_content_type(srv: ServerProcess) -> None:
    """Ollama's docs send `curl -d '{...}'`: the form type, read as JSON all the same."""
    r = httpx.post(
        f"{srv.url}/api/generate",
        content=f'{{"model": "{NAME}", "prompt": "Hi", "stream": false, "options": {{"num_predict": 2}}}}',
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        timeout=60,
    )
    assert r.status_code == 200 and r.json()["done"]
    r = httpx.post(f"{srv.url}/api/generate", content=b"{not json", timeout=30)
    assert r.status_code == 400 and "JSON" in r.json()["error"]


def test_other_api_paths_keep_their_shapes(srv: ServerProcess) -> None:
    """KoboldAI's /api/v1/* and innkeeper's /api/innkeeper/* are not Ollama's."""
    r = httpx.post(f"{srv.url}/api/v1/generate", json={"prompt": 5}, timeout=30)
    assert r.status_code == 422 and "detail" in r.json()
    r = httpx.get(f"{srv.url}/api/innkeeper/nothing", timeout=30)
    assert r.status_code == 404 and "detail" in r.json()
    r = httpx.post(f"{srv.url}/api/create", json={}, timeout=30)  # Ollama's, not served
    assert r.status_code in (404, 405) and "error" in r.json()


def test_ps_lists_the_loaded_model(client: ollama.Client) -> None:
    client.generate(model=NAME, prompt="Hi", keep_alive="5m", options={"num_predict": 1})
    loaded = client.ps().models
    assert [m.model for m in loaded] == [NAME]
    m = loaded[0]
    assert m.size and m.size > 0 and m.size_vram is not None and m.size_vram <= m.size
    assert m.expires_at is not None and m.context_length == CTX
    left = (m.expires_at - datetime.now(timezone.utc)).total_seconds()
    assert 240 < left <= 300  # keep_alive 5m: idle unload in five minutes
