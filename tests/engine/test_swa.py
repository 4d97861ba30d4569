"""Sliding-window models (Gemma 3 270M, window 512) at llama-server's memory, reuse intact.

The engine creates its context with swa_full off, so the sliding-window layers keep their
window (plus a ubatch) instead of the whole context. These tests check the memory llama.cpp
allocates, and that prompt reuse, regenerate and parking still give a cold evaluation's
output; where the window has moved past the shared prefix, a context checkpoint is restored
instead of the whole prompt being evaluated again.
"""

from __future__ import annotations

import logging
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from innkeeper.engine.engine import Engine, EngineConfig
from innkeeper.engine.slots import common_prefix
from tests.engine.conftest import Runner, flush

pytestmark = pytest.mark.slow  # starts real servers or browsers: not in `make test-fast`

WINDOW = 512
LLAMA_SERVER_KV_MIB = 61.5  # llama-server's log for this model at -c 8192 -np 4


def count_chat(first: int, last: int) -> str:
    """A chat whose replies are easy to predict (large logit margins), so greedy output does
    not flip on the float rounding that different batch shapes bring."""
    head = "A patient teacher helps a child count. Every answer lists five numbers.\n"
    turns = "".join(
        f"\nUser: Count from {i} to {i + 4}.\nAssistant: {i}, {i + 1}, {i + 2}, {i + 3}, {i + 4}."
        for i in range(first, last)
    )
    return head + turns + f"\nUser: Count from {last} to {last + 4}.\nAssistant:"


def gemma_engine(path: Path, **kw) -> Engine:
    cfg = {"model_path": path, "ctx_size": 4096, "threads": 1, "parallel": 2, **kw}
    return Engine(EngineConfig(**cfg))


@pytest.fixture(scope="module")
def gemma(gemma_path: Path) -> Iterator[Engine]:
    e = gemma_engine(gemma_path)
    yield e
    e.close()


@pytest.fixture(scope="module")
def gemma_cold(gemma_path: Path) -> Iterator[Engine]:
    """Same settings, one slot, flushed before each use: the cold reference."""
    e = gemma_engine(gemma_path, parallel=1)
    yield e
    e.close()


def cold_text(cold: Engine, prompt: list[int], n: int) -> str:
    flush(cold)
    text, fin, _ = Runner(cold).run(prompt, n)
    assert fin.timings.cached_tokens == 0
    return text


def assert_windowed(engine: Engine) -> None:
    """The engine runs with the window-sized cache (the default), not a full one."""
    assert engine.ctx.n_swa == WINDOW
    assert engine.ctx.partial_memory and not engine.ctx.can_shift


def kv_mib_from_log(path: Path, *flags: str) -> float:
    """KV bytes llama.cpp reports allocating (its `llama_kv_cache: size =` lines), in MiB."""
    code = (
        "import sys; from pathlib import Path;"
        "from innkeeper.engine.engine import Engine, EngineConfig;"
        "e = Engine(EngineConfig(model_path=Path(sys.argv[1]), ctx_size=8192, parallel=4,"
        " threads=1, swa_full=sys.argv[2] == 'full')); e.close()"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(path), *flags],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "INNKEEPER_LLAMA_LOG": "1"},
        check=True,
    )
    sizes = re.findall(r"llama_kv_cache: size =\s*([\d.]+) MiB", proc.stderr)
    assert sizes, proc.stderr[-2000:]
    return sum(float(x) for x in sizes)


def test_gemma_kv_at_8k_4_slots_is_llama_servers(gemma_path: Path) -> None:
    """144 MiB with the full-size window cache before; llama-server allocates 61.5 MiB."""
    assert kv_mib_from_log(gemma_path, "window") <= LLAMA_SERVER_KV_MIB
    assert kv_mib_from_log(gemma_path, "full") == 144.0  # --swa-full: today's cache


def test_growing_chat_over_the_window_reuses_and_matches_cold(
    gemma: Engine, gemma_cold: Engine
) -> None:
    assert_windowed(gemma)
    flush(gemma)
    runner = Runner(gemma)
    first = gemma.tokenize(count_chat(0, 40))
    assert len(first) > 2 * WINDOW
    runner.run(first, 12)
    second = gemma.tokenize(count_chat(0, 42))
    text, fin, _ = runner.run(second, 16)
    shared = common_prefix(first, second)
    assert fin.timings.cached_tokens >= shared - 1
    assert fin.timings.evaluated_tokens <= len(second) - shared + 1
    assert text == cold_text(gemma_cold, second, 16)


def test_regenerate_after_the_window_moved_restores_a_checkpoint(
    gemma: Engine, gemma_cold: Engine
) -> None:
    """The chat went on far past the window; going back to an earlier prompt restores the
    checkpoint saved near its end and evaluates a few tokens, not the whole prompt."""
    assert_windowed(gemma)
    flush(gemma)
    runner = Runner(gemma)
    earlier = gemma.tokenize(count_chat(0, 30))
    first_text, _, _ = runner.run(earlier, 16)
    later = gemma.tokenize(count_chat(0, 80))
    runner.run(later, 4)
    slot = next(s for s in gemma.scheduler.slots if s.cache[:50] == later[:50])
    # the memory no longer holds what continuing after `earlier` needs...
    assert gemma.ctx.seq_pos_min(slot.id) > len(earlier) - WINDOW
    text, fin, _ = runner.run(earlier, 16)
    # ...so a checkpoint 4 tokens before its end came back instead of a full evaluation
    assert fin.timings.evaluated_tokens <= 8, fin.timings
    assert text == first_text
    assert text == cold_text(gemma_cold, earlier, 16)


def test_parked_chat_over_the_window_comes_back_and_matches_cold(
    gemma: Engine, gemma_cold: Engine
) -> None:
    assert_windowed(gemma)
    flush(gemma)
    runner = Runner(gemma)
    a = gemma.tokenize(count_chat(0, 40))
    b = gemma.tokenize("A different conversation about baking bread at home. " * 60)
    runner.run(a, 8)
    runner.run(b, 4)
    assert any(p.tokens[:50] == a[:50] for p in gemma.scheduler.stash.parked)
    a2 = gemma.tokenize(count_chat(0, 41))
    text, fin, _ = runner.run(a2, 16)
    shared = common_prefix(a, a2)
    assert fin.timings.cached_tokens >= shared - 1
    assert text == cold_text(gemma_cold, a2, 16)


def test_without_a_checkpoint_the_whole_prompt_is_evaluated_and_logged(
    gemma: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """Positions the window forgot are never assumed: no checkpoint, no reuse (and a log)."""
    assert_windowed(gemma)
    flush(gemma)
    runner = Runner(gemma)
    earlier = gemma.tokenize(count_chat(0, 30))
    first_text, _, _ = runner.run(earlier, 16)
    later = gemma.tokenize(count_chat(0, 80))
    runner.run(later, 4)
    slot = next(s for s in gemma.scheduler.slots if s.cache[:50] == later[:50])
    assert gemma.ctx.seq_pos_min(slot.id) > len(earlier) - WINDOW
    slot.checkpoints.clear()  # as with --ctx-checkpoints 0
    with caplog.at_level(logging.INFO, logger="innkeeper.engine"):
        text, fin, _ = runner.run(earlier, 16)
    assert fin.timings.cached_tokens == 0
    assert text == first_text
    assert any("no checkpoint fits" in r.getMessage() for r in caplog.records)
