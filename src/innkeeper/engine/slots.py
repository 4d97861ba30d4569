"""A slot: one KV-cache sequence, the tokens it holds, and the request using it, if any.

As in llama-server (its SLOT_STATE_*), a slot's state is one explicit field that changes
only through the methods below, so the loop reads it instead of inferring it from which of
several request fields happen to be set.
"""

from __future__ import annotations

import time
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from innkeeper.engine.backend import Context
    from innkeeper.engine.generation import Generation
    from innkeeper.engine.kv_stash import Checkpoint


class SlotState(Enum):
    IDLE = "idle"  # no request; the cache may still hold the last conversation
    PROMPT = "prompt"  # a request's prompt is being evaluated, a chunk per step
    GENERATING = "generating"  # the prompt is in the cache; each step decodes one new token


# Module-level names: the loop compares states every step without an attribute lookup.
IDLE = SlotState.IDLE
PROMPT = SlotState.PROMPT
GENERATING = SlotState.GENERATING


class Slot:
    """One sequence of the shared KV cache; `cache` holds its tokens at positions 0..n-1."""

    __slots__ = ("cache", "checkpoints", "gen", "id", "last_used", "state")

    def __init__(self, seq: int) -> None:
        self.id = seq
        self.state = IDLE
        self.gen: Generation | None = None  # set exactly when state is not IDLE
        self.cache: list[int] = []
        self.checkpoints: list[Checkpoint] = []  # oldest first, n_tokens ascending
        self.last_used = 0.0

    # ---- the only state transitions --------------------------------------------------------
    def start(self, gen: Generation) -> None:
        """IDLE -> PROMPT: a request takes the slot (at least its last prompt token is left)."""
        assert self.state is IDLE, f"slot {self.id} is {self.state.value}"
        self.gen = gen
        self.state = PROMPT

    def prompt_done(self) -> None:
        """PROMPT -> GENERATING: the last prompt chunk is in this step's batch; from the next
        step on, each step decodes the token sampled in the one before."""
        self.state = GENERATING

    def release(self, now: float) -> None:
        """PROMPT/GENERATING -> IDLE: the request ended; the cache keeps its tokens."""
        self.gen = None
        self.state = IDLE
        self.last_used = now

    # ---- the cache -------------------------------------------------------------------------
    def forget(self, ctx: Context) -> None:
        """Drop the sequence: its cells, its tokens and its checkpoints."""
        ctx.seq_rm(self.id, -1, -1)
        self.cache.clear()
        self.checkpoints.clear()


class SlotBusy(Exception):
    """A slot file operation on a slot that is running a request."""


class SlotFileError(Exception):
    """llama.cpp could not write or read a slot file, or the file is not this model's."""


def save_file(slot: Slot, ctx: Context, path: Path) -> tuple[int, int]:
    """Write an idle slot's tokens and KV state to `path` (engine thread); returns
    (tokens, bytes). What the slot holds now is saved: a cache parked in RAM is not."""
    if slot.state is not IDLE:
        raise SlotBusy(f"slot {slot.id} is processing a request")
    tokens = list(slot.cache)
    written = ctx.seq_save_file(slot.id, path, tokens)
    if written <= 0:
        raise SlotFileError(f"llama.cpp could not write the state of slot {slot.id}")
    return len(tokens), written


def load_file(slot: Slot, ctx: Context, path: Path, n_vocab: int) -> tuple[int, int]:
    """Replace an idle slot's cache with a slot file's tokens and state (engine thread);
    returns (tokens, bytes). A file llama.cpp refuses leaves the slot empty."""
    if slot.state is not IDLE:
        raise SlotBusy(f"slot {slot.id} is processing a request")
    slot.forget(ctx)
    loaded = ctx.seq_load_file(slot.id, path, ctx.n_ctx)
    if loaded is None:
        slot.forget(ctx)
        raise SlotFileError(
            "llama.cpp refused the slot file: it is damaged, holds more tokens than the "
            "context, or was saved with another model or cache type"
        )
    tokens, read = loaded
    if any(not 0 <= t < n_vocab for t in tokens):
        slot.forget(ctx)
        raise SlotFileError("the slot file holds token ids outside this model's vocabulary")
    slot.cache[:] = tokens
    slot.last_used = time.monotonic()
    return len(tokens), read


def erase(slot: Slot, ctx: Context) -> int:
    """Drop an idle slot's cache (engine thread); returns the tokens it held."""
    if slot.state is not IDLE:
        raise SlotBusy(f"slot {slot.id} is processing a request")
    n = len(slot.cache)
    slot.forget(ctx)
    return n


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
