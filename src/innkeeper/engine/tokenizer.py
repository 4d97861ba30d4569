"""Tokenisation in time linear in the text, however many special tokens it holds.

llama.cpp's `llama_tokenize` first cuts the text at every special-token string (its
`tokenizer_st_partition`): for each special token it walks a `std::forward_list` of
fragments and, for every match, computes the fragment's index with `std::distance` from the
list's head and erases through `std::next` from the head again. With k special tokens in the
text that is O(k²): a chat prompt of 40k short messages (80k `<|im_start|>`/`<|im_end|>`)
took 16.6 s where plain text of the same length takes 0.12 s.

Here the text is cut once, with one regular expression over the vocabulary's special-token
strings (control, user-defined and unknown tokens: the ones llama.cpp partitions on), built
once per model as a trie so the match at each position is the longest one (leftmost-longest,
as Hugging Face tokenizers match added tokens). Each piece between special tokens is
tokenised by llama.cpp with `parse_special=False` and the special ids are emitted directly.
For the vocabulary types below llama.cpp tokenises each fragment independently (SPM prefixes
a space to a fragment that follows a special token or starts the text, which is also what a
separate call does), so the ids are the same; tests/engine/test_tokenizer.py checks that
against llama.cpp's own tokenisation. Other vocabulary types use llama.cpp's path as is.

The work is also bounded and interruptible: `cancel` is polled between pieces, and `limit`
stops as soon as the text certainly has more tokens than the caller can use (a prompt longer
than the context), before a long piece is tokenised at all.
"""

from __future__ import annotations

import re
import threading

import llama_cpp as C

from innkeeper.engine.backend import BackendError, Model

SPECIAL_ATTRS = (
    C.LLAMA_TOKEN_ATTR_CONTROL | C.LLAMA_TOKEN_ATTR_USER_DEFINED | C.LLAMA_TOKEN_ATTR_UNKNOWN
)
# Vocabulary types whose llama.cpp tokeniser handles each fragment on its own (llama-vocab.cpp).
SPLIT_TYPES = (C.LLAMA_VOCAB_TYPE_SPM, C.LLAMA_VOCAB_TYPE_BPE, C.LLAMA_VOCAB_TYPE_UGM)
C_SPACE = b" \t\n\v\f\r"  # what llama.cpp's isspace() strips next to LSTRIP/RSTRIP tokens
CHECK_EVERY = 256  # pieces between looks at `cancel`


class TokenizeCancelled(Exception):
    """The caller gave up (its client went away) while the text was being tokenised."""


class TooManyTokens(Exception):
    """The text has more than `limit` tokens; `at_least` is a lower bound on how many."""

    def __init__(self, at_least: int) -> None:
        super().__init__(f"more than {at_least - 1} tokens")
        self.at_least = at_least


def _trie_pattern(words: list[bytes]) -> bytes:
    """A regex matching any of `words`, the longest one at a position (a trie, so the
    alternatives at each byte are distinct and a longer word is always tried first)."""
    trie: dict = {}
    for w in words:
        node = trie
        for b in w:
            node = node.setdefault(b, {})
        node[None] = True

    def emit(node: dict) -> bytes:
        end = node.get(None, False)
        branches = [
            re.escape(bytes([b])) + emit(child) for b, child in node.items() if b is not None
        ]
        if not branches:
            return b""
        body = branches[0] if len(branches) == 1 else b"(?:" + b"|".join(branches) + b")"
        if end:
            return b"(?:" + body + b")?"
        return body

    return emit(trie)


class Tokenizer:
    """One model's tokeniser (built once; read-only afterwards, so any thread may use it)."""

    def __init__(self, model: Model) -> None:
        self.model = model
        vocab = model.vocab
        self.vocab_type = int(C.llama_vocab_type(vocab))
        self.split = self.vocab_type in SPLIT_TYPES
        self.bos = model.bos
        self.eos = model.eos
        self.add_bos = bool(C.llama_vocab_get_add_bos(vocab))
        self.add_eos = bool(C.llama_vocab_get_add_eos(vocab))
        self.ids: dict[bytes, int] = {}
        self.lstrip: set[int] = set()
        self.rstrip: set[int] = set()
        # Bytes of text one token can stand for, at most (an unknown character may be one
        # token of up to 4 UTF-8 bytes): n bytes of text are at least n / this many tokens.
        # A token's vocabulary text is never shorter than the bytes it decodes to (SPM writes
        # a space as the 3-byte "▁" and a byte as "<0x0A>", byte-level BPE maps each byte to
        # a 1-2 byte character), so its length is a safe bound, read without detokenising:
        # on Gemma's 262k vocabulary that is 0.2 s instead of 0.75 s, on every model load.
        longest = 4
        # A model without a vocabulary (llama.cpp asserts on any per-token query) has
        # nothing to scan: tokenising it goes through llama.cpp's own call.
        n_scan = 0 if self.vocab_type == C.LLAMA_VOCAB_TYPE_NONE else model.n_vocab
        get_attr, get_text = C.llama_vocab_get_attr, C.llama_vocab_get_text
        for tok in range(n_scan):
            attr = int(get_attr(vocab, tok))
            text = get_text(vocab, tok) or b""
            if attr & SPECIAL_ATTRS:
                if text:
                    self.ids.setdefault(text, tok)
                if attr & C.LLAMA_TOKEN_ATTR_LSTRIP:
                    self.lstrip.add(tok)
                if attr & C.LLAMA_TOKEN_ATTR_RSTRIP:
                    self.rstrip.add(tok)
            elif len(text) > longest:
                longest = len(text)
        self.max_piece_bytes = longest
        # UGM normalisation may fold runs of whitespace into one token: no byte bound there.
        self.byte_bound = self.vocab_type in (C.LLAMA_VOCAB_TYPE_SPM, C.LLAMA_VOCAB_TYPE_BPE)
        words = sorted(self.ids, key=len, reverse=True)
        self.pattern = re.compile(_trie_pattern(words)) if words else None

    def tokenize(
        self,
        text: str,
        *,
        add_special: bool = True,
        cancel: threading.Event | None = None,
        limit: int | None = None,
    ) -> list[int]:
        """Text to token ids, as llama.cpp's `llama_tokenize` with parse_special=True.

        Raises TooManyTokens once the text is known to have more than `limit` tokens, and
        TokenizeCancelled when `cancel` is set (both checked between pieces).
        """
        data = text.encode("utf-8", "replace")  # a lone surrogate from JSON becomes "?"
        if not self.split or self.pattern is None:
            return self._whole(data, add_special, limit)
        out: list[int] = [self.bos] if add_special and self.add_bos and self.bos >= 0 else []
        memo: dict[bytes, list[int]] = {}
        start = 0
        rstrip_next = False
        for n, m in enumerate(self.pattern.finditer(data), 1):
            tok = self.ids[m.group()]
            raw = data[start : m.start()]
            if rstrip_next:
                raw = raw.lstrip(C_SPACE)
            if tok in self.lstrip:
                raw = raw.rstrip(C_SPACE)
            if raw:
                self._piece(raw, out, memo, limit)
            out.append(tok)
            rstrip_next = tok in self.rstrip
            start = m.end()
            if n % CHECK_EVERY == 0:
                if cancel is not None and cancel.is_set():
                    raise TokenizeCancelled
                if limit is not None and len(out) > limit:
                    raise TooManyTokens(len(out))
        raw = data[start:]
        if rstrip_next:
            raw = raw.lstrip(C_SPACE)
        if raw:
            self._piece(raw, out, memo, limit)
        if add_special and self.add_eos and self.eos >= 0:
            out.append(self.eos)
        if limit is not None and len(out) > limit:
            raise TooManyTokens(len(out))
        return out

    def _piece(
        self, raw: bytes, out: list[int], memo: dict[bytes, list[int]], limit: int | None
    ) -> None:
        ids = memo.get(raw)
        if ids is None:
            if limit is not None and self.byte_bound:
                at_least = len(out) + -(-len(raw) // self.max_piece_bytes)
                if at_least > limit:
                    raise TooManyTokens(at_least)
            ids = self.model_tokenize(raw, add_special=False, parse_special=False)
            if len(raw) <= 256:
                memo[raw] = ids
        out.extend(ids)

    def _whole(self, data: bytes, add_special: bool, limit: int | None) -> list[int]:
        if limit is not None and self.byte_bound:
            at_least = -(-len(data) // self.max_piece_bytes)
            if at_least > limit:
                raise TooManyTokens(at_least)
        out = self.model_tokenize(data, add_special=add_special, parse_special=True)
        if limit is not None and len(out) > limit:
            raise TooManyTokens(len(out))
        return out

    def model_tokenize(self, data: bytes, *, add_special: bool, parse_special: bool) -> list[int]:
        """llama.cpp's own `llama_tokenize` on UTF-8 bytes (the reference the split matches)."""
        vocab = self.model.vocab
        n_max = len(data) + 8
        buf = (C.llama_token * n_max)()
        n = C.llama_tokenize(vocab, data, len(data), buf, n_max, add_special, parse_special)
        if n < 0:
            n_max = -n
            buf = (C.llama_token * n_max)()
            n = C.llama_tokenize(vocab, data, len(data), buf, n_max, add_special, parse_special)
        if n < 0:
            raise BackendError("tokenisation failed")
        return list(buf[:n])
