"""Embeddings against llama-cpp-python's own `Llama.embed` on the same files, and batching.

The reference is an independent implementation (its own batch, its own context) over the same
libllama: a vector that differs from it means our batching, pooling or read-back is wrong.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
from gguf import GGUFReader, PoolingType

from innkeeper.engine.embeddings import EmbeddingError, InputTooLong, model_kind, rerank_prompt
from innkeeper.engine.engine import Engine, EngineConfig, NotAChatModel
from innkeeper.models.store import default_model_path
from innkeeper.serving.catalog import kind_of_file
from tests.engine.conftest import Runner
from tests.models.bert_factory import write_tiny_bert

TEXTS = [
    "hello world",
    "the cat sat on the mat.",
    "vector storage keeps chunks of old chats",
    "a",
    "embeddings of several inputs share one decode, one sequence each",
]


@pytest.fixture(scope="module")
def bert_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_bert(tmp_path_factory.mktemp("bert") / "tiny-bert.gguf")


@pytest.fixture(scope="module")
def bert(bert_path: Path) -> Iterator[Engine]:
    e = Engine(EngineConfig(model_path=bert_path, threads=1))
    yield e
    e.close()


@pytest.fixture(scope="module")
def chat() -> Iterator[Engine]:
    e = Engine(EngineConfig(model_path=default_model_path(), ctx_size=1024, threads=1, parallel=2))
    yield e
    e.close()


def reference(path: Path, texts: list[str], pooling: int) -> list[np.ndarray]:
    """`Llama.embed` with flash attention on, as our default "auto" resolves on CPU (f16
    attention on vs off alone moves a decoder's vectors by ~2e-4 in cosine)."""
    ref = llama_cpp.Llama(
        str(path),
        embedding=True,
        pooling_type=pooling,
        n_ctx=512,
        n_batch=512,
        n_ubatch=512,
        n_threads=1,
        flash_attn=True,
        verbose=False,
    )
    try:
        return [np.asarray(v, dtype=np.float64) for v in ref.embed(texts)]
    finally:
        ref.close()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def ours(engine: Engine, texts: list[str], **kw) -> list[np.ndarray]:
    tokens = [engine.tokenize(t) for t in texts]
    return [np.asarray(v) for v in engine.embed(tokens, **kw).vectors]


def test_kind_from_header_and_from_llama(bert: Engine, chat: Engine, bert_path: Path) -> None:
    assert bert.kind == kind_of_file(bert_path) == "embedding"
    assert chat.kind == kind_of_file(default_model_path()) == "chat"
    meta = {"general.architecture": "qwen2", "qwen2.attention.causal": False}
    assert model_kind(meta.get) == "embedding"
    assert model_kind({"general.architecture": "llama"}.get) == "chat"


def test_bert_matches_reference(bert: Engine, bert_path: Path) -> None:
    want = reference(bert_path, TEXTS, llama_cpp.LLAMA_POOLING_TYPE_MEAN)
    got = ours(bert, TEXTS)
    assert bert.embedder.pooling == "mean"  # the GGUF's own bert.pooling_type
    for g, w in zip(got, want, strict=True):
        assert cosine(g, w) >= 0.9999
        assert abs(np.linalg.norm(g) - 1.0) < 1e-6  # L2-normalised by default


def test_decoder_mean_pooling_matches_reference(chat: Engine) -> None:
    want = reference(default_model_path(), TEXTS, llama_cpp.LLAMA_POOLING_TYPE_MEAN)
    got = ours(chat, TEXTS)
    assert chat.embedder.pooling == "mean"
    for g, w in zip(got, want, strict=True):
        assert cosine(g, w) >= 0.9999


def test_sliding_window_decoder_matches_reference(gemma_path: Path) -> None:
    """Gemma 3 (sliding-window layers, two KV caches) beside its generation context. Its
    batched vectors differ from one-by-one ones by up to 2e-3 in cosine with flash attention
    (f16 accumulation over a longer masked cache): llama-cpp-python's own batch does the
    same, so the comparison is batch against batch."""
    e = Engine(EngineConfig(model_path=gemma_path, ctx_size=1024, threads=1, parallel=1))
    try:
        want = reference(gemma_path, TEXTS, llama_cpp.LLAMA_POOLING_TYPE_MEAN)
        for g, w in zip(ours(e, TEXTS), want, strict=True):
            assert cosine(g, w) >= 0.9999
    finally:
        e.close()


@pytest.mark.parametrize("which", ["bert", "chat"])
def test_one_decode_for_many_inputs_equals_one_by_one(
    which: str, request: pytest.FixtureRequest
) -> None:
    engine: Engine = request.getfixturevalue(which)
    embedder = engine.embedder
    before = embedder.decodes
    together = ours(engine, TEXTS)
    assert embedder.decodes - before == 1
    alone = [ours(engine, [t])[0] for t in TEXTS]
    assert embedder.decodes - before == 1 + len(TEXTS)
    for a, b in zip(together, alone, strict=True):
        assert cosine(a, b) >= 0.99999


def test_batches_split_at_the_context(bert: Engine) -> None:
    embedder = bert.embedder
    n = embedder.n_batch // 100 + 2  # inputs of 100 tokens: more than one batch holds
    tokens = [[2] + [10 + i % 50] * 98 + [3] for i in range(n)]
    before = embedder.decodes
    result = bert.embed(tokens)
    assert embedder.decodes - before == -(-100 * n // embedder.n_batch)
    assert result.n_tokens == [100] * n
    alone = bert.embed(tokens[-1:]).vectors[0]
    assert cosine(np.asarray(result.vectors[-1]), np.asarray(alone)) >= 0.99999


def test_pooling_none_gives_token_vectors(bert_path: Path) -> None:
    e = Engine(EngineConfig(model_path=bert_path, threads=1, pooling="none"))
    try:
        tokens = [e.tokenize(t) for t in TEXTS[:2]]
        result = e.embed(tokens)
        assert result.pooling == "none"
        for vecs, toks in zip(result.vectors, tokens, strict=True):
            assert len(vecs) == len(toks) and len(vecs[0]) == 64
    finally:
        e.close()


def test_long_inputs_refused_or_truncated(bert: Engine) -> None:
    limit = bert.embedder.limit
    long = [5] * (limit + 10)
    with pytest.raises(InputTooLong) as info:
        bert.embed([[5, 6], long])
    assert info.value.index == 1 and info.value.limit == limit
    result = bert.embed([long], truncate=True)
    assert result.n_tokens == [limit]
    with pytest.raises(EmbeddingError):
        bert.embed([[]])
    with pytest.raises(EmbeddingError):
        bert.embed([[10**7]])


def test_embedding_model_refuses_generation(bert: Engine) -> None:
    with pytest.raises(NotAChatModel):
        Runner(bert).submit([2, 10, 3])


def test_embedding_beside_generation_changes_nothing(chat: Engine) -> None:
    """Embeddings run on their own context while the chat context generates: the greedy
    text is the same with and without them."""
    runner = Runner(chat)
    prompt = chat.tokenize("Once upon a time")
    alone, _, _ = runner.run(prompt, max_tokens=24)
    stop = threading.Event()

    def embed_loop() -> None:
        while not stop.is_set():
            chat.embed([chat.tokenize(t) for t in TEXTS])

    worker = threading.Thread(target=embed_loop)
    worker.start()
    try:
        with_embeds, _, _ = runner.run(prompt, max_tokens=24)
    finally:
        stop.set()
        worker.join()
    assert with_embeds == alone


def test_rerank_scores_are_the_classifier_head_on_cls(tmp_path: Path) -> None:
    """A reranker's score (pooling rank) is its classifier head applied to the [CLS] vector:
    checked against the same model pooled with cls and the head done in numpy."""
    path = write_tiny_bert(tmp_path / "rr.gguf", pooling=PoolingType.RANK, classifier=True)
    head = {t.name: np.asarray(t.data, dtype=np.float64) for t in GGUFReader(path).tensors}
    rr = Engine(EngineConfig(model_path=path, threads=1))
    cls = Engine(EngineConfig(model_path=path, threads=1, pooling="cls"))
    try:
        assert rr.kind == kind_of_file(path) == "rerank"
        docs = ["a cat is an animal", "rivers flow to the sea", ""]
        pairs = [rerank_prompt(rr.model, "what is a cat?", d) for d in docs]
        sep = [t for t in pairs[0] if t == 3]
        assert pairs[0][0] == rr.model.bos and len(sep) == 1  # [CLS] query [SEP] document
        scores = [v[0] for v in rr.embed(pairs, normalize=False).vectors]
        hidden = cls.embed(pairs, normalize=False).vectors
        for score, h in zip(scores, hidden, strict=True):
            inner = np.tanh(head["cls.weight"] @ np.asarray(h) + head["cls.bias"])
            want = float((head["cls.output.weight"] @ inner + head["cls.output.bias"])[0])
            assert abs(score - want) < 1e-3 * max(1.0, abs(want))
        with pytest.raises(NotAChatModel):
            Runner(rr).submit(pairs[0])
    finally:
        rr.close()
        cls.close()
