"""The value types that cross the engine boundary: a request in, a stream of events out."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from innkeeper.engine.sampling import SamplingParams

if TYPE_CHECKING:
    from innkeeper.engine.vision import MediaPrompt

_ids = itertools.count(1)


@dataclass(frozen=True)
class TopLogprob:
    token: int
    text: str
    logprob: float


@dataclass(frozen=True)
class TokenLogprob:
    """The chosen token's log-probability and the most likely alternatives (pre-sampling)."""

    token: int
    text: str
    logprob: float
    top: tuple[TopLogprob, ...]


@dataclass(frozen=True)
class TokenEvent:
    """New text for the client. `text` may be empty while a possible stop string is held back."""

    text: str
    tokens: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Timings:
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    prompt_ms: float
    predicted_ms: float
    queued_ms: float

    @property
    def evaluated_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens

    @property
    def prompt_per_second(self) -> float:
        return self.evaluated_tokens / (self.prompt_ms / 1000) if self.prompt_ms > 0 else 0.0

    @property
    def predicted_per_second(self) -> float:
        done = max(self.completion_tokens - 1, 0)
        return done / (self.predicted_ms / 1000) if self.predicted_ms > 0 else 0.0


class ErrorKind(str, Enum):
    """Why a request ended with reason "error": the api layer maps each kind to a status.

    Set where the failure happens, so nobody has to guess the kind from the message text.
    """

    GRAMMAR = "grammar"  # the request's grammar was refused, or too costly to run
    CONTEXT_OVERFLOW = "context_overflow"  # the KV cache had no room for the request
    SAMPLING = "sampling"  # picking this request's next token failed
    TIMEOUT = "timeout"  # the request's deadline (--request-timeout) passed
    WORKER_LOST = "worker_lost"  # an RPC worker the model runs on went away
    INTERNAL = "internal"  # anything else: a bug or a llama.cpp failure


class EngineLost(RuntimeError):
    """The engine can run no more (`Engine.wreck`: a lost RPC worker): what every wait on it
    ends with, so none waits on a thread that is stuck inside llama.cpp for good."""

    def __init__(self, message: str, kind: ErrorKind = ErrorKind.WORKER_LOST) -> None:
        super().__init__(message)
        self.message = message
        self.kind = kind


@dataclass(frozen=True)
class FinishEvent:
    """The last event of every request, whatever ended it."""

    reason: str  # "stop" (EOS or stop string), "length", "abort", "error"
    text: str  # the whole completion as delivered (without a matched stop string)
    timings: Timings
    seed: int
    stop_string: str | None = None
    error: str | None = None  # a message for the client when reason == "error"
    eos: bool = False
    error_kind: ErrorKind | None = None  # set whenever reason == "error"
    slot: int = -1  # the slot that ran it (-1: it never got one)


Event = TokenEvent | FinishEvent


@dataclass
class GenerationRequest:
    """Token ids in, events out through `on_event` (called on the engine thread)."""

    prompt: list[int]
    params: SamplingParams
    max_tokens: int
    on_event: Callable[[Event], None]
    stop: list[str] = field(default_factory=list)
    banned_strings: list[str] = field(default_factory=list)
    n_logprobs: int = 0
    min_tokens: int = 0
    slot: int = -1  # the slot it must run on (llama-server's id_slot); -1: any free one
    media: MediaPrompt | None = None  # images: `prompt` is its tokens (markers at images)
    id: int = field(default_factory=lambda: next(_ids))
    cancelled: bool = False

    def cancel(self) -> None:
        """Ask the engine to stop this request; it does so before its next decode step."""
        self.cancelled = True
