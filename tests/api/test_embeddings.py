"""Embedding routes over HTTP, as SillyTavern's Vector Storage sources call them: OpenAI (the
`openai` SDK), llama-server and Ollama shapes; bad input per route; which model answers.

One server: the embedded SmolLM2 (a chat model, the default) and a --models-dir holding the
tiny BERT embedding model and a tiny BERT reranker, room for all three (--models-max 3).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from gguf import PoolingType

from innkeeper.models.store import default_model_path
from tests.helpers import ServerProcess, run_server
from tests.models.bert_factory import write_tiny_bert

pytestmark = pytest.mark.slow  # starts a real server

SMOL = default_model_path().name.removesuffix(".gguf")
BERT = "tiny-bert"
RERANKER = "tiny-reranker"
SMOL_DIM, BERT_DIM = 576, 64
TEXTS = ["hello world", "the cat sat on the mat.", "old chats become vectors"]


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    models = tmp_path_factory.mktemp("models")
    write_tiny_bert(models / f"{BERT}.gguf")
    write_tiny_bert(models / f"{RERANKER}.gguf", pooling=PoolingType.RANK, classifier=True)
    store = tmp_path_factory.mktemp("store")
    with run_server(
        "--ctx-size",
        "1024",
        "--parallel",
        "1",
        "--models-dir",
        str(models),
        "--models-max",
        "3",
        env={"INNKEEPER_MODELS": str(store)},
        name="embeddings",
    ) as server:
        yield server


@pytest.fixture()
def http(srv: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=srv.url, timeout=120) as c:
        yield c


@pytest.fixture()
def oai(srv: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", timeout=120)


def dims(response: httpx.Response) -> int:
    assert response.status_code == 200, response.text
    return len(response.json()["data"][0]["embedding"])


def test_routing_named_then_loaded_embedding_model_then_default(http: httpx.Client) -> None:
    """No name: the default chat model (mean pooling) while no embedding model is loaded;
    a name loads that model; afterwards no name means the loaded embedding model."""
    assert dims(http.post("/v1/embeddings", json={"input": "hello"})) == SMOL_DIM
    kinds = {m["id"]: m["kind"] for m in http.get("/api/innkeeper/models").json()["models"]}
    assert kinds == {SMOL: "chat", BERT: "embedding", RERANKER: "rerank"}
    named = http.post("/v1/embeddings", json={"model": BERT, "input": "hello"})
    assert dims(named) == BERT_DIM and named.json()["model"] == BERT
    assert dims(http.post("/v1/embeddings", json={"input": "hello"})) == BERT_DIM
    assert dims(http.post("/v1/embeddings", json={"model": SMOL, "input": "hi"})) == SMOL_DIM
    # generation still goes to the default chat model; the embedding model refuses it
    chat = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    assert chat.status_code == 200, chat.text
    refused = http.post("/v1/completions", json={"model": BERT, "prompt": "Hi", "max_tokens": 2})
    assert refused.status_code == 400 and "embedding model" in refused.json()["error"]["message"]


def test_openai_sdk_strings_ids_and_base64(oai: openai.OpenAI, http: httpx.Client) -> None:
    floats = oai.embeddings.create(model=BERT, input=TEXTS, encoding_format="float")
    b64 = oai.embeddings.create(model=BERT, input=TEXTS)  # the SDK asks base64 and decodes
    assert [d.index for d in floats.data] == [0, 1, 2]
    n_tokens = [
        len(
            http.post("/tokenize", json={"model": BERT, "content": t, "add_special": True}).json()[
                "tokens"
            ]
        )
        for t in TEXTS
    ]
    assert floats.usage.prompt_tokens == floats.usage.total_tokens == sum(n_tokens)
    for f, b in zip(floats.data, b64.data, strict=True):
        assert len(f.embedding) == BERT_DIM
        assert np.allclose(f.embedding, b.embedding, atol=1e-6)
        assert abs(np.linalg.norm(f.embedding) - 1) < 1e-5
    ids = http.post("/tokenize", json={"model": BERT, "content": TEXTS[0], "add_special": True})
    tokens = ids.json()["tokens"]
    one = oai.embeddings.create(model=BERT, input=tokens, encoding_format="float")
    several = oai.embeddings.create(model=BERT, input=[tokens, tokens], encoding_format="float")
    assert np.allclose(one.data[0].embedding, floats.data[0].embedding, atol=1e-5)
    assert len(several.data) == 2 and one.usage.prompt_tokens == len(tokens)


def test_llama_server_shapes(http: httpx.Client) -> None:
    one = http.post("/embedding", json={"model": BERT, "content": TEXTS[0]})
    assert one.status_code == 200, one.text
    [item] = one.json()
    assert item["index"] == 0 and len(item["embedding"]) == 1
    assert len(item["embedding"][0]) == BERT_DIM
    many = http.post("/embeddings", json={"model": BERT, "content": TEXTS}).json()
    assert [m["index"] for m in many] == [0, 1, 2]
    assert np.allclose(many[0]["embedding"][0], item["embedding"][0], atol=1e-6)
    raw = http.post("/embedding", json={"model": BERT, "content": TEXTS[0], "embd_normalize": -1})
    assert np.linalg.norm(raw.json()[0]["embedding"][0]) > 1.5  # not normalised


def test_ollama_shapes(http: httpx.Client) -> None:
    out = http.post(
        "/api/embed", json={"model": BERT, "input": TEXTS, "keep_alive": -1, "truncate": True}
    )
    assert out.status_code == 200, out.text
    body = out.json()
    assert body["model"] == BERT and len(body["embeddings"]) == 3
    assert body["prompt_eval_count"] > 3 and body["total_duration"] > 0
    assert isinstance(body["load_duration"], int)
    single = http.post("/api/embed", json={"model": BERT, "input": TEXTS[0]}).json()
    assert np.allclose(single["embeddings"][0], body["embeddings"][0], atol=1e-6)
    legacy = http.post("/api/embeddings", json={"model": BERT, "prompt": TEXTS[0]})
    vec = np.asarray(legacy.json()["embedding"])
    assert len(vec) == BERT_DIM and np.linalg.norm(vec) > 1.5  # Ollama's old route: raw
    assert np.allclose(vec / np.linalg.norm(vec), single["embeddings"][0], atol=1e-5)


LONG = "a" * 1_000_000
BAD_INPUTS = [5, {"text": "x"}, [], ["ok", 5], [[1, 2], "x"], ["a"] * 10_000, LONG]


@pytest.mark.parametrize("bad", BAD_INPUTS, ids=lambda b: type(b).__name__ + str(len(str(b))))
@pytest.mark.parametrize(
    ("path", "field", "shape"),
    [
        ("/v1/embeddings", "input", "openai"),
        ("/embedding", "content", "llamacpp"),
        ("/embeddings", "input", "llamacpp"),
        ("/api/embed", "input", "ollama"),
        ("/api/embeddings", "prompt", "ollama"),
    ],
)
def test_bad_input_is_a_4xx_in_the_family_shape(
    http: httpx.Client, path: str, field: str, shape: str, bad: object
) -> None:
    if path == "/api/embeddings" and bad == []:
        bad = None  # the old Ollama route takes one prompt: an empty list is just a bad type
    if path == "/api/embeddings" and bad is LONG:
        bad = [LONG]  # it truncates, always (test_long_input_truncated_where_asked)
    extra = {"truncate": False} if path == "/api/embed" else {}  # Ollama truncates by default
    r = http.post(path, json={"model": BERT, field: bad, **extra})
    assert 400 <= r.status_code < 500, r.text
    error = r.json()["error"]
    if shape == "ollama":
        assert isinstance(error, str) and error
    elif shape == "openai":
        assert error["message"] and error["type"]
    else:
        assert error["code"] == r.status_code and error["message"]
    # and the server keeps serving
    assert dims(http.post("/v1/embeddings", json={"model": BERT, "input": "still here"})) == 64


def test_bad_json_and_unknown_model(http: httpx.Client) -> None:
    r = http.post("/api/embed", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]
    r = http.post("/api/embed", json={"model": "no-such-model", "input": "x"})
    assert r.status_code == 404 and isinstance(r.json()["error"], str)
    r = http.post("/v1/embeddings", json={"input": "x", "encoding_format": "int8"})
    assert r.status_code == 400 and r.json()["error"]["message"]


def test_long_input_truncated_where_asked(http: httpx.Client) -> None:
    text = "abcdefghij " * 40  # ~440 tokens: more than the tiny BERT's 256
    r = http.post("/v1/embeddings", json={"model": BERT, "input": text})
    assert r.status_code == 400 and "tokens" in r.json()["error"]["message"]
    out = http.post("/api/embed", json={"model": BERT, "input": text})  # truncate: default true
    assert out.status_code == 200 and out.json()["prompt_eval_count"] == 256
    no = http.post("/api/embed", json={"model": BERT, "input": text, "truncate": False})
    assert no.status_code == 400 and isinstance(no.json()["error"], str)
    # 1 MB: only a prefix is tokenised, the answer is the first 256 tokens' vector
    huge = http.post("/api/embed", json={"model": BERT, "input": [text, LONG]})
    assert huge.status_code == 200, huge.text
    assert huge.json()["prompt_eval_count"] == 2 * 256
    legacy = http.post("/api/embeddings", json={"model": BERT, "prompt": LONG})
    assert legacy.status_code == 200 and len(legacy.json()["embedding"]) == BERT_DIM


def test_rerank_jina_and_tei_shapes(http: httpx.Client) -> None:
    docs = ["a cat is an animal", "rivers flow to the sea", "cats purr", ""]
    # no reranker loaded and none named: the default chat model, which does not rerank
    refused = http.post("/rerank", json={"query": "cats", "documents": docs})
    assert refused.status_code == 409 and "rerank" in refused.json()["error"]["message"]
    out = http.post("/rerank", json={"model": RERANKER, "query": "cats", "documents": docs})
    assert out.status_code == 200, out.text
    body = out.json()
    scores = [r["relevance_score"] for r in body["results"]]
    assert sorted(r["index"] for r in body["results"]) == [0, 1, 2, 3]
    assert scores == sorted(scores, reverse=True) and len(set(scores)) == 4
    assert body["usage"]["prompt_tokens"] > 4 and body["model"] == RERANKER
    # once loaded, a reranking request without a name goes to it; top_n keeps the best
    top = http.post("/v1/rerank", json={"query": "cats", "documents": docs, "top_n": 2})
    assert top.json()["results"] == body["results"][:2]
    tei = http.post("/reranking", json={"query": "cats", "texts": docs, "return_text": True})
    assert [(r["index"], r["score"], r["text"]) for r in tei.json()] == [
        (r["index"], r["relevance_score"], docs[r["index"]]) for r in body["results"]
    ]
    # a reranker gives no embeddings, and a chat route refuses it
    r = http.post("/v1/embeddings", json={"model": RERANKER, "input": "x"})
    assert r.status_code == 400 and "reranker" in r.json()["error"]["message"]
    bad = http.post("/v1/rerank", json={"model": RERANKER, "query": "x", "documents": []})
    assert bad.status_code == 400 and bad.json()["error"]["message"]
    bad = http.post("/rerank", json={"model": RERANKER, "query": "x"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == 400


def test_pooling_none_per_token_vectors(tmp_path: Path) -> None:
    """`serve BERT --pooling none`: /embeddings answers every token's vector (unnormalised,
    as llama-server); the routes whose shape has one vector per input refuse."""
    path = write_tiny_bert(tmp_path / f"{BERT}.gguf")
    with (
        run_server(str(path), "--pooling", "none", name="embeddings-none") as server,
        httpx.Client(base_url=server.url, timeout=60) as c,
    ):
        n = len(c.post("/tokenize", json={"content": "hi", "add_special": True}).json()["tokens"])
        out = c.post("/embeddings", json={"input": ["hi", "hi"]})
        assert out.status_code == 200, out.text
        assert [len(item["embedding"]) for item in out.json()] == [n, n]
        assert len(out.json()[0]["embedding"][0]) == BERT_DIM
        r = c.post("/v1/embeddings", json={"input": "hi"})
        assert r.status_code == 400 and "pooling" in r.json()["error"]["message"]
        r = c.post("/api/embed", json={"input": "hi"})
        assert r.status_code == 400 and "pooling" in r.json()["error"]
