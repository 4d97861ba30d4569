"""innkeeper's own status route: what the built-in page shows about the running server."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request

from innkeeper import __version__
from innkeeper.api.state import service_of

router = APIRouter(tags=["innkeeper"])

FILE_TYPES = {
    "0": "F32", "1": "F16", "2": "Q4_0", "3": "Q4_1", "7": "Q8_0", "8": "Q5_0", "9": "Q5_1",
    "10": "Q2_K", "11": "Q3_K_S", "12": "Q3_K_M", "13": "Q3_K_L", "14": "Q4_K_S", "15": "Q4_K_M",
    "16": "Q5_K_S", "17": "Q5_K_M", "18": "Q6_K", "19": "IQ2_XXS", "20": "IQ2_XS", "21": "Q2_K_S",
    "22": "IQ3_XS", "23": "IQ3_XXS", "24": "IQ1_S", "25": "IQ4_NL", "26": "IQ3_S", "27": "IQ3_M",
    "28": "IQ2_S", "29": "IQ2_M", "30": "IQ4_XS", "31": "IQ1_M", "32": "BF16", "36": "TQ1_0",
    "37": "TQ2_0", "38": "MXFP4",
}  # fmt: skip


@router.get("/api/innkeeper/status")
async def status(request: Request) -> dict[str, Any]:
    service = service_of(request)
    engine = service.engine
    info = engine.info
    cfg = engine.config
    sched = engine.scheduler
    perf = sched.perf
    plan = request.app.state.memory_plan
    return {
        "version": __version__,
        "model": {
            "id": service.model_id,
            "path": str(info.path),
            "format": "GGUF",
            "architecture": info.architecture,
            "quantization": FILE_TYPES.get(info.file_type or "", info.file_type),
            "description": info.description,
            "parameters": info.n_params,
            "size_bytes": info.size_bytes,
            "context_trained": info.n_ctx_train,
        },
        "context": {"size": engine.n_ctx, "used_by_slots": [len(s.cache) for s in sched.slots]},
        "settings": {
            "threads": engine.ctx.threads,
            "threads_batch": engine.ctx.threads_batch,
            "gpu_layers": cfg.gpu_layers,
            "parallel": len(sched.slots),
            "flash_attn": cfg.flash_attn,
            "cache_type_k": cfg.cache_type_k,
            "cache_type_v": cfg.cache_type_v,
        },
        "chat_template": {
            "name": engine.template.name,
            "from_model": engine.template.source is not None,
        },
        "memory_plan": plan,
        "auth_required": bool(request.app.state.config.api_keys),
        "perf": {
            "last_tokens_per_second": round(perf.last_tokens_per_second, 2),
            "last_prompt_seconds": round(perf.last_prompt_seconds, 3),
            "total_requests": perf.total_requests,
            "busy_slots": sched.busy_slots,
            "queued": sched.queued,
            "requests_in_flight": service.in_flight,
            "uptime_seconds": round(time.time() - perf.started, 1),
        },
    }
