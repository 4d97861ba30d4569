"""Embeddings: vectors for texts from a llama.cpp context created with embeddings on.

An embedding model (BERT, nomic, bge… a GGUF with `{arch}.pooling_type` or non-causal
attention) gets only this context. A chat model gets it beside its generation context, on the
same weights, created on the first embedding request: generation never waits for it and its KV
cache is never touched. Decoder models are pooled with "mean", as `llama-server --embeddings`
and Ollama do, unless `--pooling` says otherwise.

Several inputs go into one `llama_decode`, one sequence each; a new batch starts only when the
next input would overflow the context's tokens (n_batch) or sequences (n_seq_max).
"""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import llama_cpp as C
import numpy as np

from innkeeper.engine.backend import Batch, Context, Model
from innkeeper.engine.llama_params import BackendError, ContextParams

# --pooling names -> llama.cpp's enum llama_pooling_type
POOLING_TYPES: dict[str, int] = {
    "none": C.LLAMA_POOLING_TYPE_NONE,
    "mean": C.LLAMA_POOLING_TYPE_MEAN,
    "cls": C.LLAMA_POOLING_TYPE_CLS,
    "last": C.LLAMA_POOLING_TYPE_LAST,
    "rank": C.LLAMA_POOLING_TYPE_RANK,
}
POOLING_NAMES = {v: k for k, v in POOLING_TYPES.items()}
# Architectures that are encoders whatever their metadata says (llama.cpp builds them with
# non-causal attention and no KV cache).
ENCODER_ARCHS = frozenset(
    {
        "bert",
        "nomic-bert",
        "nomic-bert-moe",
        "jina-bert-v2",
        "jina-bert-v3",
        "modern-bert",
        "neo-bert",
        "eurobert",
        "gemma-embedding",
        "t5encoder",
    }
)
log = logging.getLogger("innkeeper.engine")
EMBED_SEQS = 64  # sequences per decode: enough for SillyTavern's batches of chunks


class EmbeddingError(ValueError):
    """An input the embedding context cannot take (empty, or longer than the context)."""


class InputTooLong(EmbeddingError):
    """An input has more tokens than the embedding context holds (and was not truncated)."""

    def __init__(self, index: int, n_tokens: int, limit: int) -> None:
        super().__init__(
            f"input {index} has {n_tokens} tokens but the embedding context holds {limit}: "
            "shorten it (or ask for truncation)"
        )
        self.index, self.n_tokens, self.limit = index, n_tokens, limit


class EmbeddingCancelled(Exception):
    """The caller gave up (its client hung up) between two decodes."""


def model_kind(meta: Callable[[str], object | None]) -> str:
    """The kind of a model, "chat", "embedding" or "rerank", from its metadata (`meta(key)`:
    the value or None).

    One rule for the catalog (which reads the GGUF header) and the engine (which asks
    llama.cpp): an encoder architecture, a `{arch}.pooling_type` (rank: a reranker), or
    non-causal attention. Only "chat" models generate.
    """
    arch = str(meta("general.architecture") or "")
    pooling = meta(f"{arch}.pooling_type")
    if pooling is not None and str(pooling) == str(C.LLAMA_POOLING_TYPE_RANK):
        return "rerank"
    if arch in ENCODER_ARCHS or pooling is not None:
        return "embedding"
    causal = meta(f"{arch}.attention.causal")
    return "embedding" if causal is not None and str(causal).lower() in ("0", "false") else "chat"


def pooling_for(model: Model, setting: str | None) -> int:
    """The pooling a context for `model` uses: `--pooling`, else the model's own, else mean
    (a decoder has none of its own; mean is what llama-server and Ollama use for it)."""
    if setting:
        return POOLING_TYPES[setting]
    own = model.meta(f"{model.info.architecture}.pooling_type")
    if own is not None and own.lstrip("-").isdigit() and int(own) in POOLING_NAMES:
        return int(own)
    return C.LLAMA_POOLING_TYPE_MEAN


def rerank_prompt(model: Model, query: str, document: str) -> list[int]:
    """One (query, document) pair as llama-server's reranking feeds it: the model's "rerank"
    chat template if it has one, else [BOS] query [EOS] [SEP] document [EOS] with each special
    token where the vocabulary asks for it (EOS falls back to SEP)."""
    template = C.llama_model_chat_template(model.ptr, b"rerank")
    if template:
        text = template.decode("utf-8", "replace")
        text = text.replace("{query}", query).replace("{document}", document)
        return model.tokenize(text, add_special=False, parse_special=True)
    vocab = model.vocab
    eos = int(C.llama_vocab_eos(vocab))
    sep = int(C.llama_vocab_sep(vocab))
    if eos == C.LLAMA_TOKEN_NULL:
        eos = sep
    add_eos = bool(C.llama_vocab_get_add_eos(vocab))
    out = [model.bos] if model.add_bos else []
    out += model.tokenize(query, add_special=False, parse_special=False)
    out += [eos] if add_eos else []
    out += [sep] if C.llama_vocab_get_add_sep(vocab) else []
    out += model.tokenize(document, add_special=False, parse_special=False)
    out += [eos] if add_eos else []
    return out


@dataclass(frozen=True)
class Embeddings:
    """The vectors of one call: one per input (pooled), or one per token (pooling none)."""

    vectors: list[list[float]] | list[list[list[float]]]
    n_tokens: list[int]  # tokens each input was embedded with (after truncation)
    pooling: str

    @property
    def total_tokens(self) -> int:
        return sum(self.n_tokens)


class Embedder:
    """An embeddings context on a loaded model; `embed` may be called from any thread.

    llama.cpp forbids two decodes on one context at once, so calls hold a lock; a second
    caller waits for the first batch to finish (a context for each caller would multiply
    the compute buffers).
    """

    def __init__(self, model: Model, params: ContextParams, pooling: str | None = None) -> None:
        self.model = model
        self.pooling_type = pooling_for(model, pooling)
        # A non-causal model must see each sequence within one ubatch, so ubatch = batch =
        # context: every input up to the context's size fits, and one decode takes many.
        n = params.n_ctx
        ctx_params = replace(params, n_batch=n, n_ubatch=n, n_seq=max(1, params.n_seq))
        self.ctx = Context(model, ctx_params, embeddings=True, pooling_type=self.pooling_type)
        self.pooling_type = int(C.llama_pooling_type(self.ctx.ptr))  # what llama.cpp runs
        self.n_ctx = self.ctx.n_ctx
        self.n_batch = int(C.llama_n_batch(self.ctx.ptr))
        self.n_seq = int(C.llama_n_seq_max(self.ctx.ptr))
        self.n_embd = int(C.llama_model_n_embd_out(model.ptr))
        if self.pooling_type == C.LLAMA_POOLING_TYPE_RANK:
            self.n_embd = max(1, int(C.llama_model_n_cls_out(model.ptr)))
        self.limit = min(self.n_ctx, self.n_batch)  # tokens one input may have
        self._batch = Batch(self.n_batch)
        self._lock = threading.Lock()
        self.decodes = 0  # llama_decode calls made (tests count batching with it)

    @property
    def pooling(self) -> str:
        return POOLING_NAMES.get(self.pooling_type, "mean")

    def prepare(self, inputs: list[list[int]], truncate: bool) -> list[list[int]]:
        """Check (or cut) every input before anything is decoded."""
        out = []
        for i, tokens in enumerate(inputs):
            if not tokens:
                raise EmbeddingError(f"input {i} is empty")
            if len(tokens) > self.limit:
                if not truncate:
                    raise InputTooLong(i, len(tokens), self.limit)
                tokens = tokens[: self.limit]
            bad = next((t for t in tokens if not self.model.valid_token(t)), None)
            if bad is not None:
                raise EmbeddingError(f"input {i}: token id {bad} is outside the vocabulary")
            out.append(tokens)
        return out

    def embed(
        self,
        inputs: list[list[int]],
        *,
        normalize: bool = True,
        truncate: bool = False,
        cancel: threading.Event | None = None,
    ) -> Embeddings:
        """Embed token lists, as few decodes as the context allows; L2-normalised unless
        `normalize` is False (per-token vectors, pooling none, are never normalised, as in
        llama-server)."""
        inputs = self.prepare(inputs, truncate)
        out: list[object] = [None] * len(inputs)
        with self._lock:
            t0, decodes = time.monotonic(), self.decodes
            group: list[int] = []
            used = 0
            for i, tokens in enumerate(inputs):
                if group and (used + len(tokens) > self.n_batch or len(group) >= self.n_seq):
                    self._decode(inputs, group, out, normalize, cancel)
                    group, used = [], 0
                group.append(i)
                used += len(tokens)
            self._decode(inputs, group, out, normalize, cancel)
            n_tokens = [len(t) for t in inputs]
            log.info(
                "embedded %d inputs (%d tokens) in %d decodes, %.0f ms",
                len(inputs),
                sum(n_tokens),
                self.decodes - decodes,
                (time.monotonic() - t0) * 1000,
            )
        return Embeddings(
            vectors=out,  # type: ignore[arg-type]
            n_tokens=n_tokens,
            pooling=self.pooling,
        )

    def _decode(
        self,
        inputs: list[list[int]],
        group: list[int],
        out: list[object],
        normalize: bool,
        cancel: threading.Event | None,
    ) -> None:
        """One decode over `group` (indices into `inputs`), results into `out`."""
        if cancel is not None and cancel.is_set():
            raise EmbeddingCancelled("the client went away")
        batch = self._batch
        batch.clear()
        starts = []
        for seq, i in enumerate(group):
            starts.append(batch.n)
            for pos, tok in enumerate(inputs[i]):
                batch.add(tok, pos, seq, True)  # embeddings mode outputs every token
        self.ctx.clear()  # a decoder's KV cache: each batch starts from nothing
        rc = self.ctx.decode(batch)
        self.decodes += 1
        if rc != 0:
            raise BackendError(f"llama_decode failed for embeddings (code {rc})")
        n = self.n_embd
        ptr_type = ctypes.POINTER(ctypes.c_float * n)
        for seq, i in enumerate(group):
            if self.pooling_type == C.LLAMA_POOLING_TYPE_NONE:
                rows = [
                    _copy(C.llama_get_embeddings_ith(self.ctx.ptr, starts[seq] + k), ptr_type)
                    for k in range(len(inputs[i]))
                ]
                out[i] = [r.tolist() for r in rows]
                continue
            vec = _copy(C.llama_get_embeddings_seq(self.ctx.ptr, seq), ptr_type)
            if normalize and self.pooling_type != C.LLAMA_POOLING_TYPE_RANK:
                norm = float(np.linalg.norm(vec))
                if norm > 0:
                    vec = vec / norm
            out[i] = vec.tolist()

    def close(self) -> None:
        with self._lock:
            self._batch.free()
            self.ctx.close()


def _copy(ptr: object, ptr_type: type) -> np.ndarray:
    if not ptr:
        raise BackendError("llama.cpp returned no embeddings (is the pooling right?)")
    arr = ctypes.cast(ptr, ptr_type).contents
    return np.ctypeslib.as_array(arr).astype(np.float64)
