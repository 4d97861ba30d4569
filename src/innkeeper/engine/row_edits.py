"""Logit biases and repetition penalties applied to the logits row itself, in numpy.

llama.cpp's logit-bias and penalties samplers work on its candidate array, a copy of the whole
vocabulary, and its penalties sampler looks every candidate up in a hash map: with a
repetition penalty on, ~170 µs a token for SmolLM2's 49k tokens and ~1 ms for Gemma 3's 262k
on this CPU, the same in llama-server (24 of SillyTavern's 35 bundled presets set a penalty,
which applies once the user sets its range). The penalised
tokens are only those of the last `repeat_last_n`, so editing their logits in the row before
the chain runs costs a few µs, and the chain then starts from the same numbers its first two
samplers would have produced.

Same numbers: float32 throughout, the bias added first, then llama.cpp's penalty rule (a
logit <= 0 multiplied by the repeat penalty, else divided, then the presence penalty
subtracted). The frequency penalty is left to llama.cpp (the chain keeps both samplers then): its
`count * freq + present` may be fused into one rounding by the C++ compiler, which numpy
cannot promise to match bit for bit.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

import numpy as np


class RowEdits:
    """One request's biases and penalty history; `apply` edits a logits row in place."""

    __slots__ = ("_bias_tokens", "_bias_values", "_counts", "_history", "_present", "_repeat")

    def __init__(self, bias: dict[int, float], repeat: float, present: float, last_n: int) -> None:
        self._bias_tokens = np.fromiter(bias, dtype=np.int64, count=len(bias)) if bias else None
        self._bias_values = np.asarray(list(bias.values()), dtype=np.float32)
        penalised = last_n > 0 and (repeat != 1 or present != 0)
        self._repeat = np.float32(repeat)
        self._present = np.float32(present)
        # The last `last_n` tokens and how often each occurs in them (llama.cpp's ring buffer
        # and token_count): only kept when a penalty applies.
        self._history: deque[int] | None = deque(maxlen=last_n) if penalised else None
        self._counts: dict[int, int] = {}

    def remember(self, token: int) -> None:
        """A token joins the penalty history (sampled, or a prompt token)."""
        history = self._history
        if history is None:
            return
        counts = self._counts
        if len(history) == history.maxlen:
            old = history[0]
            left = counts[old] - 1
            if left:
                counts[old] = left
            else:
                del counts[old]
        history.append(token)
        counts[token] = counts.get(token, 0) + 1

    def feed(self, tokens: Iterable[int]) -> None:
        for tok in tokens:
            if tok >= 0:  # negative: an image position (engine/vision.py), not a token
                self.remember(tok)

    def apply(self, row: np.ndarray) -> None:
        """Bias, then penalise, `row` (float32, the whole vocabulary) in place."""
        if self._bias_tokens is not None:
            with np.errstate(invalid="ignore"):  # -inf on a +inf logit: NaN, as in llama.cpp
                row[self._bias_tokens] += self._bias_values
        counts = self._counts
        if counts:
            toks = np.fromiter(counts, dtype=np.int64, count=len(counts))
            v = row[toks]
            v = np.where(v <= 0, v * self._repeat, v / self._repeat)
            if self._present:
                v -= self._present
            row[toks] = v
