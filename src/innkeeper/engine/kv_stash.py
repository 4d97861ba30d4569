"""KV state kept in host memory within --cache-ram: parked conversations and checkpoints.

With one cache shared by all slots, every decode step attends over every occupied cell, so
idle conversations left in the cache slow the active ones. They are parked in RAM instead
(llama-server's --cache-ram) and restored in milliseconds when they come back.

Models whose memory forgets (sliding-window layers with swa_full off, recurrent state) keep
only the last window of each sequence, so a prompt that diverges earlier cannot continue
from the cache alone. As llama-server does, each slot keeps a few context checkpoints (the
partial state, `LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY`) saved near the end of each prompt and
after each reply; reuse restores the newest one at or before the shared prefix.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from innkeeper.engine.backend import Context
from innkeeper.engine.slots import IDLE, Slot, common_prefix

log = logging.getLogger("innkeeper.engine")


@dataclass
class Checkpoint:
    """A slot's partial state (sliding-window cells / recurrent state) after `n_tokens` tokens.

    Restored over the full-attention cells, which still hold every position, it lets the
    sequence continue from `n_tokens` although the window has moved on since.
    """

    n_tokens: int
    pos_min: int
    data: object
    size: int


@dataclass
class Parked:
    """A conversation's whole KV state, moved to host memory while other slots decode."""

    tokens: list[int]
    data: object
    size: int
    last_used: float
    checkpoints: list[Checkpoint] = field(default_factory=list)

    @property
    def ram(self) -> int:
        return self.size + sum(c.size for c in self.checkpoints)


class KVStash:
    """The parked conversations and every slot's checkpoints, within `cache_ram` bytes."""

    def __init__(self, ctx: Context, slots: list[Slot], cache_ram: int, n_checkpoints: int) -> None:
        self.ctx = ctx
        self.slots = slots
        self.cache_ram = cache_ram
        # Checkpoints only where the memory forgets: a full-size cache reuses without them.
        self.n_checkpoints = n_checkpoints if ctx.partial_memory else 0
        self.parked: list[Parked] = []  # least recently used first

    # ---- parking ---------------------------------------------------------------------------
    def park_idle(self) -> None:
        """Move idle slots' caches to RAM (called while other slots are decoding)."""
        for slot in self.slots:
            if slot.state is IDLE and slot.cache:
                self.park(slot)

    def park(self, slot: Slot) -> None:
        """Move the slot's conversation to RAM, however short: a chat of a few tokens costs
        little to keep, and its next turn then reuses it like any other."""
        tokens = list(slot.cache)
        checkpoints = list(slot.checkpoints)
        saved = self.ctx.seq_save(slot.id)
        slot.forget(self.ctx)
        if saved is None or saved[1] > self.cache_ram:
            return
        data, size = saved
        # A state that extends an older parked one replaces it.
        self.parked = [p for p in self.parked if common_prefix(p.tokens, tokens) < len(p.tokens)]
        self.parked.append(Parked(tokens, data, size, slot.last_used, checkpoints))
        self.parked.sort(key=lambda p: p.last_used)
        self.fit_ram()
        log.info(
            "slot %d: parked %d cached tokens in RAM (%.1f MiB, %d checkpoints)",
            slot.id,
            len(tokens),
            size / 2**20,
            len(checkpoints),
        )

    def best(self, prompt: list[int]) -> tuple[Parked | None, int]:
        """The parked conversation sharing the longest prefix with `prompt`, and its length."""
        parked = max(self.parked, key=lambda p: common_prefix(p.tokens, prompt), default=None)
        return parked, common_prefix(parked.tokens, prompt) if parked else 0

    def restore(self, slot: Slot, parked: Parked) -> None:
        """Bring a parked conversation back into `slot` (whose own cache is parked first)."""
        # Out of the list first: parking the slot's own cache may evict to fit --cache-ram.
        self.parked.remove(parked)
        if slot.cache:
            self.park(slot)
        slot.forget(self.ctx)
        if self.ctx.seq_restore(slot.id, parked.data, parked.size):  # type: ignore[arg-type]
            slot.cache[:] = parked.tokens
            slot.checkpoints[:] = parked.checkpoints
            log.info("slot %d: restored %d cached tokens from RAM", slot.id, len(parked.tokens))
        else:
            log.warning(
                "slot %d: no room to restore %d parked tokens: they are evaluated again",
                slot.id,
                len(parked.tokens),
            )
            slot.forget(self.ctx)

    # ---- the --cache-ram budget ------------------------------------------------------------
    def ram_used(self) -> int:
        """Host bytes held for --cache-ram: parked states and every slot's checkpoints."""
        live = sum(c.size for s in self.slots for c in s.checkpoints)
        return live + sum(p.ram for p in self.parked)

    def fit_ram(self) -> None:
        """Keep parked states and checkpoints within --cache-ram: the least recently used
        parked conversation goes first, then the oldest checkpoint of any slot."""
        while self.ram_used() > self.cache_ram:
            if self.parked:
                self.parked.pop(0)
                continue
            slot = max(
                (s for s in self.slots if s.checkpoints), key=lambda s: s.checkpoints[0].size
            )
            slot.checkpoints.pop(0)

    # ---- checkpoints -----------------------------------------------------------------------
    def save_checkpoint(self, slot: Slot) -> None:
        """Save the slot's partial state at its current length (llama-server's checkpoints)."""
        n = len(slot.cache)
        if n == 0 or (slot.checkpoints and slot.checkpoints[-1].n_tokens >= n):
            return
        pos_min = self.ctx.seq_pos_min(slot.id)
        if pos_min < 0:
            return
        saved = self.ctx.seq_save(slot.id, partial=True)
        if saved is None or saved[1] > self.cache_ram:
            return
        if self.ctx.n_swa:
            # llama.cpp saves only the cells the window still sees: that is what comes back.
            pos_min = max(pos_min, n - self.ctx.n_swa)
        while len(slot.checkpoints) >= self.n_checkpoints:
            slot.checkpoints.pop(0)
        slot.checkpoints.append(Checkpoint(n, pos_min, saved[0], saved[1]))
        self.fit_ram()
        log.debug(
            "slot %d: checkpoint at %d tokens (pos_min %d, %.1f MiB, %d kept)",
            slot.id,
            n,
            pos_min,
            saved[1] / 2**20,
            len(slot.checkpoints),
        )

    def _holds_past(self, pos_min: int, n_past: int) -> bool:
        """Whether a memory whose oldest position is `pos_min` can continue after `n_past`
        tokens: sliding-window layers need the last window before it, recurrent state must
        stand exactly at it (its newest position is n_past - 1)."""
        if pos_min < 0:
            return n_past == 0
        if self.ctx.n_swa > 0:
            return pos_min <= max(0, n_past - self.ctx.n_swa)
        return pos_min < n_past

    def past_from_memory(self, slot: Slot, n_past: int, req_id: int) -> int:
        """How much of a shared prefix a forgetting memory can still continue from.

        The memory holds positions from `seq_pos_min` on. When the prefix needs older ones,
        the newest checkpoint at or before it is restored; without one, evaluate afresh.
        """
        if self._holds_past(self.ctx.seq_pos_min(slot.id), n_past):
            return n_past
        for ck in reversed(slot.checkpoints):
            if ck.n_tokens > n_past or not self._holds_past(ck.pos_min, ck.n_tokens):
                continue
            if self.ctx.seq_restore(slot.id, ck.data, ck.size, partial=True):  # type: ignore[arg-type]
                log.info(
                    "request %d: restored the checkpoint at %d tokens on slot %d "
                    "(the window had moved past the %d shared tokens)",
                    req_id,
                    ck.n_tokens,
                    slot.id,
                    n_past,
                )
                return ck.n_tokens
            break
        log.warning(
            "request %d: slot %d no longer holds the positions before its %d shared tokens "
            "(sliding-window or recurrent memory) and no checkpoint fits: evaluating the "
            "whole prompt",
            req_id,
            slot.id,
            n_past,
        )
        slot.forget(self.ctx)
        return 0
