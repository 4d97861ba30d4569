"""SamplingParams -> a llama.cpp sampler chain, built once per request and run in C.

Every sampler SillyTavern sends is wired to llama.cpp's own implementation. llama.cpp has
no top-a, tail-free sampling (removed upstream in 2024), smoothing (quadratic) sampling or
rep-pen slope; those fields are accepted for compatibility and reported as unsupported by
`SamplingParams.unsupported()`, never silently treated as applied.
"""

from __future__ import annotations

import ctypes
import math
import random
from dataclasses import dataclass, field
from typing import Any

import llama_cpp as C
import numpy as np

from innkeeper.engine.backend import Model
from innkeeper.engine.grammar_limits import GrammarError, check_limits
from innkeeper.engine.logits import logits_view, sample_candidates
from innkeeper.engine.row_edits import RowEdits

# Canonical sampler names, in llama-server's default order (penalties first, temperature last).
DEFAULT_ORDER: tuple[str, ...] = (
    "penalties",
    "dry",
    "top_n_sigma",
    "top_k",
    "typical_p",
    "top_p",
    "min_p",
    "xtc",
    "temperature",
)

# KoboldCpp's `sampler_order` ids (expose.h): 0 top-k, 1 top-a, 2 top-p, 3 TFS, 4 typical,
# 5 temperature, 6 repetition penalty.
KOBOLD_SAMPLER_IDS: dict[int, str] = {
    0: "top_k",
    1: "top_a",
    2: "top_p",
    3: "tfs",
    4: "typical_p",
    5: "temperature",
    6: "penalties",
}

# text-generation-webui's `sampler_priority` names -> ours.
TGW_SAMPLER_NAMES: dict[str, str] = {
    "temperature": "temperature",
    "dynamic_temperature": "temperature",
    "top_k": "top_k",
    "top_p": "top_p",
    "typical_p": "typical_p",
    "min_p": "min_p",
    "xtc": "xtc",
    "dry": "dry",
    "top_n_sigma": "top_n_sigma",
    "repetition_penalty": "penalties",
    "presence_penalty": "penalties",
    "frequency_penalty": "penalties",
    "tfs": "tfs",
    "top_a": "top_a",
}


@dataclass
class SamplingParams:
    """One normalised set of samplers and stop rules, whatever alias spelled them."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    typical_p: float = 1.0
    top_n_sigma: float = -1.0
    top_a: float = 0.0
    tfs: float = 1.0
    smoothing_factor: float = 0.0
    dynatemp_range: float = 0.0
    dynatemp_exponent: float = 1.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    rep_pen_slope: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    mirostat: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = -1
    dry_sequence_breakers: list[str] = field(default_factory=lambda: ["\n", ":", '"', "*"])
    xtc_threshold: float = 0.1
    xtc_probability: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    banned_tokens: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    grammar: str | None = None
    seed: int = -1
    order: list[str] | None = None

    def unsupported(self) -> list[str]:
        """Samplers asked for that llama.cpp cannot apply (reported to the user)."""
        out = []
        if self.top_a > 0:
            out.append("top_a")
        if 0 < self.tfs < 1:
            out.append("tfs")
        if self.smoothing_factor > 0:
            out.append("smoothing_factor")
        if self.rep_pen_slope not in (0, 1) and self.repeat_penalty != 1:
            out.append("rep_pen_slope")
        return out

    def resolved_seed(self) -> int:
        """A concrete seed: -1 means a fresh random one (reported back to the client)."""
        if self.seed is None or self.seed < 0:
            return random.randrange(0, 2**31 - 1)
        return self.seed & 0xFFFFFFFF

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0 and self.mirostat == 0


# From this many tokens on, numpy's arg-max and min-p pass beat llama.cpp's candidate array
# without a penalty to pay for touching the row (see SamplerChain._plan_shortcuts).
LARGE_VOCAB = 100_000

# What a ban adds to a logit when a grammar is active: finite on purpose. A grammar may allow
# nothing but banned tokens (its only way on is EOS while ignore_eos bans it, or a banned
# token); with -inf every candidate would be -inf, llama.cpp would pick one the grammar
# rejects, and its grammar accept throws a C++ exception through ctypes, which aborts the
# whole server. With a finite ban such a dead end picks the grammar's own token instead;
# anywhere else exp(-1e30) is 0. Without a grammar bans stay -inf (top-n-sigma skips -inf
# logits in its statistics; a finite ban would skew them).
BANNED_LOGIT = -1e30


def ban_value(params: SamplingParams) -> float:
    """The logit of a banned token for a request with these parameters."""
    return BANNED_LOGIT if params.grammar else -math.inf


def check_grammar(model: Model, grammar: str) -> None:
    """Bound and parse a GBNF grammar now (any thread: it only needs the vocabulary).

    Done before a request is queued (off the event loop) so a bad or too costly grammar is
    a 400, not an error event in the middle of an already-started stream. The limits are
    checked first: llama.cpp's own parser is what a hostile grammar would crash.
    """
    check_limits(grammar, model.n_vocab)
    smpl = C.llama_sampler_init_grammar(model.vocab, grammar.encode(), b"root")
    if not smpl:
        raise GrammarError("the GBNF grammar could not be parsed (llama.cpp rejected it)")
    C.llama_sampler_free(smpl)


class SamplerChain:
    """A llama.cpp sampler chain for one request.

    The chain runs in C: `sample` reads the logits row, applies every sampler and the final
    pick, and accepts the token into stateful samplers (penalties, DRY, grammar, mirostat).
    Prompt tokens feed only the penalty and DRY history, never the grammar.

    Where that picks the same tokens and pays (`_plan_shortcuts`), numpy does part of the
    chain's work on the logits row: the logit biases and repetition/presence penalties edit
    the row before the chain runs (engine/row_edits.py: a few µs against ~0.1-1 ms a token for
    llama.cpp's penalties sampler, which looks every token of the vocabulary up in a hash
    map); greedy decoding takes the edited row's arg-max (the first of equal maxima, as
    llama.cpp's greedy sampler); and a chain whose first sampler is min-p gets only the
    tokens min-p can keep instead of a copy of the whole vocabulary. A row with a NaN goes
    to the chain. `shortcuts=False` builds the plain llama.cpp chain (the tests' reference);
    `SHORTCUTS` is the default (bench.overhead --compare-shortcuts flips it).
    """

    SHORTCUTS = True

    def __init__(
        self,
        model: Model,
        params: SamplingParams,
        seed: int,
        n_ctx: int,
        *,
        shortcuts: bool | None = None,
    ) -> None:
        self.model = model
        self.params = params
        self.seed = seed
        self.n_ctx = n_ctx
        self._keep: list[object] = []  # ctypes buffers llama.cpp may still point into
        self.history_samplers: list[int] = []  # chain indexes fed with prompt tokens
        self._shortcuts = self.SHORTCUTS if shortcuts is None else shortcuts
        self.edits: RowEdits | None = None  # biases and penalties done on the row (see class)
        self.argmax = False  # the pick is the edited row's arg-max (see the class)
        self._log_min_p = 0.0  # < 0: min-p is the chain's first sampler (see the class)
        self.ptr = self._build()

    def _add(self, chain: ctypes.c_void_p, smpl: ctypes.c_void_p, history: bool = False) -> None:
        if history:
            self.history_samplers.append(C.llama_sampler_chain_n(chain))
        C.llama_sampler_chain_add(chain, smpl)

    def _last_n(self, n: int) -> int:
        return self.n_ctx if n < 0 else n

    def _build(self) -> ctypes.c_void_p:
        p = self.params
        model = self.model
        chain = C.llama_sampler_chain_init(C.llama_sampler_chain_default_params())

        bias = dict(p.logit_bias)
        ban = ban_value(p)
        if p.grammar:  # a client's "never" (-inf bias, `false`) becomes the grammar-safe ban
            bias = {tok: max(b, ban) for tok, b in bias.items()}
        for tok in p.banned_tokens:
            bias[tok] = ban
        if p.ignore_eos:
            for tok in model.eog_tokens:
                bias[tok] = ban
        # Samplers named in the request's order first; the rest keep the default order
        # (temperature stays last unless the request placed it).
        order = [n for n in (p.order or DEFAULT_ORDER) if n in DEFAULT_ORDER]
        order += [n for n in DEFAULT_ORDER if n not in order]
        order = list(dict.fromkeys(order))
        if self._shortcuts and not p.grammar and p.mirostat not in (1, 2):
            bias = self._plan_shortcuts(order, bias)
        if bias:
            arr = (C.llama_logit_bias * len(bias))()
            for i, (tok, b) in enumerate(bias.items()):
                arr[i].token = tok
                arr[i].bias = b
            self._keep.append(arr)
            self._add(chain, C.llama_sampler_init_logit_bias(model.n_vocab, len(bias), arr))

        if p.grammar:
            try:
                check_limits(p.grammar, model.n_vocab)  # cached: free after check_grammar
            except GrammarError:
                C.llama_sampler_free(chain)
                raise
            grammar = C.llama_sampler_init_grammar(model.vocab, p.grammar.encode(), b"root")
            if not grammar:
                C.llama_sampler_free(chain)
                raise GrammarError("the GBNF grammar could not be parsed (llama.cpp rejected it)")
            self._add(chain, grammar)

        if p.mirostat in (1, 2):
            self._add_penalties(chain)
            self._add_dry(chain)
            self._add(chain, C.llama_sampler_init_temp(max(p.temperature, 0.0)))
            if p.mirostat == 1:
                miro = C.llama_sampler_init_mirostat(
                    model.n_vocab, self.seed, p.mirostat_tau, p.mirostat_eta, 100
                )
            else:
                miro = C.llama_sampler_init_mirostat_v2(self.seed, p.mirostat_tau, p.mirostat_eta)
            self._add(chain, miro)
            return chain

        for name in order:
            self._add_named(chain, name)
        if p.greedy:
            self._add(chain, C.llama_sampler_init_greedy())
        else:
            self._add(chain, C.llama_sampler_init_dist(self.seed))
        return chain

    def _plan_shortcuts(self, order: list[str], bias: dict[int, float]) -> dict[int, float]:
        """Decide what the row edits and numpy do instead of the chain (see the class); the
        biases the chain itself still applies. Measured in place (bench.overhead
        --compare-shortcuts): penalties done on the row always pay; with no penalty, numpy's
        arg-max and min-p pass only pay for large vocabularies (~-170 and ~-200 µs a token
        for Gemma 3's 262k here, +5 and +60 for SmolLM2's 49k), and a bias alone is cheaper
        in C."""
        p = self.params
        active = [name for name in order if self._active(name)]
        penalised = "penalties" in active
        if p.frequency_penalty != 0 or (penalised and active[0] != "penalties"):
            return bias  # see row_edits.py; a truncation before the penalties
        rest = [name for name in active if name != "penalties"]
        argmax = p.greedy and not rest  # DRY, the only other sampler greedy keeps, decides
        min_p_first = not p.greedy and rest[:1] == ["min_p"]
        large = self.model.n_vocab >= LARGE_VOCAB
        if not (penalised or (large and (argmax or min_p_first))):
            return bias
        last_n = self._last_n(p.repeat_last_n)
        self.edits = RowEdits(bias, p.repeat_penalty, p.presence_penalty, last_n)
        self.argmax = argmax
        if min_p_first:
            self._log_min_p = math.log(p.min_p)
        order.remove("penalties")
        return {}

    def _active(self, name: str) -> bool:
        """Whether the sampler `name` is in the chain for these parameters."""
        p = self.params
        if name == "penalties":
            return self._penalised()
        if name == "dry":
            return p.dry_multiplier > 0
        if p.greedy:
            return False  # truncation samplers cannot change the arg-max
        return {
            "top_n_sigma": p.top_n_sigma > 0,
            "top_k": p.top_k > 0,
            "typical_p": 0 < p.typical_p < 1,
            "top_p": 0 < p.top_p < 1,
            "min_p": p.min_p > 0,
            "xtc": p.xtc_probability > 0,
            "temperature": True,
        }[name]

    def _add_named(self, chain: ctypes.c_void_p, name: str) -> None:
        p = self.params
        if not self._active(name):
            return
        if name == "penalties":
            self._add_penalties(chain)
        elif name == "dry":
            self._add_dry(chain)
        elif name == "top_n_sigma":
            self._add(chain, C.llama_sampler_init_top_n_sigma(p.top_n_sigma))
        elif name == "top_k":
            self._add(chain, C.llama_sampler_init_top_k(p.top_k))
        elif name == "typical_p":
            self._add(chain, C.llama_sampler_init_typical(p.typical_p, 1))
        elif name == "top_p":
            self._add(chain, C.llama_sampler_init_top_p(p.top_p, 1))
        elif name == "min_p":
            self._add(chain, C.llama_sampler_init_min_p(p.min_p, 1))
        elif name == "xtc":
            self._add(
                chain, C.llama_sampler_init_xtc(p.xtc_probability, p.xtc_threshold, 1, self.seed)
            )
        elif name == "temperature":
            if p.dynatemp_range > 0:
                smpl = C.llama_sampler_init_temp_ext(
                    p.temperature, p.dynatemp_range, p.dynatemp_exponent
                )
            else:
                smpl = C.llama_sampler_init_temp(p.temperature)
            self._add(chain, smpl)

    def _penalised(self) -> bool:
        """Whether a repetition, presence or frequency penalty applies at all."""
        p = self.params
        if p.repeat_penalty == 1 and p.presence_penalty == 0 and p.frequency_penalty == 0:
            return False
        return self._last_n(p.repeat_last_n) != 0

    def _add_penalties(self, chain: ctypes.c_void_p) -> None:
        p = self.params
        if not self._penalised():
            return
        last_n = self._last_n(p.repeat_last_n)
        smpl = C.llama_sampler_init_penalties(
            self.model.n_vocab, last_n, p.repeat_penalty, p.frequency_penalty, p.presence_penalty
        )
        self._add(chain, smpl, history=True)

    def _add_dry(self, chain: ctypes.c_void_p) -> None:
        p = self.params
        if p.dry_multiplier <= 0:
            return
        breakers = [b.encode("utf-8") for b in p.dry_sequence_breakers if b]
        arr = (ctypes.c_char_p * max(len(breakers), 1))(*breakers)
        self._keep.append(arr)
        smpl = C.llama_sampler_init_dry(
            self.model.vocab,
            p.dry_multiplier,
            p.dry_base,
            p.dry_allowed_length,
            self._last_n(p.dry_penalty_last_n),
            arr,
            len(breakers),
        )
        self._add(chain, smpl, history=True)

    def accept_prompt(self, tokens: list[int]) -> None:
        """Feed prompt tokens to the repetition/DRY history (not to grammar or mirostat)."""
        limit = max(
            self._last_n(self.params.repeat_last_n), self._last_n(self.params.dry_penalty_last_n)
        )
        if self.edits is not None and tokens:
            self.edits.feed(tokens[-limit:] if limit else ())
        if not self.history_samplers or not tokens:
            return
        for idx in self.history_samplers:
            smpl = C.llama_sampler_chain_get(self.ptr, idx)
            for tok in tokens[-limit:]:
                if tok >= 0:  # negative: an image position (engine/vision.py), not a token
                    C.llama_sampler_accept(smpl, tok)

    def accept(self, token: int) -> None:
        C.llama_sampler_accept(self.ptr, token)
        if self.edits is not None:
            self.edits.remember(token)

    def sample(self, ctx_ptr: ctypes.c_void_p, index: int) -> int:
        """Pick the next token from batch row `index` and accept it into the chain."""
        edits = self.edits
        if edits is None:
            return int(C.llama_sampler_sample(self.ptr, ctx_ptr, index))
        row = logits_view(ctx_ptr, index, self.model.n_vocab)
        edits.apply(row)
        if self.argmax:
            tok = int(row.argmax())
            if row[tok] != row[tok]:  # a NaN: llama.cpp's rules
                tok = -1
        elif self._log_min_p:
            tok = self._sample_min_p(row)
        else:
            tok = -1
        if tok < 0:
            tok = int(C.llama_sampler_sample(self.ptr, ctx_ptr, index))
        edits.remember(tok)
        return tok

    def _sample_min_p(self, row: Any) -> int:
        """The chain over only the tokens min-p can keep (-1: a NaN or no finite logit)."""
        top = float(row.max())
        if not -math.inf < top < math.inf:
            return -1
        # min-p keeps logit >= max + log(p), computed in float32 by llama.cpp: a slightly
        # lower bound keeps every token it keeps and a few more, which min-p then drops
        # itself, so the chain sees the same survivors in the same order.
        ids = np.flatnonzero(row >= top + self._log_min_p - 0.01)
        return sample_candidates(self.ptr, ids, row[ids])

    def free(self) -> None:
        if self.ptr:
            C.llama_sampler_free(self.ptr)
            self.ptr = None
            self._keep.clear()
