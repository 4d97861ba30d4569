"""bench/overhead.py on the embedded model: a short run gives sane per-thread figures.

The tool's numbers back the claims about per-token cost, so its plumbing (thread ids,
schedstat reads, decode timing, the profiler on both threads) must work; the values
themselves depend on the machine and are not asserted beyond being plausible.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import overhead  # noqa: E402


def test_a_short_run_measures_both_threads_and_profiles_them() -> None:
    argv = ["--tokens", "16", "--repeats", "2", "--profile", "--top", "8", "--time-handoff"]
    args = overhead.parse_args(argv)
    result = overhead.measure(args)
    assert result["tokens_per_run"] == 16  # greedy, ignore_eos: exactly what was asked
    med = result["median_per_token"]
    assert med["steps_per_token"] == 1.0  # one decode per token at one stream
    assert med["engine_in_decode_us"] > 0 and med["sampler_c_us"] > 0
    assert med["event_loop_us"] > 0 and med["engine_outside_decode_us"] > med["sampler_c_us"]
    assert 0 < med["deliver_us"] < med["engine_python_us"]
    # Thread CPU outside decode is far below the decode itself even for this tiny model.
    assert med["total_python_us"] < med["engine_in_decode_us"]
    prof = result["profile"]
    assert prof["tokens"] == 16
    engine_fns = " ".join(r["function"] for r in prof["engine_top"])
    assert "decode" in engine_fns
    assert prof["loop_calls_per_token"] > 0 and len(prof["loop_top"]) == 8
    text = overhead.render(result)
    assert "engine thread outside llama_decode" in text and "event-loop thread" in text
    assert "handing events to the loop" in text


def test_ollama_route_streams_too() -> None:
    args = overhead.parse_args(["--tokens", "8", "--repeats", "1", "--route", "ollama"])
    result = overhead.measure(args)
    assert result["tokens_per_run"] == 8


def test_the_peer_and_the_wake_floor_are_measured_in_the_same_rounds() -> None:
    """`--peer` on a second server (innkeeper itself here: CI has no llama-server build) and
    `--wake-floor` run next to every round; the figures and the paired differences exist and
    are plausible, and the peer's process is stopped afterwards."""
    from bench import servers
    from innkeeper.models.store import default_model_path

    args = overhead.parse_args(
        ["--tokens", "16", "--repeats", "2", "--peer", "--wake-floor", "--flash-attn", "off"]
    )
    spec = servers.innkeeper_spec(
        default_model_path(), threads=1, ctx_size=args.ctx_size, flash_attn="off", parallel=1
    )
    result = overhead.measure(args, peer_spec=spec)
    peer = result["peer"]
    assert len(peer["samples"]) == 2
    med = peer["median_per_token"]
    # The busiest thread of a server that decoded 16 tokens is its decode thread: far more
    # CPU per token than all its other threads together.
    assert med["decode_thread_us"] > med["other_threads_us"] > 0
    assert isinstance(peer["engine_minus_decode_thread_us"], float)
    assert result["wake_floor_us"] > 0 and result["step_ms"] > 0
    text = overhead.render(result)
    assert "waking a sleeping loop thread" in text and "paired differences" in text
    with_port = [c for c in spec.cmd if c == str(spec.port)]
    assert with_port  # the peer was this spec's server
    import httpx

    try:
        httpx.get(f"{spec.url}/health", timeout=2)
    except httpx.TransportError:
        pass
    else:
        raise AssertionError("the peer server was left running")


def test_compare_shortcuts_runs_plain_chains_in_the_same_rounds() -> None:
    """--compare-shortcuts alternates runs with llama.cpp's plain chains; the switch is back
    on afterwards, and the sampler settings reach the requests (a penalty: shortcuts run)."""
    from innkeeper.engine.sampling import SamplerChain

    args = overhead.parse_args(
        ["--tokens", "16", "--repeats", "2", "--compare-shortcuts", "--sampling", "rep-pen"]
    )
    result = overhead.measure(args)
    plain = result["plain_chains"]
    assert len(plain["samples"]) == 2 and plain["median_per_token"]["sampler_c_us"] > 0
    assert isinstance(plain["sampling_difference_us"], float)
    assert SamplerChain.SHORTCUTS is True
    assert result["sampling"] == "rep-pen"
    text = overhead.render(result)
    assert "rep-pen sampling" in text and "shortcuts minus plain" in text
