"""Embedding and reranking routes, each family in its own shape (SillyTavern's Vector
Storage uses the embedding ones).

OpenAI: `POST /v1/embeddings`. llama-server: `POST /embedding` and `/embeddings` (a list of
`{"index", "embedding": [[...]]}`; per-token vectors with `--pooling none`). Ollama:
`POST /api/embed` and the older `/api/embeddings`, whose errors are `{"error": "..."}`: those
two routes parse their own bodies and format their own errors, so the app-wide handlers (which
give /api/* KoboldAI's shape) never see them. llama-server's reranking: `POST /rerank` (and
/reranking, /v1/rerank, /v1/reranking) with a reranker (pooling rank). Which model answers is
the registry's rule (`ModelRegistry.embedding_entry`); the decode runs on serving's threads.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal, TypeVar

import numpy as np
from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from innkeeper.api.errors import ApiError, from_serving, validation_message
from innkeeper.api.offload import OFF_LOOP_BODY_BYTES, OffLoopBodyRoute
from innkeeper.api.params import JsonBody
from innkeeper.api.state import registry_of, use_model
from innkeeper.engine.embeddings import Embeddings
from innkeeper.serving.embeddings import MAX_EMBED_INPUTS
from innkeeper.serving.errors import ParamError, ServingError
from innkeeper.serving.service import Service

router = APIRouter(tags=["embeddings"], route_class=OffLoopBodyRoute)
B = TypeVar("B", bound=BaseModel)

# The document states what is refused (schemathesis holds the server to it): no empty text,
# list or id list, at most MAX_EMBED_INPUTS inputs (ids are bounded by the app's
# `document_limits`, which knows the vocabulary).
Text = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
Texts = Annotated[list[Text], Field(min_length=1, max_length=MAX_EMBED_INPUTS)]
IdLists = Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_EMBED_INPUTS)]
# What OpenAI's and llama-server's `input` may be: a text, texts, token ids, lists of ids.
EmbedInput = Text | Texts | TokenIds | IdLists


class OpenAIEmbeddingBody(JsonBody):
    input: EmbedInput
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None  # accepted and ignored, as llama-server does
    user: str | None = None


class LlamaEmbeddingBody(JsonBody):
    """llama-server's body: `content` (its own name) or `input` (OpenAI's), one required."""

    model_config = ConfigDict(
        json_schema_extra={"anyOf": [{"required": ["content"]}, {"required": ["input"]}]}
    )

    content: EmbedInput = None  # type: ignore[assignment]  # absent, never null
    input: EmbedInput = None  # type: ignore[assignment]
    model: str | None = None
    embd_normalize: Literal[-1, 2] = 2  # none or Euclidean (llama-server also has p-norms)


Documents = Annotated[list[str], Field(min_length=1, max_length=MAX_EMBED_INPUTS)]


class RerankBody(JsonBody):
    """llama-server's /rerank body: Jina's `documents`, or TEI's `texts` (TEI's answer)."""

    model_config = ConfigDict(
        json_schema_extra={"anyOf": [{"required": ["documents"]}, {"required": ["texts"]}]}
    )

    query: str
    documents: Documents = None  # type: ignore[assignment]  # absent, never null
    texts: Documents = None  # type: ignore[assignment]
    top_n: Annotated[int, Field(ge=0)] | None = None
    return_text: bool = False  # TEI: each result carries its text
    model: str | None = None


class OllamaEmbedBody(JsonBody):
    model: str | None = None
    input: Text | Texts
    truncate: bool = True
    options: dict[str, Any] | None = None
    keep_alive: Any = None


class OllamaLegacyBody(JsonBody):
    model: str | None = None
    prompt: str
    options: dict[str, Any] | None = None
    keep_alive: Any = None


def as_inputs(value: EmbedInput) -> list[str] | list[list[int]]:
    """One input or several, as a list of inputs (a flat id list is one input)."""
    if isinstance(value, str):
        return [value]
    if value and all(isinstance(v, int) for v in value):
        return [value]  # type: ignore[list-item]
    return value  # type: ignore[return-value]


async def embed_answer(
    request: Request,
    name: str | None,
    inputs: list[str] | list[list[int]],
    shape: Callable[[Service, Embeddings], Any],
    *,
    keep_alive: Any = None,
    truncate: bool = False,
    normalize: bool = True,
    pooled: bool = True,
) -> JSONResponse:
    """Embed `inputs` on the registry's embedding model for `name` (held for the request) and
    answer `shape(service, result)`. The answer grows with the vectors (64 x 4096 floats), so
    it is built and serialised on a worker, not the event loop. `pooled`: the route's shape
    has one vector per input (pooling none is refused)."""
    entry = registry_of(request).embedding_entry(name)
    service = await use_model(request, entry.id, keep_alive)
    result = await service.embed(inputs, truncate=truncate, normalize=normalize, request=request)
    if pooled and result.pooling == "none":
        raise ParamError(
            "pooling 'none' gives one vector per token, which this route cannot return: "
            "use POST /embeddings, or start the server with another --pooling"
        )
    return await service.off_loop(lambda _cancel: JSONResponse(shape(service, result)))


def b64_floats(vec: list[float]) -> str:
    """OpenAI's base64 encoding: little-endian float32s."""
    return base64.b64encode(np.asarray(vec, dtype="<f4").tobytes()).decode("ascii")


# ---- OpenAI ----------------------------------------------------------------------------------
@router.post("/v1/embeddings")
async def openai_embeddings(request: Request, body: OpenAIEmbeddingBody) -> JSONResponse:
    encode = b64_floats if body.encoding_format == "base64" else None

    def shape(service: Service, result: Embeddings) -> dict[str, Any]:
        data = [
            {"object": "embedding", "index": i, "embedding": encode(vec) if encode else vec}
            for i, vec in enumerate(result.vectors)
        ]
        n = result.total_tokens
        return {
            "object": "list",
            "data": data,
            "model": body.model or service.model_id,
            "usage": {"prompt_tokens": n, "total_tokens": n},
        }

    return await embed_answer(request, body.model, as_inputs(body.input), shape)


# ---- llama-server ----------------------------------------------------------------------------
async def llama_embeddings(request: Request, body: LlamaEmbeddingBody) -> JSONResponse:
    value = body.input if body.input is not None else body.content
    if value is None:
        raise ApiError(400, '"input" or "content" must be provided')

    def shape(_service: Service, result: Embeddings) -> list[dict[str, Any]]:
        per_token = result.pooling == "none"  # then every token's vector, as llama-server
        return [
            {"index": i, "embedding": vec if per_token else [vec]}
            for i, vec in enumerate(result.vectors)
        ]

    return await embed_answer(
        request,
        body.model,
        as_inputs(value),
        shape,
        normalize=body.embd_normalize == 2,
        pooled=False,
    )


router.add_api_route("/embedding", llama_embeddings, methods=["POST"])
router.add_api_route("/embeddings", llama_embeddings, methods=["POST"])


# ---- reranking (llama-server's routes) -------------------------------------------------------
async def rerank(request: Request, body: RerankBody) -> JSONResponse:
    """Documents by relevance to the query, best first: Jina's answer for `documents`, TEI's
    for `texts`, as llama-server answers them (raw scores, `top_n` of them)."""
    tei = body.texts is not None and body.documents is None
    documents = body.texts if tei else body.documents
    if documents is None:
        raise ApiError(400, '"documents" must be a non-empty string array')
    entry = registry_of(request).embedding_entry(body.model, kind="rerank")
    service = await use_model(request, entry.id)
    result = await service.rerank(body.query, documents, request=request)
    label = "score" if tei else "relevance_score"

    def answer(_cancel: object) -> JSONResponse:
        items: list[dict[str, Any]] = []
        for i, vec in enumerate(result.vectors):
            item: dict[str, Any] = {"index": i, label: vec[0]}
            if tei and body.return_text:
                item["text"] = documents[i]
            items.append(item)
        items.sort(key=lambda item: -item[label])
        items = items[: body.top_n if body.top_n is not None else len(items)]
        if tei:
            return JSONResponse(items)
        n = result.total_tokens
        return JSONResponse(
            {
                "model": body.model or service.model_id,
                "object": "list",
                "usage": {"prompt_tokens": n, "total_tokens": n},
                "results": items,
            }
        )

    return await service.off_loop(answer)


for _path in ("/rerank", "/reranking", "/v1/rerank", "/v1/reranking"):
    router.add_api_route(_path, rerank, methods=["POST"], tags=["reranking"])


# ---- Ollama ----------------------------------------------------------------------------------
def ollama_error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def ollama_body(request: Request, model: type[B]) -> B:
    """The body as `model`, parsed off the event loop when large (Ollama's routes take it
    raw so that a bad one gets Ollama's error shape)."""
    raw = await request.body()

    def parse() -> B:
        try:
            return model.model_validate(json.loads(raw))
        except json.JSONDecodeError as exc:
            raise ParamError(f"the request body is not valid JSON ({exc.msg})") from None
        except ValidationError as exc:
            errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
            raise ParamError(validation_message(RequestValidationError(errors))) from None

    if len(raw) >= OFF_LOOP_BODY_BYTES:
        return await registry_of(request).off_loop(parse)
    return parse()


async def ollama_route(
    request: Request, model: type[B], answer: Callable[[B], Awaitable[JSONResponse]]
) -> JSONResponse:
    """Run an Ollama route, every refusal as `{"error": msg}` with its status."""
    try:
        return await answer(await ollama_body(request, model))
    except ServingError as exc:
        err = from_serving(exc)
        return ollama_error(err.status, err.message, err.headers)
    except ApiError as exc:
        return ollama_error(exc.status, exc.message, exc.headers)


# Ollama's routes stay out of the OpenAPI document until it has an Ollama error family:
# it would describe their errors in KoboldAI's shape (every /api/* path is "kobold" there).
@router.post("/api/embed", response_model=None, include_in_schema=False)
async def ollama_embed(request: Request) -> JSONResponse:
    async def answer(body: OllamaEmbedBody) -> JSONResponse:
        t0 = time.monotonic()
        entry = registry_of(request).embedding_entry(body.model)
        was_loaded = entry.ready
        await use_model(request, entry.id, body.keep_alive)
        loaded = time.monotonic()

        def shape(service: Service, result: Embeddings) -> dict[str, Any]:
            return {
                "model": body.model or service.model_id,
                "embeddings": result.vectors,
                "total_duration": int((time.monotonic() - t0) * 1e9),
                "load_duration": 0 if was_loaded else int((loaded - t0) * 1e9),
                "prompt_eval_count": result.total_tokens,
            }

        return await embed_answer(
            request,
            body.model,
            as_inputs(body.input),
            shape,
            keep_alive=body.keep_alive,
            truncate=body.truncate,
        )

    return await ollama_route(request, OllamaEmbedBody, answer)


@router.post("/api/embeddings", response_model=None, include_in_schema=False)
async def ollama_embeddings_legacy(request: Request) -> JSONResponse:
    """Ollama's older route: one prompt, one vector, not normalised (as Ollama answers it)."""

    async def answer(body: OllamaLegacyBody) -> JSONResponse:
        if not body.prompt:
            return JSONResponse({"embedding": []})  # Ollama's answer to an empty prompt
        return await embed_answer(
            request,
            body.model,
            [body.prompt],
            lambda _service, result: {"embedding": result.vectors[0]},
            keep_alive=body.keep_alive,
            truncate=True,
            normalize=False,
        )

    return await ollama_route(request, OllamaLegacyBody, answer)
