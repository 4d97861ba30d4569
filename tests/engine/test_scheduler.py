"""KV-cache reuse, context shifting and continuous batching keep outputs exact."""

from __future__ import annotations

import math
import time

from innkeeper.engine.engine import Engine
from innkeeper.engine.events import TokenEvent
from tests.engine.conftest import Runner, flush

SYSTEM = (
    "You are Seraphina, the guardian of an enchanted forest. You speak gently and describe "
    "the forest in vivid detail. Stay in character at all times. " * 4
)
WORDS = [
    "river",
    "stone",
    "lantern",
    "moss",
    "owl",
    "bridge",
    "candle",
    "thorn",
    "meadow",
    "storm",
    "ember",
    "willow",
]


def message(i: int) -> str:
    return f"\nUser: Tell me about the {WORDS[i % len(WORDS)]} number {i}, and what it means to you.\nSeraphina: The {WORDS[(i * 5) % len(WORDS)]} is old and quiet, like the forest itself."


def chat(first: int, last: int, tail: str = "\nUser: What should I do next?\nSeraphina:") -> str:
    return SYSTEM + "".join(message(i) for i in range(first, last)) + tail


def cold_run(cold: Runner, prompt: list[int], max_tokens: int, **kw):
    flush(cold.engine)
    return cold.run(prompt, max_tokens, **kw)


def same_prefix_tokens(got: list[TokenEvent], want: list[TokenEvent]) -> int:
    a = [lp.token for e in got for lp in e.logprobs]
    b = [lp.token for e in want for lp in e.logprobs]
    return next(
        (i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
    )


def first_drift(got: list[TokenEvent], want: list[TokenEvent]) -> float:
    a = {t.token: t.logprob for t in got[0].logprobs[0].top}
    b = {t.token: t.logprob for t in want[0].logprobs[0].top}
    return max(abs(a[t] - b[t]) for t in a.keys() & b.keys())


def test_growing_chat_reuses_the_prefix_and_matches_cold(
    runner: Runner, cold: Runner, engine: Engine
) -> None:
    """Prefix reuse evaluates only the new turn. Its logits equal a cold evaluation's up to
    float rounding (a prefix evaluated in other batch shapes rounds differently)."""
    flush(engine)
    tok = engine.tokenize
    first = tok(chat(0, 6))
    _, fin1, _ = runner.run(first, 16)
    assert fin1.timings.cached_tokens == 0
    second = tok(chat(0, 7))
    _, fin2, got = runner.run(second, 16, n_logprobs=5)
    shared = next(i for i, (a, b) in enumerate(zip(first, second, strict=False)) if a != b)
    assert fin2.timings.cached_tokens >= shared - 1
    assert fin2.timings.evaluated_tokens <= len(second) - shared + 1
    _, _, want = cold_run(cold, second, 16, n_logprobs=5)
    assert same_prefix_tokens(got, want) >= 8
    assert first_drift(got, want) < 0.3  # rounding noise of the quantized CPU kernels: ~0.1-0.2


def test_regenerate_reuses_everything(runner: Runner, engine: Engine) -> None:
    flush(engine)
    prompt = engine.tokenize(chat(0, 5))
    a, _, _ = runner.run(prompt, 16)
    b, fin, _ = runner.run(prompt, 16)
    assert a == b
    assert fin.timings.cached_tokens == len(prompt) - 1  # only the last token is re-evaluated


def test_top_trim_shifts_the_cache_and_output_matches_cold(
    runner: Runner, cold: Runner, engine: Engine
) -> None:
    """SillyTavern drops the oldest messages once the context is full; the rest moves left."""
    flush(engine)
    tok = engine.tokenize
    full = tok(chat(0, 12))
    runner.run(full, 8)
    trimmed = tok(chat(4, 12, "\nUser: And now?\nSeraphina:"))
    text, fin, events = runner.run(trimmed, 24, n_logprobs=5)
    system_len = len(tok(SYSTEM))
    # far more than the shared system prompt came from the cache
    assert fin.timings.cached_tokens > system_len + 100
    assert fin.timings.evaluated_tokens < 40
    ref_text, ref_fin, ref_events = cold_run(cold, trimmed, 24, n_logprobs=5)
    assert ref_fin.timings.cached_tokens == 0
    # Shifting is approximate by nature (the kept messages were encoded while the dropped
    # ones were still there, as with KoboldCpp's ContextShift): greedy output agrees with a
    # cold evaluation for its first tokens and the first distribution stays close.
    got = [lp for e in events for lp in e.logprobs]
    want = [lp for e in ref_events for lp in e.logprobs]
    same = next(
        (i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a.token != b.token),
        len(want),
    )
    assert same >= 8, f"greedy output diverged after {same} tokens: {text!r} vs {ref_text!r}"
    first = {t.token: t.logprob for t in got[0].top}
    ref_first = {t.token: t.logprob for t in want[0].top}
    drift = max(abs(first[t] - ref_first[t]) for t in first.keys() & ref_first.keys())
    assert drift < 1.0, f"first-token logprob drift {drift:.3f}"


def test_exact_mode_without_cache_reuse(cold: Runner, engine: Engine) -> None:
    """--cache-reuse 0: only the common prefix is reused, and the output equals cold."""
    tok = cold.engine.tokenize
    flush(cold.engine)
    cold.run(tok(chat(0, 12)), 8)
    trimmed = tok(chat(4, 12, "\nUser: And now?\nSeraphina:"))
    text, fin, _ = cold.run(trimmed, 24)
    assert fin.timings.cached_tokens < len(tok(SYSTEM)) + 20  # the common prefix only
    ref, _, _ = cold_run(cold, trimmed, 24)
    assert text == ref


def test_concurrent_requests_match_sequential(runner: Runner, engine: Engine) -> None:
    flush(engine)
    prompts = [engine.tokenize(f"Story number {i}: once upon a time") for i in range(4)]
    sequential = [runner.run(p, 20, ignore_eos=True)[0] for p in prompts]
    flush(engine)
    jobs = [runner.submit(p, 20, ignore_eos=True) for p in prompts]
    for _, done, _ in jobs:
        assert done.wait(120)
    batched = [events[-1].text for _, _, events in jobs]
    assert batched == sequential
    assert engine.stats().perf.decode_steps > 0


def test_more_requests_than_slots_queue_fairly(runner: Runner, engine: Engine) -> None:
    n = engine.stats().slots + 2
    jobs = [
        runner.submit(engine.tokenize(f"Queue test {i}:"), 8, ignore_eos=True) for i in range(n)
    ]
    for _, done, _ in jobs:
        assert done.wait(120)
    assert all(events[-1].reason == "length" for _, _, events in jobs)
    stats = engine.stats()
    assert stats.busy_slots == 0 and stats.queued == 0


def test_cancel_stops_within_a_step(runner: Runner, engine: Engine) -> None:
    req, done, events = runner.submit(engine.tokenize("A long tale:"), 2000, ignore_eos=True)
    deadline = time.monotonic() + 30
    while not any(getattr(e, "text", "") for e in events):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    req.cancel()
    t0 = time.monotonic()
    assert done.wait(5)
    assert time.monotonic() - t0 < 1.0
    assert events[-1].reason == "abort"
    assert engine.stats().busy_slots == 0


def test_stats_show_a_running_request_and_cancel_all_ends_it(
    runner: Runner, engine: Engine
) -> None:
    flush(engine)
    before = engine.stats()
    assert (before.slots, before.busy_slots, before.queued) == (4, 0, 0)
    assert before.slot_cells == (0, 0, 0, 0)
    assert (before.threads, before.threads_batch) == (1, 1)  # conftest's --threads 1
    prompt = engine.tokenize("A long tale:")
    _, done, events = runner.submit(prompt, 2000, ignore_eos=True)
    deadline = time.monotonic() + 30
    while not any(isinstance(e, TokenEvent) for e in events):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    during = engine.stats()
    assert during.busy_slots == 1 and during.queued == 0
    cells = sorted(during.slot_cells)
    # one slot holds the prompt and what it generated so far; the others hold nothing
    assert cells[:-1] == [0, 0, 0] and cells[-1] >= len(prompt)
    assert engine.cancel_all() == 1
    assert done.wait(5) and events[-1].reason == "abort"
    after = engine.stats()
    assert after.busy_slots == 0
    assert after.perf.total_requests == before.perf.total_requests + 1
    assert after.perf.total_aborted == before.perf.total_aborted + 1
    assert after.perf.decode_steps > before.perf.decode_steps  # `before` is a snapshot


def test_long_prompt_prefill_does_not_freeze_running_streams(
    runner: Runner, engine: Engine
) -> None:
    """Chunked prefill: a stream keeps producing tokens while a long prompt is evaluated."""
    flush(engine)
    req, done, events = runner.submit(engine.tokenize("Counting:"), 400, ignore_eos=True)
    while len(events) < 3:
        time.sleep(0.01)
    long_prompt = engine.tokenize(" ".join(WORDS * 120))  # ~1500 tokens: several chunks
    _, long_done, _long_events = runner.submit(long_prompt, 2)
    n_before = len(events)
    assert long_done.wait(120)
    tokens_during_prefill = len(events) - n_before
    req.cancel()
    done.wait(10)
    # with 512-token chunks the first stream got a token every chunk
    assert tokens_during_prefill >= math.floor(len(long_prompt) / 512)


def test_context_full_ends_with_length(engine: Engine) -> None:
    from tests.engine.conftest import make_engine

    small = make_engine(ctx_size=256, parallel=1)
    try:
        r = Runner(small)
        _text, fin, _ = r.run(small.tokenize("Go on forever:"), 10_000, ignore_eos=True)
        assert fin.reason == "length"
        assert fin.timings.prompt_tokens + fin.timings.completion_tokens <= 256
    finally:
        small.close()


def test_quantized_kv_cache_with_flash_attention() -> None:
    """--cache-type q8_0/q4_0 (which need flash attention) load and generate sensibly."""
    from tests.engine.conftest import make_engine

    outputs = {}
    for cache in ("f16", "q8_0", "q4_0"):
        e = make_engine(
            ctx_size=512, parallel=1, flash_attn="on", cache_type_k=cache, cache_type_v=cache
        )
        try:
            text, fin, _ = Runner(e).run(e.tokenize("The capital of France is"), 6)
            outputs[cache] = text
            assert fin.reason in ("length", "stop")
        finally:
            e.close()
    assert "Paris" in outputs["f16"] and "Paris" in outputs["q8_0"]
    assert outputs["q4_0"].strip()


def test_idle_conversations_are_parked_in_ram_and_restored(
    runner: Runner, cold: Runner, engine: Engine
) -> None:
    """Switching between two chats: the idle one leaves the shared cache while the other
    decodes (so it costs the active one nothing) and comes back without re-evaluation."""
    flush(engine)
    a = engine.tokenize(chat(0, 8))
    b = engine.tokenize("A completely different conversation about cooking pasta. " * 20)
    runner.run(a, 8)
    runner.run(b, 8)
    assert any(p.tokens[:50] == a[:50] for p in engine.scheduler.stash.parked)
    live = sum(len(s.cache) for s in engine.scheduler.slots)
    assert live <= len(b) + 8  # only the active conversation occupies the cache
    _, fin, got = runner.run(a, 16, n_logprobs=5)
    assert fin.timings.cached_tokens == len(a) - 1
    _, _, want = cold_run(cold, a, 16, n_logprobs=5)
    assert same_prefix_tokens(got, want) >= 8
    assert first_drift(got, want) < 0.3  # rounding noise of the quantized CPU kernels: ~0.1-0.2


def test_a_short_chat_is_parked_too(runner: Runner, engine: Engine) -> None:
    """Each slot remembers its tokens however few they are: a short chat left idle while
    another one decodes is parked in RAM (it used to be dropped under 64 tokens) and comes
    back without being evaluated again."""
    flush(engine)
    a = engine.tokenize("User: Hi! Who are you?\nAssistant:")
    b = engine.tokenize("A completely different conversation about cooking pasta. " * 20)
    runner.run(a, 8)
    runner.run(b, 8)  # `a` sits idle while `b` decodes
    parked = [p for p in engine.scheduler.stash.parked if p.tokens[: len(a)] == a]
    assert parked and len(parked[0].tokens) < 32
    _, fin, _ = runner.run(a, 8)
    assert fin.timings.cached_tokens == len(a) - 1
