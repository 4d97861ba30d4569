"""Images in prompts: a projector (libmtmd) beside the text model.

A prompt with images is split by libmtmd into text chunks and image chunks (`mtmd_tokenize`).
The scheduler keeps every slot's cache as a list of token ids, one per position; an image
takes one entry per position it fills, each a negative *marker* derived from a hash of the
image's pixels and the position's index in the image. Prefix matching (slot choice, cache
reuse, parked caches) therefore works unchanged: the same image at the same place matches,
a different image stops the match at its first position. Markers are never decoded as tokens:
the scheduler encodes the image (the projector's ViT) and decodes its embeddings into the
slot's sequence in a decode of their own, then evaluates the text after it as usual.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import llama_cpp as C
from llama_cpp import mtmd_cpp as M

from innkeeper.engine.backend import (
    BackendError,
    Context,
    Model,
    last_error,
    route_log,
)
from innkeeper.engine.llama_params import set_fields

log = logging.getLogger("innkeeper.engine")

MARKER = M.mtmd_default_marker().decode()  # where an image goes in the prompt text
_MARKER_SPACE = 1 << 30
_NO_CALLBACK = M.mtmd_helper_post_decode_callback()  # a NULL function pointer


class VisionError(ValueError):
    """A prompt with images that this model cannot take (no projector, bad layout)."""


@dataclass(frozen=True)
class ImageInput:
    """A decoded image: RGB pixels, row-major, 3 bytes a pixel (api/images.py makes them)."""

    width: int
    height: int
    rgb: bytes
    digest: bytes = field(default=b"")  # sha256 of the pixels; filled in when empty

    def __post_init__(self) -> None:
        if len(self.rgb) != self.width * self.height * 3:
            raise ValueError("RGB data does not match the image size")
        if not self.digest:
            h = hashlib.sha256(self.rgb)
            h.update(f"{self.width}x{self.height}".encode())
            object.__setattr__(self, "digest", h.digest())


def markers(digest: bytes, n: int) -> list[int]:
    """The cache entries of an image of `n` positions: negative, so never a token id."""
    base = int.from_bytes(digest[:8], "little") % _MARKER_SPACE
    return [-1 - ((base + i) % _MARKER_SPACE) for i in range(n)]


@dataclass(frozen=True)
class ImageSpan:
    """One image chunk of a prompt: positions [start, end) of the prompt's list."""

    start: int
    end: int
    chunk: int  # mtmd_input_chunk pointer, owned by the MediaPrompt's chunk list


class MediaPrompt:
    """A tokenized prompt with images: `tokens` (markers where images go) and the chunks
    libmtmd needs to encode them. Frees its chunks when dropped."""

    def __init__(self, tokens: list[int], spans: list[ImageSpan], chunks: int) -> None:
        self.tokens = tokens
        self.spans = spans
        self._by_start = {s.start: s for s in spans}
        self._finalizer = weakref.finalize(self, M.mtmd_input_chunks_free, chunks)

    def image_at(self, pos: int) -> ImageSpan | None:
        """The image that starts at prompt position `pos`, if one does."""
        return self._by_start.get(pos)

    def text_run(self, pos: int) -> int:
        """How many entries from `pos` on are text (up to the next image or the end)."""
        nxt = min((s.start for s in self.spans if s.start >= pos), default=len(self.tokens))
        return nxt - pos

    def image_start(self, pos: int) -> int:
        """`pos`, moved back to its image's first position when it falls inside one: a
        cached prefix may end only between chunks (images are decoded whole)."""
        for s in self.spans:
            if s.start < pos < s.end:
                return s.start
        return pos

    def text_tokens(self) -> list[int]:
        return [t for t in self.tokens if t >= 0]


class Vision:
    """The projector of one text model: tokenizes prompts with images (any thread, one at
    a time) and evaluates image chunks into a context (the engine thread)."""

    def __init__(self, model: Model, path: Path, *, threads: int, use_gpu: bool) -> None:
        route_log(M.mtmd_log_set)
        route_log(M.mtmd_helper_log_set)
        params = M.mtmd_context_params_default()
        set_fields(params, use_gpu=use_gpu, n_threads=threads, print_timings=False, warmup=False)
        ptr = M.mtmd_init_from_file(str(path).encode(), model.ptr, params)
        if not ptr:
            why = " ".join(last_error().split()) or "see the log"
            raise BackendError(f"{path.name} is not a projector for this model ({why})")
        self.ptr = ptr
        self.path = path
        self._lock = threading.Lock()
        self.encodes = 0  # images encoded so far (a cached image is not encoded again)
        if not M.mtmd_support_vision(ptr):
            self.close()
            raise BackendError(f"{path.name} has no vision encoder")
        if M.mtmd_decode_use_mrope(ptr):
            self.close()
            raise BackendError(
                f"{path.name} places images with M-RoPE (Qwen2-VL style), which innkeeper "
                "does not support yet"
            )

    def tokenize(self, text: str, images: list[ImageInput]) -> MediaPrompt:
        """`text` with one MARKER per image, in order, into tokens and image chunks."""
        if text.count(MARKER) != len(images):
            raise VisionError(
                f"the prompt has {text.count(MARKER)} image markers for {len(images)} images"
            )
        raw = text.encode()
        inp = M.mtmd_input_text()
        set_fields(inp, text=raw, text_len=len(raw), add_special=True, parse_special=True)
        bitmaps = [self._bitmap(img) for img in images]
        arr = (ctypes.c_void_p * max(len(bitmaps), 1))(*bitmaps)
        chunks = M.mtmd_input_chunks_init()
        try:
            with self._lock:
                ret = M.mtmd_tokenize(self.ptr, chunks, ctypes.byref(inp), arr, len(bitmaps))
            if ret != 0:
                raise VisionError(f"libmtmd could not tokenize the prompt (status {ret})")
            prompt = self._layout(chunks)
        except BaseException:
            M.mtmd_input_chunks_free(chunks)
            raise
        finally:
            for bm in bitmaps:
                M.mtmd_bitmap_free(bm)
        return prompt

    def _bitmap(self, img: ImageInput) -> int:
        data = (ctypes.c_ubyte * len(img.rgb)).from_buffer_copy(img.rgb)
        bm = M.mtmd_bitmap_init(img.width, img.height, data)
        if not bm:
            raise VisionError("libmtmd could not take the image")
        M.mtmd_bitmap_set_id(bm, img.digest.hex().encode())
        return bm

    def _layout(self, chunks: int) -> MediaPrompt:
        tokens: list[int] = []
        spans: list[ImageSpan] = []
        for i in range(M.mtmd_input_chunks_size(chunks)):
            chunk = M.mtmd_input_chunks_get(chunks, i)
            kind = M.mtmd_input_chunk_get_type(chunk)
            if kind == M.MTMD_INPUT_CHUNK_TYPE_TEXT:
                n = ctypes.c_size_t(0)
                ptr = M.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                tokens.extend(ptr[k] for k in range(n.value))
            elif kind == M.MTMD_INPUT_CHUNK_TYPE_IMAGE:
                n_pos = M.mtmd_input_chunk_get_n_pos(chunk)
                digest = bytes.fromhex((M.mtmd_input_chunk_get_id(chunk) or b"").decode())
                start = len(tokens)
                tokens.extend(markers(digest, n_pos))
                spans.append(ImageSpan(start, len(tokens), chunk))
            else:
                raise VisionError("only images are supported, not audio")
        if not tokens or tokens[-1] < 0:
            raise VisionError("a prompt must end with text after its last image")
        return MediaPrompt(tokens, spans, chunks)

    def eval_image(self, ctx: Context, span: ImageSpan, seq: int) -> None:
        """Encode one image chunk and decode its embeddings at positions span.start.. of
        `seq` (the engine thread; the text before it must already be decoded)."""
        ret = M.mtmd_encode_chunk(self.ptr, span.chunk)
        if ret != 0:
            raise BackendError(f"the projector could not encode the image (status {ret})")
        self.encodes += 1
        embd = M.mtmd_get_output_embd(self.ptr)
        new_past = C.llama_pos(0)
        ret = M.mtmd_helper_decode_image_chunk(
            self.ptr,
            ctx.ptr,
            span.chunk,
            embd,
            span.start,
            seq,
            ctx.params.n_batch,
            ctypes.byref(new_past),
            _NO_CALLBACK,
            None,
        )
        if ret != 0:
            raise BackendError(f"decoding the image's embeddings failed (status {ret})")

    def close(self) -> None:
        if self.ptr:
            M.mtmd_free(self.ptr)
            self.ptr = None
