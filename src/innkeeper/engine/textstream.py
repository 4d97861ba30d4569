"""The text side of one generation: token pieces in, text safe to send out.

A model emits byte pieces that may split a UTF-8 character, and a stop string or banned
phrase may span several tokens. `TextStream` decodes the pieces incrementally, finds stop
strings (the reply ends before them; the caller reports which one matched, so an API that
keeps it, KoboldCpp without `trim_stop`, can add it back), holds back a tail that may still
become a stop string or banned phrase, and decides where to roll back when a banned phrase
appears (KoboldCpp's phrase-ban backtracking). It knows nothing of llama.cpp or threads:
generation.py feeds it token ids and pieces and acts on its answers (sampling again,
removing cache cells, sending events).
"""

from __future__ import annotations

import bisect
from codecs import utf_8_decode
from collections.abc import Sequence
from dataclasses import dataclass

# Rollbacks one request may make for banned phrases before it ends at the phrase instead.
MAX_BACKTRACKS = 64


@dataclass(frozen=True)
class Rollback:
    """Take back the generated tokens from `index` on and ban `token` at that index."""

    index: int
    token: int


def fold_case(text: str) -> str:
    """Lower-case, one character for one, so positions in the result are positions in `text`.

    `str.lower()` can lengthen a string ("İ" becomes "i" + a combining dot), which would shift
    every later match and roll back the wrong token; such characters are kept as they are.
    """
    low = text.lower()
    if len(low) == len(text):
        return low
    return "".join(c if len(lc := c.lower()) != 1 else lc for c in text)


class TextStream:
    """Decoded text, what of it was sent, and the stop/ban decisions for one request."""

    __slots__ = (
        "backtracks",
        "banned",
        "char_ends",
        "emitted",
        "hold",
        "stop",
        "text",
        "tokens",
        "undecoded",
    )

    def __init__(self, stop: Sequence[str] = (), banned: Sequence[str] = ()) -> None:
        self.stop = list(stop)
        self.banned = [fold_case(b) for b in banned]  # folded once: matched in any case
        self.undecoded = b""  # the start of a UTF-8 character split across tokens
        self.text = ""  # decoded so far (cut at a matched stop string)
        self.emitted = 0  # characters of `text` already handed out
        self.tokens: list[int] = []  # generated tokens, one per entry of `char_ends`
        self.char_ends: list[int] = []  # len(text) after each token
        self.backtracks = 0
        lengths = [len(s) for s in self.stop if s] + [len(b) for b in self.banned if b]
        self.hold = max(lengths, default=0)

    def push(self, token: int, piece: bytes) -> None:
        """Append a generated token and its bytes (possibly part of a UTF-8 character)."""
        self.tokens.append(token)
        # What codecs' incremental UTF-8 decoder does, without its Python-level wrapper.
        data = self.undecoded + piece
        text, used = utf_8_decode(data, "replace", False)
        self.undecoded = data[used:]
        self.text += text
        self.char_ends.append(len(self.text))

    def _take(self, end: int) -> str:
        out = self.text[self.emitted : end]
        self.emitted += len(out)
        return out

    def flush(self) -> str:
        """End decoding (an incomplete character becomes U+FFFD); returns all unsent text."""
        self.text += utf_8_decode(self.undecoded, "replace", True)[0]
        self.undecoded = b""
        return self._take(len(self.text))

    def find_stop(self) -> tuple[int, str] | None:
        """The earliest stop string in the unsent text: (where it starts, which), or None."""
        start = max(0, self.emitted)
        best: tuple[int, str | None] = (len(self.text), None)
        for s in self.stop:
            if not s:
                continue
            i = self.text.find(s, start)
            if i >= 0 and i < best[0]:
                best = (i, s)
        cut, which = best
        return None if which is None else (cut, which)

    def cut_at(self, cut: int) -> str:
        """End the text at `cut` (a stop string's start); returns the unsent text before it."""
        out = self._take(cut)
        self.text = self.text[:cut]
        return out

    def held(self) -> int:
        """How many trailing characters could still become a stop or banned string."""
        tail = self.text[-self.hold :] if self.hold else ""
        held = 0
        for s in self.stop:
            held = max(held, suffix_prefix(tail, s))
        if self.banned:
            low = fold_case(tail)
            for b in self.banned:
                held = max(held, suffix_prefix(low, b))
        return min(held, len(self.text) - self.emitted)

    def ready(self) -> str:
        """Take the text that can be sent now: all but a tail that may start a stop string or
        banned phrase. With banned phrases whole tokens are held, since a rollback must never
        take back text already sent."""
        if not self.hold:  # nothing to hold back: everything unsent (every token's case)
            out = self.text[self.emitted :]
            self.emitted = len(self.text)
            return out
        end = len(self.text) - self.held()
        if self.banned and end < len(self.text):
            i = bisect.bisect_right(self.char_ends, end)
            end = self.char_ends[i - 1] if i > 0 else 0
            end = max(end, self.emitted)
        return self._take(end)

    def banned_hit(self) -> int | None:
        """Where the earliest banned phrase starts in the unsent text (any case), or None."""
        low = fold_case(self.text)  # whole: lower() depends on context (final sigma)
        hit = -1
        for b in self.banned:
            if not b:
                continue
            i = low.find(b, self.emitted)
            if i >= 0 and (hit < 0 or i < hit):
                hit = i
        return hit if hit >= 0 else None

    def roll_back(self, hit: int) -> Rollback | None:
        """Take back the tokens from the first one whose text reaches past `hit`.

        Returns what to ban where; the caller samples that position again. After
        MAX_BACKTRACKS rollbacks it returns None instead and the text ends at `hit`: the
        caller flushes and ends the request.
        """
        if self.backtracks >= MAX_BACKTRACKS:
            self.text = self.text[:hit]
            return None
        self.backtracks += 1
        k = next(i for i, end in enumerate(self.char_ends) if end > hit)
        token = self.tokens[k]
        del self.tokens[k:]
        del self.char_ends[k:]
        self.text = self.text[: self.char_ends[-1]] if self.char_ends else ""
        self.undecoded = b""
        return Rollback(k, token)


def suffix_prefix(text: str, pattern: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `pattern`.

    Runs for every token while stop strings are set: only the places where `pattern`'s
    first character occurs in the tail are tried, not every length."""
    n = min(len(text), len(pattern) - 1)
    if n <= 0:
        return 0
    first = pattern[0]
    i = text.find(first, len(text) - n)
    while i >= 0:
        if pattern.startswith(text[i:]):
            return len(text) - i  # the earliest start is the longest suffix
        i = text.find(first, i + 1)
    return 0
