"""A slot: one KV-cache sequence, the tokens it holds, and the request using it, if any.

As in llama-server (its SLOT_STATE_*), a slot's state is one explicit field that changes
only through the methods below, so the loop reads it instead of inferring it from which of
several request fields happen to be set.
"""

from __future__ import annotations

from enum import Enum
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


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
