"""The module that talks to llama.cpp (through llama-cpp-python's low-level ctypes API);
llama_params.py fills the structs it hands over.

Everything above it sees Python ints, strings and small value types. The high-level
`llama_cpp.Llama` class is not used: it owns one sequence, computes logits for every prompt
token and detokenises the whole completion each step, which is what makes its server slow
(see shared/research/perf-baseline.md). Here one context serves many sequences, only the
positions we sample from produce logits, and decoding is one `llama_decode` per step.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp as C

from innkeeper.engine.llama_params import (
    BackendError,
    ContextParams,
    ModelParams,
    context_params_struct,
    model_params_struct,
    set_fields,
)


class ModelLoadError(BackendError):
    """llama.cpp refused the model file itself (an unknown architecture, a corrupt tensor):
    the file's problem, not the server's."""


_init_lock = threading.Lock()
_initialised = False
_log_callback = None  # kept alive for as long as llama.cpp may call it
_quiet = False
_recent_errors: deque[str] = deque(maxlen=8)
_llama_decode = C.llama_decode  # looked up once: called every decode step
_LAYER_PLACED = re.compile(rb"layer\s+(\d+) assigned to device ([^,\s]+)")
_layer_devices: list[tuple[int, str]] = []  # (layer, device) as llama.cpp places the last load
_mlock_failures = 0  # llama.cpp only warns when mlock fails; counted so --mlock can refuse


def init_backend(quiet: bool = True) -> None:
    """Initialise llama.cpp once per process and route its log through a filter.

    llama.cpp logs every tensor at load time; a user wants one banner, so only warnings and
    errors pass unless INNKEEPER_LLAMA_LOG=1.
    """
    global _initialised, _log_callback, _quiet
    with _init_lock:
        if _initialised:
            return
        _quiet = quiet and os.environ.get("INNKEEPER_LLAMA_LOG") != "1"

        @C.llama_log_callback
        def _log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
            # ggml_log_level (ggml.h): 2 = INFO, 3 = WARN, 4 = ERROR, 5 = CONT
            global _mlock_failures
            if level == 4:
                _recent_errors.append(text.decode("utf-8", "replace").strip())
            if b"failed to mlock" in text:  # a warning: llama-mmap.cpp's only signal of it
                _mlock_failures += 1
            placed = _LAYER_PLACED.search(text)
            if placed:  # load_tensors: layer 3 assigned to device RPC0, is_swa = 0
                _layer_devices.append((int(placed[1]), placed[2].decode("utf-8", "replace")))
            if not _quiet:
                with contextlib.suppress(OSError):
                    os.write(2, text)

        _log_callback = _log
        C.llama_log_set(_log, ctypes.c_void_p(0))
        C.llama_backend_init()
        _initialised = True


@dataclass(frozen=True)
class ModelInfo:
    """What the rest of innkeeper needs to know about a loaded model."""

    path: Path
    description: str
    n_vocab: int
    n_ctx_train: int
    n_layer: int
    n_params: int
    size_bytes: int
    chat_template: str | None
    bos_token: str
    eos_token: str
    add_bos: bool
    architecture: str
    file_type: str | None
    fim_tokens: dict[str, int]  # fill-in-the-middle tokens: pre, suf, mid, rep, sep (if any)
    # Repeating layers per device as llama.cpp placed them (CPU, CUDA0, RPC0 [host:port]…)
    layer_devices: tuple[tuple[str, int], ...] = ()


class Model:
    """A loaded GGUF model: weights plus vocabulary.

    Tokenising only reads the vocabulary, so any thread may call `tokenize`/`detokenize`
    while the engine thread is decoding (token counts never wait behind a generation).
    """

    def __init__(self, path: Path, params: ModelParams | None = None) -> None:
        init_backend()
        self.path = path
        self.params = params or ModelParams()
        mp, self._keep = model_params_struct(self.params)  # alive as long as the model
        _recent_errors.clear()  # last_error() reports this load's lines only
        _layer_devices.clear()
        mlock_failures = _mlock_failures
        ptr = C.llama_model_load_from_file(str(path).encode(), mp)
        if not ptr:
            raise ModelLoadError(
                f"llama.cpp could not load {path}: {last_error() or 'not a valid GGUF model'}"
            )
        if _mlock_failures != mlock_failures:
            C.llama_model_free(ptr)
            raise BackendError(
                "--mlock: could not lock the model in RAM: the locked-memory limit is too low. "
                "Raise it (`ulimit -l unlimited`; for a systemd service LimitMEMLOCK=infinity) "
                "or drop --mlock"
            )
        self.ptr = ptr
        if self.params.rpc:
            from innkeeper.engine.rpc import hold

            hold(self.params.rpc, True)
        self.vocab = C.llama_model_get_vocab(ptr)
        self.n_vocab = int(C.llama_vocab_n_tokens(self.vocab))
        self.bos = int(C.llama_vocab_bos(self.vocab))
        self.eos = int(C.llama_vocab_eos(self.vocab))
        self.add_bos = bool(C.llama_vocab_get_add_bos(self.vocab))
        # Every end-of-generation id (eos, eot, <|im_end|>…): ignore_eos must ban all of them.
        self.eog_tokens = tuple(
            t for t in range(self.n_vocab) if C.llama_vocab_is_eog(self.vocab, t)
        )
        self._eog = frozenset(self.eog_tokens)
        self._piece_cache: dict[int, bytes] = {}
        self.info = ModelInfo(
            path=path,
            description=self._desc(),
            n_vocab=self.n_vocab,
            n_ctx_train=int(C.llama_model_n_ctx_train(ptr)),
            n_layer=int(C.llama_model_n_layer(ptr)),
            n_params=int(C.llama_model_n_params(ptr)),
            size_bytes=int(C.llama_model_size(ptr)),
            chat_template=self._chat_template(),
            bos_token=self.piece(self.bos, special=True).decode("utf-8", "replace")
            if self.bos >= 0
            else "",
            eos_token=self.piece(self.eos, special=True).decode("utf-8", "replace")
            if self.eos >= 0
            else "",
            add_bos=self.add_bos,
            architecture=self.meta("general.architecture") or "unknown",
            file_type=self.meta("general.file_type"),
            fim_tokens=self._fim_tokens(),
            layer_devices=self._layer_devices(int(C.llama_model_n_layer(ptr))),
        )

    def _layer_devices(self, n_layer: int) -> tuple[tuple[str, int], ...]:
        """Layers per device, in order; an RPC device is shown with its worker's address."""
        counts: dict[str, int] = {}
        for layer, device in _layer_devices:
            if layer < n_layer:  # llama.cpp also logs the output layer as layer n_layer
                counts[device] = counts.get(device, 0) + 1
        if self.params.rpc:
            from innkeeper.engine.rpc import device_labels

            labels = device_labels()
            counts = {labels.get(d, d): n for d, n in counts.items()}
        return tuple(counts.items())

    def _desc(self) -> str:
        buf = ctypes.create_string_buffer(256)
        C.llama_model_desc(self.ptr, buf, len(buf))
        return buf.value.decode("utf-8", "replace")

    def _chat_template(self) -> str | None:
        raw = C.llama_model_chat_template(self.ptr, None)
        return raw.decode("utf-8", "replace") if raw else None

    def meta(self, key: str) -> str | None:
        """A GGUF metadata value as text (llama.cpp's own view of it)."""
        buf = ctypes.create_string_buffer(1024)
        n = C.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            C.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace")

    def is_eog(self, token: int) -> bool:
        return token in self._eog

    def tokenize(
        self, text: str, *, add_special: bool = True, parse_special: bool = True
    ) -> list[int]:
        """Text to token ids; `add_special` adds BOS when the model wants it."""
        data = text.encode("utf-8")
        n_max = len(data) + 8
        buf = (C.llama_token * n_max)()
        n = C.llama_tokenize(self.vocab, data, len(data), buf, n_max, add_special, parse_special)
        if n < 0:
            n_max = -n
            buf = (C.llama_token * n_max)()
            n = C.llama_tokenize(
                self.vocab, data, len(data), buf, n_max, add_special, parse_special
            )
        if n < 0:
            raise BackendError("tokenisation failed")
        return list(buf[:n])

    def piece(self, token: int, *, special: bool = False) -> bytes:
        """The bytes one token stands for (cached: the hot path calls this per token)."""
        key = token if not special else -token - 1
        cached = self._piece_cache.get(key)
        if cached is not None:
            return cached
        buf = ctypes.create_string_buffer(64)
        n = C.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = C.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        out = buf.raw[: max(n, 0)]
        self._piece_cache[key] = out
        return out

    def detokenize(self, tokens: list[int], *, special: bool = False) -> str:
        return b"".join(self.piece(t, special=special) for t in tokens).decode("utf-8", "replace")

    def _fim_tokens(self) -> dict[str, int]:
        """The fill-in-the-middle tokens the vocabulary has (pre, suf, mid, rep, sep; a
        missing one is left out)."""
        found = {
            "pre": C.llama_vocab_fim_pre(self.vocab),
            "suf": C.llama_vocab_fim_suf(self.vocab),
            "mid": C.llama_vocab_fim_mid(self.vocab),
            "rep": C.llama_vocab_fim_rep(self.vocab),
            "sep": C.llama_vocab_fim_sep(self.vocab),
        }
        return {k: int(t) for k, t in found.items() if t >= 0}

    def valid_token(self, token: int) -> bool:
        return 0 <= token < self.n_vocab

    def close(self) -> None:
        if self.ptr:
            C.llama_model_free(self.ptr)
            self.ptr = None
            if self.params.rpc:
                from innkeeper.engine.rpc import hold

                hold(self.params.rpc, False)


class Batch:
    """A reusable `llama_batch`: tokens of several sequences for one decode.

    Filled once per decode step, so the per-row writes go through field pointers read once
    here: every `raw.token` access would build a new ctypes object, and `raw.seq_id[i]`
    another. Every row holds one sequence, so `n_seq_id` is written once, not per token.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        raw = C.llama_batch_init(capacity, 0, 1)
        self.raw = raw
        self.n = 0
        set_fields(raw, n_tokens=0)  # checked once; `Context.decode` writes it directly
        self._token = _as_array(raw.token, ctypes.c_int32, capacity)
        self._pos = _as_array(raw.pos, ctypes.c_int32, capacity)
        self._logits = _as_array(raw.logits, ctypes.c_int8, capacity)
        seq_id = raw.seq_id
        self._seq = [seq_id[i] for i in range(capacity)]
        n_seq_id = raw.n_seq_id
        for i in range(capacity):
            n_seq_id[i] = 1

    def clear(self) -> None:
        self.n = 0

    def add(self, token: int, pos: int, seq: int, logits: bool) -> int:
        """Append one token; returns its index (the index to sample from if `logits`)."""
        i = self.n
        self._token[i] = token
        self._pos[i] = pos
        self._seq[i][0] = seq
        self._logits[i] = logits
        self.n = i + 1
        return i

    def add_span(self, tokens: list[int], pos0: int, seq: int, logits_last: bool) -> int:
        """Append a run of prompt tokens of one sequence; returns the index of the last."""
        i0 = self.n
        n = len(tokens)
        i1 = i0 + n
        self._token[i0:i1] = tokens
        self._pos[i0:i1] = range(pos0, pos0 + n)
        self._logits[i0:i1] = [0] * n
        for row in self._seq[i0:i1]:
            row[0] = seq
        last = i1 - 1
        self._logits[last] = logits_last
        self.n = i1
        return last

    def free(self) -> None:
        if self.raw is not None:
            C.llama_batch_free(self.raw)
            self.raw = None


def _as_array(ptr: Any, ctype: Any, n: int) -> Any:
    """The `n` items `ptr` points to as a ctypes array (which, unlike a pointer, takes
    slice assignment)."""
    return ctypes.cast(ptr, ctypes.POINTER(ctype * n)).contents


class Context:
    """One llama.cpp context: the KV cache shared by every slot, and the decode call."""

    def __init__(
        self,
        model: Model,
        params: ContextParams,
        *,
        embeddings: bool = False,
        pooling_type: int | None = None,
    ) -> None:
        """`embeddings`: a context whose decode yields vectors, not logits (engine/embeddings.py),
        pooled with `pooling_type` (llama.cpp's enum; None: the model's own)."""
        self.model = model
        self.params = params
        threads = params.threads or default_threads()
        cp = context_params_struct(params, threads, embeddings, pooling_type)
        _recent_errors.clear()
        ptr = C.llama_init_from_model(model.ptr, cp)
        if not ptr:
            raise BackendError(
                "llama.cpp could not create the context: "
                + (last_error() or "out of memory, or a quantized V cache without flash attention")
            )
        self.ptr = ptr
        self.mem = C.llama_get_memory(ptr)
        self.n_ctx = int(C.llama_n_ctx(ptr))
        self.threads = threads
        self.threads_batch = cp.n_threads_batch
        self.can_shift = bool(C.llama_memory_can_shift(self.mem))
        mp = model.ptr
        # How far back the memory can give a prompt its past: 0 = everything it ever held.
        self.n_swa = 0 if params.swa_full else int(C.llama_model_n_swa(mp))
        self.recurrent = bool(C.llama_model_is_recurrent(mp) or C.llama_model_is_hybrid(mp))
        # Whether reuse may need context checkpoints: the memory forgets old positions.
        self.partial_memory = self.n_swa > 0 or self.recurrent

    def decode(self, batch: Batch) -> int:
        """Run the model over the batch; 0 on success, 1 when the KV cache has no room."""
        raw = batch.raw
        raw.n_tokens = batch.n  # a field `Batch` checked when it was made
        return _llama_decode(self.ptr, raw)

    def logits(self, index: int) -> ctypes.Array[ctypes.c_float]:
        """The logits row of batch position `index` (valid until the next decode)."""
        ptr = C.llama_get_logits_ith(self.ptr, index)
        return ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float * self.model.n_vocab)).contents

    # KV cache operations, per sequence (one sequence per slot).
    def seq_rm(self, seq: int, p0: int, p1: int = -1) -> bool:
        return bool(C.llama_memory_seq_rm(self.mem, seq, p0, p1))

    def seq_add(self, seq: int, p0: int, p1: int, delta: int) -> None:
        C.llama_memory_seq_add(self.mem, seq, p0, p1, delta)

    def clear(self) -> None:
        C.llama_memory_clear(self.mem, True)

    def seq_pos_min(self, seq: int) -> int:
        """The oldest position the memory still holds for `seq` (-1: none).

        With sliding-window layers (swa_full off) or recurrent state, positions older than
        this cannot be given back to a new prompt without a context checkpoint.
        """
        return int(C.llama_memory_seq_pos_min(self.mem, seq))

    def seq_save(
        self, seq: int, *, partial: bool = False
    ) -> tuple[ctypes.Array[ctypes.c_uint8], int] | None:
        """Copy one sequence's state out to host memory.

        Whole (parking: frees its cells), or `partial`: only what cannot be rolled back
        (sliding-window layers, recurrent state), llama-server's context checkpoints.
        """
        flags = C.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY if partial else 0
        size = int(C.llama_state_seq_get_size_ext(self.ptr, seq, flags))
        if size <= 0:
            return None
        buf = (ctypes.c_uint8 * size)()
        n = int(C.llama_state_seq_get_data_ext(self.ptr, buf, size, seq, flags))
        return (buf, n) if n > 0 else None

    def seq_restore(
        self, seq: int, data: ctypes.Array[ctypes.c_uint8], size: int, *, partial: bool = False
    ) -> bool:
        """Load a saved state into a sequence; False when the cache has no room.

        A whole state replaces the sequence; a `partial` one replaces only the sliding-window
        / recurrent part, the full-attention cells stay as they are.
        """
        flags = C.LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY if partial else 0
        return int(C.llama_state_seq_set_data_ext(self.ptr, data, size, seq, flags)) > 0

    def seq_save_file(self, seq: int, path: Path, tokens: list[int]) -> int:
        """Write one sequence's tokens and state to `path` (llama-server's slot files);
        returns the bytes written, 0 on failure."""
        arr = (C.llama_token * max(len(tokens), 1))(*tokens)
        return int(C.llama_state_seq_save_file(self.ptr, str(path).encode(), seq, arr, len(tokens)))

    def seq_load_file(self, seq: int, path: Path, capacity: int) -> tuple[list[int], int] | None:
        """Load a slot file into `seq`: (its tokens, bytes read), or None when llama.cpp
        refuses it (another model's shapes, a damaged file, more than `capacity` tokens)."""
        arr = (C.llama_token * capacity)()
        count = ctypes.c_size_t(0)
        n = int(
            C.llama_state_seq_load_file(
                self.ptr, str(path).encode(), seq, arr, capacity, ctypes.byref(count)
            )
        )
        return (list(arr[: count.value]), n) if n > 0 else None

    def close(self) -> None:
        if self.ptr:
            C.llama_free(self.ptr)
            self.ptr = None


def route_log(setter: Callable[[Any, Any], None]) -> None:
    """Send another llama.cpp library's log (libmtmd's `mtmd_log_set`) through the same
    filter: quiet unless INNKEEPER_LLAMA_LOG=1, its errors kept for `last_error`."""
    init_backend()
    setter(_log_callback, ctypes.c_void_p(0))
    _recent_errors.clear()


def last_error() -> str:
    """The most telling llama.cpp error line since the last load began (one-line CLI errors).

    llama.cpp logs the cause first (e.g. "gguf_init_from_reader: failed to read key-value
    pairs") and then generic "failed to load model" lines; the cause is what a user can act on.
    """
    for line in _recent_errors:
        if "error loading model:" in line:
            detail = line.split("error loading model:", 1)[1].strip()
            if "failed to load model" not in detail:
                return detail
    return _recent_errors[0] if _recent_errors else ""


def default_threads() -> int:
    """Physical cores: llama.cpp's decode does not gain from SMT siblings."""
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
    except Exception:
        n = None
    return max(1, n or os.cpu_count() or 1)


def system_info() -> str:
    return C.llama_print_system_info().decode("utf-8", "replace")


def supports_gpu_offload() -> bool:
    """Whether this machine has a device to offload layers to. llama.cpp also says yes for
    any build with RPC, where a CPU-only machine offloads nothing unless `--rpc` is given."""
    if not C.llama_supports_gpu_offload():
        return False
    from innkeeper.engine.devices import local_gpus
    from innkeeper.engine.rpc import available

    return not available() or bool(local_gpus())
