"""The search of `innkeeper tune` (engine/tune.py): which candidates it tries, keeps and skips.

The speeds here are a made-up function of the settings, so the search's decisions can be
checked exactly; the real measurement (engine/speed.py, a child process running the engine)
is exercised by tests/cli/test_tune.py.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from innkeeper.engine.speed import Speed, SpeedError
from innkeeper.engine.tune import dimensions, effective, flag_text, search
from innkeeper.models.gguf_meta import read_gguf_spec
from innkeeper.models.hardware import Hardware
from innkeeper.models.memory import MemorySettings, plan_memory
from innkeeper.models.store import default_model_path
from innkeeper.settings.engine import EngineConfig

MODEL = default_model_path()
SPEC = read_gguf_spec(MODEL)
HW = Hardware(16 * 2**30, 16 * 2**30)
BASE = EngineConfig(Path(MODEL), ctx_size=512, parallel=1, gpu_layers=0)


def speed(prompt: float, decode: float) -> Speed:
    return Speed(prompt, decode, None, 0, 0.1)


def faster_with_one_thread_and_small_ubatch(cfg: EngineConfig, floor: object, t: float) -> Speed:
    prompt = 100.0 * (2 if cfg.ubatch_size == 256 else 1)
    decode = 50.0 * (1.5 if cfg.threads == 1 else 1)
    return speed(prompt, decode)


def test_keeps_what_is_clearly_faster_and_confirms_it() -> None:
    tried: list[dict[str, object]] = []
    result = search(
        BASE,
        SPEC,
        HW,
        measure=faster_with_one_thread_and_small_ubatch,
        budget_s=600,
        gpu_layers=0,
        offload=False,
        progress=lambda trial, used: tried.append(dict(trial.changes)),
    )
    assert result.winner.changes == {"threads": 1, "ubatch_size": 256}
    assert result.gain("prompt_tps") == 2.0 and result.gain("decode_tps") == 1.5
    notes = [t.note for t in result.trials]
    assert notes[0] == "default" and notes[-2:] == ["confirm", "confirm default"]
    assert tried[0] == {} and not result.stopped_by_budget
    # no GPU: GPU layers and KV offload are not tried; no KV quantization unless allowed
    names = {name for t in tried for name in t}
    assert not names & {"gpu_layers", "kv_offload", "n_cpu_moe", "cache_type"}


def test_nothing_faster_keeps_the_defaults_without_confirming() -> None:
    result = search(
        BASE,
        SPEC,
        HW,
        measure=lambda cfg, floor, t: speed(100, 50),
        budget_s=600,
        gpu_layers=0,
        offload=False,
    )
    assert result.winner is result.default and result.winner.changes == {}
    assert "confirm" not in [t.note for t in result.trials]


def test_never_slower_than_the_defaults_when_the_confirmation_disagrees() -> None:
    """A candidate that looked faster once but not back to back is dropped."""
    calls = {"n": 0}

    def noisy(cfg: EngineConfig, floor: object, t: float) -> Speed:
        calls["n"] += 1
        if cfg.threads == 1 and calls["n"] < 5:  # fast once, during the search
            return speed(200, 100)
        return speed(100, 50) if cfg.threads != 1 else speed(90, 45)

    result = search(BASE, SPEC, HW, measure=noisy, budget_s=600, gpu_layers=0, offload=False)
    assert result.winner is result.default and result.default.note == "confirm default"


def test_candidates_that_do_not_fit_are_not_measured() -> None:
    base = replace(BASE, ctx_size=4096)  # a larger micro-batch needs more compute buffer here

    def fits(cfg: EngineConfig, ram: int) -> bool:
        return plan_memory(SPEC, MemorySettings(cfg, 4096), Hardware(ram, ram), 0).fits

    lo, hi = 0, 16 * 2**30  # the least RAM the defaults fit in
    while hi - lo > 2**16:
        lo, hi = (lo, (lo + hi) // 2) if fits(base, (lo + hi) // 2) else ((lo + hi) // 2, hi)
    assert not fits(replace(base, ubatch_size=1024), hi)
    tight = Hardware(hi, hi)  # room for the defaults, not for -ub 1024
    measured: list[EngineConfig] = []

    def measure(cfg: EngineConfig, floor: object, t: float) -> Speed:
        measured.append(cfg)
        return speed(100, 50)

    result = search(base, SPEC, tight, measure=measure, budget_s=600, gpu_layers=0, offload=False)
    skipped = [t for t in result.trials if t.status == "no-fit"]
    assert skipped and all(t.speed is None for t in skipped)
    assert {"ubatch_size": 1024} in [t.changes for t in skipped]
    assert all(m.ubatch_size != 1024 for m in measured)


def test_a_failing_candidate_is_reported_and_the_search_goes_on() -> None:
    def measure(cfg: EngineConfig, floor: object, t: float) -> Speed:
        if cfg.flash_attn == "off":
            raise SpeedError("the measuring process died of signal 6")
        return faster_with_one_thread_and_small_ubatch(cfg, floor, t)

    result = search(BASE, SPEC, HW, measure=measure, budget_s=600, gpu_layers=0, offload=False)
    failed = [t for t in result.trials if t.status == "failed"]
    assert [t.changes for t in failed] == [{"threads": 1, "flash_attn": "off"}]
    assert "signal 6" in failed[0].error
    assert result.winner.changes == {"threads": 1, "ubatch_size": 256}


def test_the_budget_stops_the_search() -> None:
    result = search(
        BASE,
        SPEC,
        HW,
        measure=faster_with_one_thread_and_small_ubatch,
        budget_s=1e-6,
        gpu_layers=0,
        offload=False,
    )
    assert result.stopped_by_budget and [t.note for t in result.trials] == ["default"]


@pytest.mark.parametrize("moe", [False, True])
def test_gpu_dimensions(moe: bool) -> None:
    spec = replace(SPEC, n_expert=8 if moe else 0)
    dims = dict(dimensions(BASE, spec, gpu_layers=31, offload=True, allow_kv_quant=True))
    assert dims["gpu_layers"] == [30, 29, 27, 23]  # the most that fit is the default
    assert dims["kv_offload"] == [False]
    assert ("n_cpu_moe" in dims) is moe
    assert dims["cache_type"] == ["q8_0", "q4_0"]


def test_flag_text_and_effective_threads() -> None:
    assert flag_text({}) == "serve's defaults"
    assert flag_text({"threads": 1, "ubatch_size": 256}) == "-t 1 -ub 256"
    assert flag_text({"kv_offload": False, "cache_type": "q8_0"}) == "-nkvo --cache-type q8_0"
    one = replace(BASE, threads=1)
    assert effective(one) == effective(replace(one, threads_batch=1))
