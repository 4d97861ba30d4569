"""/metrics in Prometheus text format, read from the engine's counters at scrape time.

A custom collector reads `Scheduler.perf` when scraped, so the decode loop pays nothing
per token for metrics.
"""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import APIRouter, Request, Response
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from innkeeper.api.service import Service
from innkeeper.api.state import service_of

router = APIRouter(tags=["innkeeper"])


class EngineCollector:
    def __init__(self, service: Service) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        sched = self.service.engine.scheduler
        p = sched.perf
        counters = {
            "requests": ("finished generation requests", p.total_requests),
            "requests_aborted": (
                "requests cancelled by the client or an abort route",
                p.total_aborted,
            ),
            "requests_failed": ("requests that failed in the engine", p.total_errors),
            "prompt_tokens": ("prompt tokens received", p.total_prompt_tokens),
            "prompt_tokens_cached": (
                "prompt tokens reused from the KV cache",
                p.total_cached_tokens,
            ),
            "generated_tokens": ("tokens generated", p.total_generated_tokens),
            "decode_steps": ("llama_decode calls", p.decode_steps),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(f"innkeeper_{name}", doc, value=value)
        yield CounterMetricFamily(
            "innkeeper_prompt_seconds",
            "time in decode steps that only evaluated prompts",
            value=p.total_prompt_seconds,
        )
        yield CounterMetricFamily(
            "innkeeper_generation_seconds",
            "time in decode steps that generated tokens",
            value=p.total_decode_seconds,
        )
        cells = sum(len(s.cache) for s in sched.slots)
        gauges = {
            "slots_busy": ("slots generating now", sched.busy_slots),
            "slots_total": ("generation slots", len(sched.slots)),
            "queue_length": ("requests waiting for a slot", sched.queued),
            "kv_cells_used": ("KV cache cells holding tokens", cells),
            "kv_cells_total": ("KV cache cells (the context size)", self.service.n_ctx),
            "last_tokens_per_second": (
                "decode speed of the last request",
                p.last_tokens_per_second,
            ),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(f"innkeeper_{name}", doc, value=value)


def registry_for(service: Service) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(service))  # type: ignore[arg-type]
    return registry


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    registry = getattr(request.app.state, "metrics_registry", None)
    if registry is None:
        registry = request.app.state.metrics_registry = registry_for(service_of(request))
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
