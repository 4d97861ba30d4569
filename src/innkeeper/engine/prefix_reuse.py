"""Prefix-cache reuse: which free slot a new prompt takes, and how much of its cache stays.

A new request goes to the free slot whose cache (or parked state, kv_stash.py) shares the
longest prefix with its prompt; only the rest is evaluated. When SillyTavern trims old
messages from the top of the prompt, the chunks that are still there are moved into place
with `seq_rm`/`seq_add` (what llama-server calls `--cache-reuse`) instead of being evaluated
again. This runs once per admitted request, never per token: it lives apart from the loop.
"""

from __future__ import annotations

import logging

from innkeeper.engine.backend import Context
from innkeeper.engine.kv_stash import KVStash
from innkeeper.engine.slots import Slot, common_prefix
from innkeeper.engine.vision import MediaPrompt

__all__ = ["SIMILARITY_THRESHOLD", "PrefixReuse"]

log = logging.getLogger("innkeeper.engine")

# A cached slot is reused for a new prompt when they share this fraction of the prompt
# (llama-server's --slot-prompt-similarity); otherwise the least recently used slot is taken
# so that other conversations keep their caches.
SIMILARITY_THRESHOLD = 0.1


class PrefixReuse:
    """Picks a slot for a prompt and trims its cache to what the prompt can keep (engine
    thread only: it touches the context and the slots)."""

    def __init__(self, ctx: Context, stash: KVStash, cache_reuse: int) -> None:
        self.ctx = ctx
        self.stash = stash
        self.cache_reuse = cache_reuse if ctx.can_shift else 0
        self.trim_needs_shift = cache_reuse > 0 and not ctx.can_shift
        if self.trim_needs_shift:
            log.info(
                "this model's cache cannot be shifted (sliding-window or recurrent layers): "
                "a prompt trimmed at the top is evaluated again after the common prefix "
                "(--swa-full allows shifting, at the cost of a full-size cache)"
            )

    def choose_slot(self, free: list[Slot], prompt: list[int]) -> Slot:
        """The free slot whose cache (live, or parked in RAM) shares most with the prompt."""
        best = max(free, key=lambda s: common_prefix(s.cache, prompt))
        shared = common_prefix(best.cache, prompt)
        parked, parked_shared = self.stash.best(prompt)
        threshold = SIMILARITY_THRESHOLD * len(prompt)
        if parked is not None and parked_shared > shared and parked_shared >= threshold:
            slot = min(free, key=_emptiest_first)
            self.stash.restore(slot, parked)
            return slot
        if shared > 0 and shared >= threshold:
            return best
        # No useful prefix: take an empty slot, else the least recently used one.
        return min(free, key=_emptiest_first)

    def reuse(
        self, slot: Slot, prompt: list[int], req_id: int = 0, media: MediaPrompt | None = None
    ) -> int:
        """Keep what the slot's cache can give this prompt; returns tokens kept."""
        cache = slot.cache
        n_past = common_prefix(cache, prompt)
        if self.cache_reuse and n_past < len(cache) and n_past < len(prompt):
            n_past = self._reuse_chunks(slot, prompt, n_past)
        elif self.trim_needs_shift and _moved_later(cache, prompt, n_past):
            log.info(
                "request %d: the prompt leaves the cache after %d tokens and this model's "
                "cache cannot be shifted: the other %d tokens are evaluated",
                req_id,
                n_past,
                len(prompt) - n_past,
            )
        if n_past >= len(prompt):
            n_past = len(prompt) - 1  # the last prompt token must be evaluated for its logits
        if self.ctx.partial_memory and n_past > 0:
            n_past = self.stash.past_from_memory(slot, n_past, req_id)
        if media is not None:
            n_past = media.image_start(n_past)  # an image is decoded whole, never in part
        # Checkpoints past the kept prefix describe another continuation.
        slot.checkpoints[:] = [c for c in slot.checkpoints if c.n_tokens <= n_past]
        if not self.ctx.seq_rm(slot.id, n_past, -1):
            log.warning(
                "request %d: the cache cannot drop its tail after %d tokens: "
                "evaluating the whole prompt",
                req_id,
                n_past,
            )
            slot.forget(self.ctx)
            n_past = 0
        del slot.cache[n_past:]
        return n_past

    def _reuse_chunks(self, slot: Slot, prompt: list[int], n_past: int) -> int:
        """Shift cached chunks that reappear later in the prompt into their new positions.

        After a top-trim, the prompt is the kept head, then messages the cache also holds
        but further right. Walk both: skip cache tokens that the prompt dropped, and move
        every run of at least `cache_reuse` matching tokens left with `seq_add`.
        """
        cache = slot.cache
        kept = cache[:n_past]
        head_c = head_p = n_past
        moved = 0
        while head_c < len(cache) and head_p < len(prompt):
            n = 0
            while (
                head_c + n < len(cache)
                and head_p + n < len(prompt)
                and cache[head_c + n] == prompt[head_p + n]
            ):
                n += 1
            if n >= self.cache_reuse:
                shift = head_p - head_c
                self.ctx.seq_rm(slot.id, head_p, head_c)
                self.ctx.seq_add(slot.id, head_c, head_c + n, shift)
                kept.extend(cache[head_c : head_c + n])
                head_c += n
                head_p += n
                moved += n
            else:
                head_c += 1
        if moved:
            log.info("slot %d: shifted %d cached tokens after a prompt trim", slot.id, moved)
        slot.cache[:] = kept[:head_p]
        return head_p


def _emptiest_first(slot: Slot) -> tuple[bool, float]:
    """Order for a slot to give away: empty ones first, then the least recently used."""
    return (len(slot.cache) > 0, slot.last_used)


def _moved_later(cache: list[int], prompt: list[int], n_past: int, probe: int = 32) -> bool:
    """Whether cached tokens after the common prefix reappear further on in the prompt (a
    top-trim), which only shifting the cache could reuse."""
    start = n_past + max(0, (len(cache) - n_past - probe) // 2)
    chunk = cache[start : start + probe]
    if len(chunk) < probe:
        return False
    needle = "," + ",".join(map(str, chunk)) + ","
    return needle in "," + ",".join(map(str, prompt[n_past:])) + ","
