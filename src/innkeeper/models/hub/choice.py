"""Which GGUF variant `inspect`, `fit` and `pull` mean, by one rule: a named file or quant wins,
else the largest (least quantized) variant that fits this machine by the memory plan with serve's
settings, else `DEFAULT_QUANT`."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from innkeeper.models.filenames import normalize_quant
from innkeeper.models.hub.errors import HubError, QuantNotFoundError
from innkeeper.models.hub.variants import Variant, match_quant
from innkeeper.models.spec import ModelFormatError, ModelSpec

if TYPE_CHECKING:
    from innkeeper.models.hardware import Hardware
    from innkeeper.models.memory import MemoryPlan, MemorySettings

DEFAULT_QUANT = "Q4_K_M"
"""What the automatic choice takes when nothing fits, or this machine's memory is unknown.

The 4-bit K-quant llama.cpp's docs, Ollama and most GGUF repos treat as the default: the
smallest file most people accept the quality of. A repo without one gets its smallest file.
"""


@dataclass(frozen=True)
class Machine:
    """What the automatic choice plans for: memory settings on some hardware.

    `ctx_size` None is serve's smallest automatic context (2048, or the trained context if
    smaller): a file fits when `serve`, which lowers the context down to that floor to fit,
    would run it without swapping.
    """

    hardware: Hardware
    settings: MemorySettings
    ctx_size: int | None = None
    gpu_layers: int | None = None

    @classmethod
    def for_serve(cls, hardware: Hardware, ctx_size: int | None = None) -> Machine:
        """`serve`'s defaults (EngineConfig: 4 slots sharing one f16 KV cache, flash attention
        auto…) on `hardware`, mapped by the same function `serve` plans with."""
        from innkeeper.models.memory import memory_settings
        from innkeeper.settings.engine import EngineConfig

        return cls(hardware, memory_settings(EngineConfig(model_path=Path())), ctx_size)

    def context(self, spec: ModelSpec | None) -> int:
        from innkeeper.models.memory import default_ctx_candidates

        if self.ctx_size:
            return self.ctx_size
        return default_ctx_candidates(spec.context_length if spec else 0)[-1]

    def plan(self, spec: ModelSpec | None, file_bytes: int) -> MemoryPlan:
        """The plan for a file of this size; `spec` is any quantization of the same model."""
        from innkeeper.models.memory import plan_for_files

        settings = replace(self.settings, ctx_size=self.context(spec))
        return plan_for_files(spec, file_bytes, settings, self.hardware, self.gpu_layers)

    def describe(self, spec: ModelSpec | None, need: int | None = None) -> str:
        """The plan in words; with `need` (the chosen plan's bytes) it leads with how much of
        this machine the model takes: `7.2 GiB of 24 GiB RAM + 12 GiB VRAM (…)`."""
        from innkeeper.models.hardware import format_size

        s, hw = self.settings, self.hardware
        where = f"{format_size(hw.ram_available_bytes)} RAM"
        if hw.gpus:
            where += f" + {format_size(sum(g.free_bytes for g in hw.gpus))} VRAM"
        plan = (
            f"memory plan at context {self.context(spec)}, {s.engine.parallel} slot(s),"
            f" KV {s.engine.cache_type_k}/{s.engine.cache_type_v}"
        )
        guess = ", model shape estimated from its size" if spec is None else ""
        if need is not None:
            return f"{format_size(need)} of {where} ({plan}{guess})"
        return f"{plan}, on {where}{guess}"


def detected_machine() -> Machine | None:
    """`serve`'s defaults on this machine; None when its memory cannot be read (unknown)."""
    from innkeeper.models.hardware import detect_hardware

    try:
        hw = detect_hardware()
    except Exception:  # psutil's errors differ by platform; unknown memory is not a failure
        return None
    return Machine.for_serve(hw)


@dataclass(frozen=True)
class Choice:
    """The variant picked, why (one line for the user), and its header if the choice read it."""

    variant: Variant
    reason: str
    spec: ModelSpec | None = field(default=None, compare=False)


def _fallback(pool: Sequence[Variant]) -> tuple[Variant, str]:
    for v in pool:
        if v.label.upper() == DEFAULT_QUANT:
            return v, f"the default {DEFAULT_QUANT}"
    for v in pool:
        if v.label.upper().removeprefix("UD-") == DEFAULT_QUANT:
            return v, f"the default {DEFAULT_QUANT}"
    return pool[0], f"the smallest file (there is no {DEFAULT_QUANT})"


def choose(
    variants: Sequence[Variant],
    *,
    where: str,
    quant: str | None = None,
    filename: str | None = None,
    machine: Machine | None = None,
    read_spec: Callable[[Variant], ModelSpec] | None = None,
) -> Choice:
    """Which GGUF variant `inspect`, `fit` and `pull` mean: the one policy for all three.

    A named file (`repo/file.gguf`) or quant (`repo:QUANT`) always wins. Otherwise the complete
    variants are planned from the largest (least quantized) down and the first that fits
    `machine` wins; none fitting, or no machine (memory unknown), gives `DEFAULT_QUANT`. The
    model's shape comes from the largest variant's header (`read_spec`); an unreadable one
    leaves the plan to estimate it from the file sizes. Incomplete variants are chosen only
    when there is nothing else (`inspect` then says what is missing; `pull` refuses them).
    """
    if not variants:
        raise QuantNotFoundError(f"{where} has no GGUF files")
    if filename is not None:
        for v in variants:
            if any(f.path == filename for f in v.files):
                return Choice(v, f"{filename} named")
        raise QuantNotFoundError(f"{where} has no GGUF file {filename!r}")
    if quant is not None:
        return Choice(match_quant(where, quant, variants), f"{normalize_quant(quant)} asked for")
    pool = [v for v in variants if not v.missing_shards] or list(variants)
    fallback, fallback_why = _fallback(pool)
    if machine is None:
        return Choice(fallback, f"{fallback_why}: this machine's memory is unknown")
    probe = pool[-1]
    spec = None
    if read_spec is not None:
        with contextlib.suppress(ModelFormatError, HubError, OSError):
            spec = read_spec(probe)
    if spec is not None and not (spec.n_layer and spec.n_vocab):
        spec = None  # nothing to plan with: estimate from the sizes
    for v in reversed(pool):
        plan = machine.plan(spec, v.size)
        if plan.fits:
            reason = f"the largest that fits: {machine.describe(spec, plan.total_bytes)}"
            return Choice(v, reason, spec if v is probe else None)
    reason = f"{fallback_why}: none fits ({machine.describe(spec)})"
    return Choice(fallback, reason, spec if fallback is probe else None)
