"""The search behind `innkeeper tune`: coordinate descent over the engine's settings.

Start from what `serve` would run (its defaults and the memory plan's context and GPU
layers), measure that, then vary one setting at a time, keeping a value only when it is
clearly faster, in the order the settings usually matter most: GPU layers, MoE experts in RAM,
KV offload, threads, prompt threads, flash attention, micro-batch, batch, KV cache types (only
when allowed: they change output quality). A candidate the memory plan says will not fit is
skipped unmeasured; one that is clearly slower is cut short (see engine/speed.py). The search
stops when the time budget would run out, keeping time to measure the winner and the
defaults once more, back to back: the winner is kept only if it is still at least as fast
there, so `tune` never recommends something slower than `serve`'s defaults.

The candidates are values of EngineConfig fields, named by their declarations (flags and
choices come from settings/engine.py); the few numbers tried per field are this module's.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from innkeeper.engine.speed import Speed, SpeedError
from innkeeper.models.hardware import Hardware
from innkeeper.models.memory import MemorySettings, plan_memory
from innkeeper.models.memory.settings import flash_attn_enabled
from innkeeper.models.spec import ModelSpec
from innkeeper.settings import ConfigError, settings_of, shorthands_of
from innkeeper.settings.engine import CACHE_TYPE_NAMES, EngineConfig

BETTER = 1.03  # a change is kept only when its score beats the best by this factor (noise)
KV_QUANT_TRIED = ("q8_0", "q4_0")  # of the declared quantized cache types, the two people use
_DECLARED = {f.name for f, _ in settings_of(EngineConfig)} | {
    s.name for s in shorthands_of(EngineConfig)
}


@dataclass
class Trial:
    """One candidate: the settings changed from the defaults, and what came of them."""

    changes: dict[str, Any]
    status: str  # "ok", "early-stop", "failed", "no-fit"
    speed: Speed | None = None
    memory_bytes: int = 0  # the memory plan's total for these settings
    error: str = ""
    note: str = ""  # "default", "winner", "confirm" …

    def score(self, parallel: int) -> float:
        """Geometric mean of prompt, decode (and aggregate) speed: each counts alike."""
        s = self.speed
        if s is None or self.status != "ok":
            return 0.0
        parts = [s.prompt_tps, s.decode_tps]
        if parallel > 1 and s.aggregate_tps:
            parts.append(s.aggregate_tps)
        if min(parts) <= 0:
            return 0.0
        return math.exp(sum(math.log(p) for p in parts) / len(parts))

    def to_json(self) -> dict[str, Any]:
        s = self.speed
        return {
            "settings": dict(self.changes),
            "flags": flag_text(self.changes),
            "status": self.status,
            "note": self.note,
            "prompt_tps": round(s.prompt_tps, 2) if s else None,
            "decode_tps": round(s.decode_tps, 2) if s else None,
            "aggregate_tps": round(s.aggregate_tps, 2) if s and s.aggregate_tps else None,
            "memory_bytes": self.memory_bytes,
            "rss_bytes": s.rss_bytes if s else None,
            "seconds": round(s.seconds, 2) if s else None,
            "error": self.error,
        }


@dataclass
class TuneResult:
    """What a search found; `default` and `winner` are the back-to-back measurements."""

    default: Trial  # serve's defaults, as confirmed at the end
    winner: Trial  # the best, as confirmed at the end (the default when nothing beat it)
    trials: list[Trial] = field(default_factory=list)  # every candidate in the order tried
    stopped_by_budget: bool = False

    def gain(self, attr: str) -> float | None:
        """How many times faster the winner is than the defaults (1.0: the same)."""
        a = getattr(self.winner.speed, attr, None) if self.winner.speed else None
        b = getattr(self.default.speed, attr, None) if self.default.speed else None
        return a / b if a and b else None


def _physical_cores() -> int:
    """What `--threads 0` means (engine/backend.py; imported late: it loads llama.cpp, and the
    CLI imports this module for every command)."""
    from innkeeper.engine.backend import default_threads

    return default_threads()


def build_id() -> str:
    """The llama.cpp in use, for the hardware fingerprint: package version and CPU features."""
    from importlib.metadata import PackageNotFoundError, version

    from innkeeper.engine.backend import system_info

    try:
        pkg = version("llama-cpp-python")
    except PackageNotFoundError:
        pkg = "unknown"
    return f"llama-cpp-python {pkg}; {system_info().strip()}"


def expand(changes: dict[str, Any]) -> dict[str, Any]:
    """`changes` as EngineConfig fields: the `cache_type` shorthand becomes K and V."""
    values = dict(changes)
    if "cache_type" in values:
        kind = values.pop("cache_type")
        values["cache_type_k"] = values["cache_type_v"] = kind
    return values


def dimensions(
    base: EngineConfig,
    spec: ModelSpec,
    gpu_layers: int,
    offload: bool,
    allow_kv_quant: bool,
) -> list[tuple[str, list[Any]]]:
    """Each setting worth varying on this machine with the values to try, in search order.

    `gpu_layers` is the plan's (the most that fit); `offload` whether this llama.cpp build
    can use a GPU at all. Values equal to the defaults are left out (they are measured first).
    """
    phys = _physical_cores()
    logical = os.cpu_count() or phys
    threads = sorted({1, max(1, phys // 2), phys, logical})
    dims: list[tuple[str, list[Any]]] = []
    if offload and gpu_layers > 0:
        below = [gpu_layers - d for d in (1, 2, 4, 8) if gpu_layers - d >= 0]
        dims.append(("gpu_layers", below))
        if spec.is_moe:
            n = spec.n_layer
            dims.append(("n_cpu_moe", sorted({max(1, n // 8), max(1, n // 4), max(1, n // 2)})))
        dims.append(("kv_offload", [not base.kv_offload]))
    # threads first: on a CPU shared with other work, fewer threads often win by far
    dims.append(("threads", [t for t in threads if t != (base.threads or phys)]))
    dims.append(("threads_batch", [t for t in threads if t != (base.threads_batch or phys)]))
    # "auto" resolves to on or off: try only the other one
    auto_on = flash_attn_enabled(base.flash_attn, spec.architecture)
    dims.append(("flash_attn", ["off" if auto_on else "on"]))
    dims.append(("ubatch_size", [u for u in (128, 256, 1024) if u != base.ubatch_size]))
    dims.append(("batch_size", [b for b in (512, 1024) if b != base.batch_size]))
    if allow_kv_quant:
        quant = [q for q in KV_QUANT_TRIED if q in CACHE_TYPE_NAMES]
        dims.append(("cache_type", quant))
    unknown = [name for name, _ in dims if name not in _DECLARED]
    if unknown:  # a programming error: candidates must be declared settings
        raise ConfigError(f"tune varies undeclared settings: {unknown}")
    return [(n, v) for n, v in dims if v]


def effective(cfg: EngineConfig) -> EngineConfig:
    """`cfg` with its "automatic" thread counts spelled out, to tell equal candidates apart."""
    threads = cfg.threads or _physical_cores()
    return replace(cfg, threads=threads, threads_batch=cfg.threads_batch or threads)


def flag_text(changes: dict[str, Any]) -> str:
    """Changes as `serve` flags, shortest spelling: `-fa off -t 1 -ub 256`."""
    specs = {f.name: spec for f, spec in settings_of(EngineConfig)}
    specs.update({s.name: s.spec for s in shorthands_of(EngineConfig)})
    out = []
    for name, value in changes.items():
        flags = specs[name].flags
        if isinstance(value, bool):
            side = 0 if value else 1
            spelled = [f.split("/")[side] for f in flags if "/" in f] or list(flags)
            out.append(min(spelled, key=len))
        else:
            out.append(f"{min(flags, key=len)} {value}")
    return " ".join(out) or "serve's defaults"


def apply(cfg: EngineConfig, changes: dict[str, Any]) -> EngineConfig:
    """`cfg` with `changes`; `cache_type` (the declared shorthand) sets K and V."""
    return replace(cfg, **expand(changes))


Measure = Callable[[EngineConfig, Speed | None, float], Speed]
Progress = Callable[[Trial, float], None]


def search(
    base: EngineConfig,
    spec: ModelSpec,
    hw: Hardware,
    *,
    measure: Measure,
    budget_s: float,
    gpu_layers: int,
    offload: bool,
    allow_kv_quant: bool = False,
    progress: Progress | None = None,
) -> TuneResult:
    """Coordinate descent from `base` (serve's settings with the plan's context and layers).

    `measure(cfg, floor, timeout_s)` runs one candidate (engine/speed.py in a child process),
    cutting it short when clearly slower than `floor` (the best so far);
    `progress(trial, fraction_of_budget_used)` is told of each trial.
    """
    t0 = time.monotonic()
    parallel = base.parallel
    trials: list[Trial] = []
    durations: list[float] = []

    def run(changes: dict[str, Any], floor: Speed | None, note: str = "") -> Trial:
        cfg = apply(base, changes)
        try:
            plan = plan_memory(spec, MemorySettings(cfg, cfg.ctx_size or 0), hw, cfg.gpu_layers)
        except ConfigError as exc:
            trial = Trial(changes, "failed", error=str(exc), note=note)
        else:
            if not plan.fits:
                trial = Trial(changes, "no-fit", memory_bytes=plan.total_bytes, note=note)
            else:
                started = time.monotonic()
                try:
                    # never past the budget, but the defaults always get a full minute
                    left = max(budget_s - (started - t0), 60.0 if not trials else 5.0)
                    speed = measure(cfg, floor, left)
                except SpeedError as exc:
                    trial = Trial(changes, "failed", memory_bytes=plan.total_bytes, error=str(exc))
                else:
                    status = "early-stop" if speed.early_stop else "ok"
                    trial = Trial(changes, status, speed, plan.total_bytes, note=note)
                durations.append(time.monotonic() - started)
        trials.append(trial)
        if progress is not None:
            progress(trial, min(1.0, (time.monotonic() - t0) / budget_s))
        return trial

    def time_left_for(n: int) -> bool:
        each = statistics.median(durations) if durations else 0.0
        return time.monotonic() - t0 + each * n <= budget_s

    default = run({}, None, "default")
    if default.status != "ok":
        return TuneResult(default, default, trials)
    best, best_changes = default, {}
    stopped = False
    seen = {effective(base)}
    for name, values in dimensions(base, spec, gpu_layers, offload, allow_kv_quant):
        for value in values:
            key = effective(apply(base, {**best_changes, name: value}))
            if key in seen:  # the same run as one already measured (threads_batch 0 = threads)
                continue
            seen.add(key)
            if not time_left_for(3):  # this one, then the winner and the defaults again
                stopped = True
                break
            trial = run({**best_changes, name: value}, best.speed)
            if trial.score(parallel) > best.score(parallel) * BETTER:
                best, best_changes = trial, trial.changes
        if stopped:
            break
    if not best_changes:
        return TuneResult(default, default, trials, stopped)
    # Back to back, so both see the same machine load: keep the winner only if still faster.
    again = run(best_changes, None, "confirm")
    base_again = run({}, None, "confirm default")
    if again.score(parallel) >= base_again.score(parallel) > 0:
        return TuneResult(base_again, again, trials, stopped)
    return TuneResult(base_again, base_again, trials, stopped)
