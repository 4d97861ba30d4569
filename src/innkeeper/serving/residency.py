"""Which models may stay loaded together: memory per device, the model cap, LRU eviction.

Pure functions over the registry's entries and their memory plans, so the eviction rule is
tested without loading anything. Before a load, the plans of every model that would then be
loaded must fit this machine's RAM and VRAM: the least recently used idle models are chosen
for eviction until they do; a busy model is evicted only for the `--models-max` cap (its
unload waits for its requests); if even that does not make room, the load is refused before
anything is evicted.
"""

from __future__ import annotations

from typing import Any

from innkeeper.models.hardware import format_size
from innkeeper.models.memory import MemoryPlan
from innkeeper.serving.catalog import ModelEntry
from innkeeper.serving.errors import InsufficientMemory


def last_used(e: ModelEntry) -> float:
    return e.service.last_used if e.service is not None else 0.0


def busy(e: ModelEntry) -> bool:
    return e.service is not None and e.service.busy


def fit_problem(plans: list[MemoryPlan], *, others: int) -> str | None:
    """Why these plans together do not fit this machine (None when they do); `others` is how
    many of them belong to models that would stay loaded beside the new one."""
    need: dict[tuple[str, str], int] = {}
    room: dict[tuple[str, str], tuple[int, int]] = {}
    for plan in plans:
        for d in plan.devices:
            key = (d.kind, d.name)
            need[key] = need.get(key, 0) + d.total_bytes
            room[key] = (d.capacity_bytes, d.margin_bytes)
    for key, bytes_ in need.items():
        capacity, margin = room[key]
        if bytes_ + margin > capacity:
            where = "RAM" if key[0] == "ram" else key[1]
            beside = " (with the models it would stay loaded beside)" if others else ""
            return (
                f"needs {format_size(bytes_)} of {where}{beside} but "
                f"{format_size(max(capacity - margin, 0))} is free to use"
            )
    return None


def choose_evictions(
    target: ModelEntry,
    plan: MemoryPlan | None,
    loaded: list[ModelEntry],
    models_max: int,
    held: list[MemoryPlan] | None = None,
) -> list[ModelEntry]:
    """The loaded models that must go for `target` to load, least recently used first;
    `held`: memory no unload can give back (models stranded by a lost RPC worker).

    Raises InsufficientMemory, before anything is evicted, when even evicting every idle
    model leaves too little room."""
    others = sorted((x for x in loaded if x is not target), key=last_used)
    evict: list[ModelEntry] = []
    over = len(others) + 1 - models_max
    if over > 0:
        evict = sorted(others, key=lambda x: (busy(x), last_used(x)))[:over]
    if plan is None:
        return evict
    keep = [x for x in others if x not in evict]

    def plans(models: list[ModelEntry]) -> list[MemoryPlan]:
        return [x.loaded_plan for x in models if x.loaded_plan is not None] + [*(held or []), plan]

    for candidate in [x for x in keep if not busy(x)]:
        if fit_problem(plans(keep), others=len(keep)) is None:
            break
        keep.remove(candidate)
        evict.append(candidate)
    problem = fit_problem(plans(keep), others=len(keep))
    if problem is not None:
        staying = [x.id for x in keep]
        extra = f" ({', '.join(staying)} stay loaded: in use)" if staying else ""
        raise InsufficientMemory(f"not enough memory to load {target.id}: it {problem}{extra}")
    return evict


def memory_json(loaded: list[ModelEntry]) -> dict[str, Any]:
    """The memory plan summed over the loaded models, per device."""
    devices: dict[tuple[str, str], dict[str, Any]] = {}
    for e in loaded:
        if e.loaded_plan is None:
            continue
        for d in e.loaded_plan.devices:
            row = devices.setdefault(
                (d.kind, d.name),
                {
                    "name": d.name,
                    "kind": d.kind,
                    "total_bytes": 0,
                    "capacity_bytes": d.capacity_bytes,
                    "margin_bytes": d.margin_bytes,
                    "models": {},
                },
            )
            row["total_bytes"] += d.total_bytes
            row["models"][e.id] = d.total_bytes
    for row in devices.values():
        row["fits"] = row["total_bytes"] + row["margin_bytes"] <= row["capacity_bytes"]
    return {
        "models": [e.id for e in loaded],
        "total_bytes": sum(r["total_bytes"] for r in devices.values()),
        "devices": list(devices.values()),
    }
