"""Images through the scheduler, checked against libmtmd's own evaluation of the same files.

The reference path is independent of innkeeper's engine: a plain llama.cpp context on which
libmtmd's helper (`mtmd_helper_eval_chunks`) evaluates the prompt, then a greedy loop of
single-token decodes. Innkeeper's path is the scheduler: image chunks decoded into a slot's
sequence beside other requests, prefix reuse over image markers.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Iterator
from pathlib import Path

import llama_cpp as C
import numpy as np
import pytest
from llama_cpp import mtmd_cpp as M

from innkeeper.engine.engine import Engine, EngineConfig
from innkeeper.engine.events import FinishEvent, GenerationRequest
from innkeeper.engine.sampling import SamplingParams
from innkeeper.engine.vision import MARKER, ImageInput, MediaPrompt, VisionError
from tests.engine.conftest import Runner, make_engine
from tests.models.vision_factory import N_IMAGE_TOKENS, TEXT_EMBD, write_pair, write_projector

PROMPT = f"<|im_start|>user\nWhat is in this picture? {MARKER}\nTell me.<|im_end|>\n<|im_start|>assistant\n"
N_GEN = 12


def image(seed: int, w: int = 48, h: int = 40) -> ImageInput:
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return ImageInput(w, h, rgb.tobytes())


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return write_pair(tmp_path_factory.mktemp("vision"))


@pytest.fixture(scope="module")
def engine(pair: tuple[Path, Path]) -> Iterator[Engine]:
    text, proj = pair
    e = Engine(EngineConfig(text, mmproj=proj, ctx_size=2048, threads=1, parallel=2))
    yield e
    e.close()


def reference(pair: tuple[Path, Path], text: str, img: ImageInput, n: int) -> list[int]:
    """Greedy tokens from libmtmd's helper on a fresh plain context (no innkeeper engine)."""
    model = C.llama_model_load_from_file(str(pair[0]).encode(), C.llama_model_default_params())
    cp = C.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_threads, cp.n_threads_batch = 1024, 512, 1, 1
    ctx = C.llama_init_from_model(model, cp)
    mp = M.mtmd_context_params_default()
    mp.use_gpu, mp.n_threads, mp.warmup = False, 1, False
    mctx = M.mtmd_init_from_file(str(pair[1]).encode(), model, mp)
    vocab = C.llama_model_get_vocab(model)
    n_vocab = C.llama_vocab_n_tokens(vocab)
    raw = text.encode()
    inp = M.mtmd_input_text(text=raw, text_len=len(raw), add_special=True, parse_special=True)
    data = (ctypes.c_ubyte * len(img.rgb)).from_buffer_copy(img.rgb)
    bm = M.mtmd_bitmap_init(img.width, img.height, data)
    chunks = M.mtmd_input_chunks_init()
    out: list[int] = []
    try:
        assert M.mtmd_tokenize(mctx, chunks, ctypes.byref(inp), (ctypes.c_void_p * 1)(bm), 1) == 0
        n_past = C.llama_pos(0)
        assert (
            M.mtmd_helper_eval_chunks(mctx, ctx, chunks, 0, 0, 512, True, ctypes.byref(n_past)) == 0
        )
        pos = n_past.value
        batch = C.llama_batch_init(1, 0, 1)
        for _ in range(n):
            logits = np.ctypeslib.as_array(C.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
            tok = int(np.argmax(logits))
            out.append(tok)
            if C.llama_vocab_is_eog(vocab, tok):
                break
            batch.n_tokens = 1
            batch.token[0], batch.pos[0], batch.n_seq_id[0] = tok, pos, 1
            batch.seq_id[0][0], batch.logits[0] = 0, True
            assert C.llama_decode(ctx, batch) == 0
            pos += 1
        C.llama_batch_free(batch)
    finally:
        M.mtmd_input_chunks_free(chunks)
        M.mtmd_bitmap_free(bm)
        M.mtmd_free(mctx)
        C.llama_free(ctx)
        C.llama_model_free(model)
    return out


def submit(engine: Engine, media: MediaPrompt, n: int = N_GEN) -> tuple[threading.Event, list]:
    """Queue a greedy request with images; the event is set when it finished."""
    events: list = []
    done = threading.Event()

    def on_event(ev) -> None:
        events.append(ev)
        if isinstance(ev, FinishEvent):
            done.set()

    req = GenerationRequest(media.tokens, SamplingParams(temperature=0.0), n, on_event, media=media)
    engine.submit(req)
    return done, events


def run(engine: Engine, text: str, images: list[ImageInput], n: int = N_GEN):
    done, events = submit(engine, engine.tokenize_media(text, images), n)
    assert done.wait(120)
    fin = events[-1]
    assert fin.reason != "error", fin.error
    return [t for e in events[:-1] for t in e.tokens], fin


def test_image_tokens_layout(engine: Engine) -> None:
    media = engine.tokenize_media(PROMPT, [image(1)])
    (span,) = media.spans
    assert span.end - span.start == N_IMAGE_TOKENS
    assert all(t < 0 for t in media.tokens[span.start : span.end])
    other = engine.tokenize_media(PROMPT, [image(2)])
    assert other.tokens[: span.start] == media.tokens[: span.start]
    assert other.tokens[span.start] != media.tokens[span.start]  # never a match
    # A cached prefix that ends inside an image is cut back to the image's start.
    assert media.image_start(span.start + 5) == span.start
    assert media.image_start(span.end) == span.end
    assert media.text_run(0) == span.start


def test_prompts_that_cannot_be_laid_out(engine: Engine) -> None:
    with pytest.raises(VisionError):  # nothing after the image to sample from
        engine.tokenize_media("look: " + MARKER, [image(1)])
    with pytest.raises(VisionError):  # one marker, two images
        engine.tokenize_media(PROMPT, [image(1), image(2)])


def test_greedy_matches_libmtmd_helper(engine: Engine, pair) -> None:
    img = image(3)
    want = reference(pair, PROMPT, img, N_GEN)
    got, _ = run(engine, PROMPT, [img])
    assert got == want[: len(got)] and len(got) == len(want)
    again, _ = run(engine, PROMPT, [img])
    assert again == got


def test_same_image_is_not_encoded_again(engine: Engine, pair) -> None:
    img = image(4)
    first, _ = run(engine, PROMPT, [img])
    before = engine.vision.encodes
    follow = PROMPT + engine.detokenize(first) + "<|im_end|>\n<|im_start|>user\nAnd?<|im_end|>\n"
    _, fin2 = run(engine, follow + "<|im_start|>assistant\n", [img])
    assert engine.vision.encodes == before  # the image came from the slot's cache
    assert fin2.timings.cached_tokens > N_IMAGE_TOKENS
    _, fin3 = run(engine, follow + "<|im_start|>assistant\n", [image(5)])
    assert engine.vision.encodes == before + 1
    # Reuse stopped at the first position of the different image.
    assert fin3.timings.cached_tokens <= PROMPT.index(MARKER) + 8


def test_second_turn_equals_a_cold_evaluation(engine: Engine, pair) -> None:
    """Reusing the cached image gives the tokens a fresh evaluation gives."""
    img = image(6)
    first, _ = run(engine, PROMPT, [img])
    follow = PROMPT + engine.detokenize(first) + "<|im_end|>\n<|im_start|>user\nMore<|im_end|>\n"
    follow += "<|im_start|>assistant\n"
    warm, _ = run(engine, follow, [img])
    assert warm == reference(pair, follow, img, N_GEN)[: len(warm)]


def test_text_only_requests_beside_images_are_unaffected(engine: Engine) -> None:
    runner = Runner(engine)
    text = engine.tokenize("<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n")
    alone, _, _ = runner.run(text, N_GEN)
    media = engine.tokenize_media(PROMPT, [image(7)])
    img_done, img_events = submit(engine, media)
    _, txt_done, txt_events = runner.submit(text, N_GEN)
    assert img_done.wait(120) and txt_done.wait(120)
    assert img_events[-1].reason != "error"
    assert txt_events[-1].text == alone


def test_a_model_without_projector_refuses_images() -> None:
    e = make_engine(parallel=1)
    try:
        with pytest.raises(VisionError):
            e.tokenize_media(PROMPT, [image(1)])
    finally:
        e.close()


def test_a_projector_that_does_not_fit_leaves_a_text_model(pair, tmp_path: Path) -> None:
    """libmtmd refuses a projector of another width: the model still serves text, and a
    request with images is told why it cannot have them."""
    wrong = write_projector(tmp_path / "mmproj-wrong.gguf", n_out=TEXT_EMBD * 2)
    e = Engine(EngineConfig(pair[0], mmproj=wrong, ctx_size=512, threads=1, parallel=1))
    try:
        assert e.vision is None
        with pytest.raises(VisionError, match=r"mmproj-wrong\.gguf"):
            e.tokenize_media(PROMPT, [image(1)])
        assert Runner(e).run(e.tokenize("hello"), 4)[1].reason != "error"
    finally:
        e.close()
