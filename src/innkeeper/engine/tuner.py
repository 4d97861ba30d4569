"""One tune of one model file: plan, search, save the winner as a profile, report.

`innkeeper tune` and the page's "Tune" (serving/tune_jobs.py) both run this: the memory plan
says whether the model fits and what `serve` would run (context, GPU layers), engine/tune.py
searches from there measuring each candidate in a child process (engine/speed.py), and the
winner is written as this model's profile for this machine (models/profiles.py), atomically
and only at the end, so an interrupted or cancelled tune leaves nothing behind.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from innkeeper.engine.planning import planned_engine
from innkeeper.engine.speed import Cancelled, Speed, measure_speed
from innkeeper.engine.tune import Progress, TuneResult, build_id, expand, search
from innkeeper.models.gguf_meta import read_gguf_spec
from innkeeper.models.hardware import Hardware, format_size
from innkeeper.models.memory import auto_settings
from innkeeper.models.profiles import Profile, hardware_fingerprint, model_identity, save_profile
from innkeeper.settings.engine import EngineConfig


class DoesNotFit(Exception):
    """The model does not fit this machine even with serve's defaults: nothing to tune."""


class TuneFailed(Exception):
    """serve's own defaults could not be measured (the model does not load or run)."""


@dataclass
class Tuned:
    """A finished tune: the search's trials, the profile saved and where."""

    result: TuneResult
    profile: Profile
    saved: Path
    budget_s: float
    seconds: float

    def to_json(self) -> dict[str, Any]:
        """`innkeeper tune --json`'s document; its keys are a stable interface."""
        r = self.result
        gain = {k: r.gain(a) for k, a in (("prompt", "prompt_tps"), ("decode", "decode_tps"))}
        return {
            "model": self.profile.model_path,
            "ctx_size": self.profile.ctx_size,
            "parallel": self.profile.parallel,
            "budget_s": self.budget_s,
            "seconds": round(self.seconds, 1),
            "stopped_by_budget": r.stopped_by_budget,
            "trials": [t.to_json() for t in r.trials],
            "default": r.default.to_json(),
            "winner": r.winner.to_json(),
            "gain": {k: round(v, 3) if v else None for k, v in gain.items()},
            "profile": {"path": str(self.saved), "settings": self.profile.settings},
            "fingerprint": self.profile.fingerprint,
        }


def tune_model(
    path: Path,
    cfg: EngineConfig,
    hw: Hardware,
    *,
    budget_s: float,
    allow_kv_quant: bool = False,
    n_prompt: int = 256,
    n_gen: int = 32,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> Tuned:
    """Tune `path` (a GGUF file) from `cfg` (serve's settings: context, parallel…) on `hw`.

    Raises DoesNotFit, TuneFailed, engine/speed.py's Cancelled when `cancel` is set, and
    lets KeyboardInterrupt through; in every one of those cases nothing was saved.
    """
    started = time.monotonic()
    spec = read_gguf_spec(path)
    auto = auto_settings(cfg, hw, spec=spec)
    if not auto.plan.fits:
        raise DoesNotFit(
            f"{path.name} does not fit this machine at context {auto.ctx_size:,} "
            f"({auto.plan.verdict_text}: {format_size(auto.plan.total_bytes)} needed), so there "
            "is nothing to tune; see `innkeeper fit` for what would fit"
        )
    base = planned_engine(cfg, auto)
    build = build_id()

    def measure(c: EngineConfig, floor: Speed | None, timeout: float) -> Speed:
        return measure_speed(
            c, n_prompt=n_prompt, n_gen=n_gen, floor=floor, timeout=timeout, cancel=cancel
        )

    result = search(
        base,
        spec,
        hw,
        measure=measure,
        budget_s=budget_s,
        gpu_layers=base.gpu_layers or 0,
        offload=bool(base.gpu_layers),
        allow_kv_quant=allow_kv_quant,
        progress=progress,
    )
    if result.default.status != "ok":
        raise TuneFailed(
            f"cannot measure {path.name} with serve's defaults: {result.default.error}"
        )
    w, d = result.winner.speed, result.default.speed
    speed = {
        "prompt_tps": w.prompt_tps if w else 0.0,
        "decode_tps": w.decode_tps if w else 0.0,
        "default_prompt_tps": d.prompt_tps if d else 0.0,
        "default_decode_tps": d.decode_tps if d else 0.0,
    }
    profile = Profile(
        model_path=str(path.resolve()),
        model=model_identity(path),
        fingerprint=hardware_fingerprint(build),
        settings=expand(result.winner.changes),
        ctx_size=int(base.ctx_size or 0),
        parallel=base.parallel,
        speed={k: round(v, 2) for k, v in speed.items()},
        tuned_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    if cancel is not None and cancel.is_set():  # cancelled during the last trial's bookkeeping
        raise Cancelled("cancelled")
    saved = save_profile(profile)
    return Tuned(result, profile, saved, budget_s, time.monotonic() - started)
