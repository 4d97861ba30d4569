"""Embeddings and reranking for a loaded model, as `Service.embed` / `Service.rerank` run them.

Tokenising and decoding happen on the service's embedding thread, never on the event loop;
everything a client can get wrong (too many inputs, an empty or too long one, a model that
does not rerank) is a typed `ServingError` before or instead of a decode.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from innkeeper.engine.embeddings import (
    Embedder,
    EmbeddingCancelled,
    EmbeddingError,
    Embeddings,
    rerank_prompt,
)
from innkeeper.engine.tokenizer import TokenizeCancelled, TooManyTokens
from innkeeper.serving.errors import ClientGone, Conflict, ParamError

if TYPE_CHECKING:
    from innkeeper.serving.service import Disconnectable, Service

MAX_EMBED_INPUTS = 2048  # inputs in one request (OpenAI's own cap)
EMBED_CHARS_PER_TOKEN = 64  # more characters than any token of a real vocabulary covers


def check_count(n: int, what: str) -> None:
    if n == 0:
        raise ParamError(f"no {what} given: give at least one")
    if n > MAX_EMBED_INPUTS:
        raise ParamError(
            f"{n} {what} in one request; this server takes at most {MAX_EMBED_INPUTS} at once"
        )


def decode(
    embedder: Embedder,
    tokens: list[list[int]],
    cancel: threading.Event,
    *,
    normalize: bool,
    truncate: bool = False,
) -> Embeddings:
    """`embedder.embed` with its refusals as serving errors."""
    try:
        return embedder.embed(tokens, normalize=normalize, truncate=truncate, cancel=cancel)
    except EmbeddingError as exc:
        raise ParamError(str(exc)) from exc
    except EmbeddingCancelled as exc:
        raise ClientGone("the client went away") from exc


def tokenize_inputs(
    service: Service, embedder: Embedder, texts: list[str], truncate: bool, cancel: threading.Event
) -> list[list[int]]:
    """Each text's ids (special tokens as the model adds them), bounded by the context."""
    # Tokenising stops past what could be used. Truncating, only the first `embedder.limit`
    # tokens are kept: a prefix of the text holds them (no token spans EMBED_CHARS_PER_TOKEN
    # characters), so a 1 MB input costs no more to tokenise than a context's worth.
    limit = None if truncate else embedder.limit
    out = []
    for i, text in enumerate(texts):
        if truncate:
            text = text[: embedder.limit * EMBED_CHARS_PER_TOKEN]
        try:
            out.append(service.engine.tokenize(text, add_special=True, cancel=cancel, limit=limit))
        except TooManyTokens as exc:
            raise ParamError(
                f"input {i} has at least {exc.at_least} tokens but the embedding context "
                f"holds {limit}: shorten it (or ask for truncation)"
            ) from exc
        except TokenizeCancelled as exc:
            raise ClientGone("the client went away") from exc
    return out


async def embed(
    service: Service,
    inputs: list[list[int]] | list[str],
    *,
    truncate: bool = False,
    normalize: bool = True,
    request: Disconnectable | None = None,
) -> Embeddings:
    """Embed texts or token lists (one kind per request); with `truncate`, a long input is cut
    to the embedding context instead of refused."""
    check_count(len(inputs), "inputs")
    texts = [t for t in inputs if isinstance(t, str)]
    if texts and len(texts) != len(inputs):
        raise ParamError("the input mixes texts and token ids: give one kind")

    def work(cancel: threading.Event) -> Embeddings:
        embedder = service.engine.embedder  # a chat model's is created on first use
        tokens = tokenize_inputs(service, embedder, texts, truncate, cancel) if texts else inputs
        if embedder.pooling == "rank":
            raise ParamError(
                f"model {service.model_id!r} is a reranker: it answers /rerank, not embeddings"
            )
        return decode(embedder, tokens, cancel, normalize=normalize, truncate=truncate)  # type: ignore[arg-type]

    return await service.off_loop_embed(work, request)


async def rerank(
    service: Service, query: str, documents: list[str], *, request: Disconnectable | None = None
) -> Embeddings:
    """One relevance score per document (the vectors are one value each), as llama-server's
    /rerank computes them: the (query, document) pairs in as few decodes as fit."""
    check_count(len(documents), "documents")

    def work(cancel: threading.Event) -> Embeddings:
        embedder = service.engine.embedder
        if embedder.pooling != "rank":
            raise Conflict(
                f"model {service.model_id!r} does not rerank: name a reranker (a GGUF with "
                "pooling rank, e.g. bge-reranker) or start the server with --pooling rank"
            )
        longest = embedder.limit * EMBED_CHARS_PER_TOKEN  # more tokens than the context holds
        if len(query) + max(len(d) for d in documents) > longest:
            raise ParamError("the query and a document are longer than the context holds")
        model = service.engine.model
        pairs = [rerank_prompt(model, query, d) for d in documents]
        return decode(embedder, pairs, cancel, normalize=False)

    return await service.off_loop_embed(work, request)
