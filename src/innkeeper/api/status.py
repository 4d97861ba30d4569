"""innkeeper's own status route: what the built-in page shows about the running server."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request

from innkeeper import __version__
from innkeeper.api.admin import caller_of
from innkeeper.api.state import registry_of
from innkeeper.serving.catalog import ModelEntry
from innkeeper.serving.policy import Caller
from innkeeper.serving.registry import ModelRegistry
from innkeeper.serving.worker_loss import lost_workers_json, stranded_json

router = APIRouter(tags=["innkeeper"])

FILE_TYPES = {
    "0": "F32", "1": "F16", "2": "Q4_0", "3": "Q4_1", "7": "Q8_0", "8": "Q5_0", "9": "Q5_1",
    "10": "Q2_K", "11": "Q3_K_S", "12": "Q3_K_M", "13": "Q3_K_L", "14": "Q4_K_S", "15": "Q4_K_M",
    "16": "Q5_K_S", "17": "Q5_K_M", "18": "Q6_K", "19": "IQ2_XXS", "20": "IQ2_XS", "21": "Q2_K_S",
    "22": "IQ3_XS", "23": "IQ3_XXS", "24": "IQ1_S", "25": "IQ4_NL", "26": "IQ3_S", "27": "IQ3_M",
    "28": "IQ2_S", "29": "IQ2_M", "30": "IQ4_XS", "31": "IQ1_M", "32": "BF16", "36": "TQ1_0",
    "37": "TQ2_0", "38": "MXFP4",
}  # fmt: skip


def health_report(request: Request) -> dict[str, Any]:
    """/health: "ok" while the server answers; RPC workers found gone are listed (the models
    on them failed; the others serve) until a load uses each again. /health needs no key, so
    a worker's address is named to admins only (as host paths are); others see when."""
    lost = lost_workers_json()
    if not caller_of(request).admin:
        lost = [{k: v for k, v in w.items() if k != "endpoint"} for w in lost]
    return {"status": "ok", "rpc_workers_lost": lost} if lost else {"status": "ok"}


def _model_status(registry: ModelRegistry, e: ModelEntry, caller: Caller) -> dict[str, Any]:
    """One model's part of the status: what it is, how it runs, its counters."""
    service = e.service
    out: dict[str, Any] = {
        "model": registry.entry_summary(e, caller),
        "settings": registry.settings_of(e),
        "memory_plan": e.loaded_plan.to_json() if e.loaded_plan is not None else None,
    }
    if service is None:
        return out
    info = service.info
    out["model"].update(
        architecture=info.architecture,
        quantization=FILE_TYPES.get(info.file_type or "", info.file_type) or e.quantization,
        description=info.description,
        parameters=info.n_params,
        size_bytes=info.size_bytes,
        context_trained=info.n_ctx_train,
    )
    settings = service.settings
    stats = service.stats()
    perf = stats.perf
    out.update(
        context={"size": service.n_ctx, "used_by_slots": list(stats.slot_cells)},
        settings={
            "threads": settings["threads"],
            "threads_batch": settings["threads_batch"],
            "gpu_layers": settings["gpu_layers"],
            "parallel": stats.slots,
            "flash_attn": settings["flash_attn"],
            "cache_type_k": settings["cache_type_k"],
            "cache_type_v": settings["cache_type_v"],
            "ctx_size": service.n_ctx,
        },
        chat_template={
            "name": service.template.name,
            "from_model": service.template.source is not None,
        },
        perf={
            "last_tokens_per_second": round(perf.last_tokens_per_second, 2),
            "last_prompt_seconds": round(perf.last_prompt_seconds, 3),
            "total_requests": perf.total_requests,
            "busy_slots": stats.busy_slots,
            "queued": stats.queued,
            "requests_in_flight": service.in_flight,
            "uptime_seconds": round(time.time() - perf.started, 1),
        },
    )
    return out


@router.get("/api/innkeeper/status")
async def status(request: Request, model: str | None = None) -> dict[str, Any]:
    """The default model's status (or `?model=`'s), every loaded model's, and the memory plan
    summed over the loaded models. Asking never loads a model."""
    registry = registry_of(request)
    chosen = registry.resolve(model)
    caller = caller_of(request)
    return {
        "version": __version__,
        **_model_status(registry, chosen, caller),
        "default": registry.default_id,
        "models": [_model_status(registry, e, caller) for e in registry.loaded()],
        "memory": registry.memory_json(),
        "rpc_workers_lost": lost_workers_json(),
        "models_stranded": stranded_json(),
        "auth_required": bool(request.app.state.config.api_keys),
    }
