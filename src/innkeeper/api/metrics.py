"""/metrics in Prometheus text format, read from each model's counters at scrape time.

A custom collector reads every loaded model's `Service.perf` when scraped (labelled with
`model`), so the decode loop pays nothing per token for metrics.
"""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import APIRouter, Request, Response
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from innkeeper.api.state import registry_of
from innkeeper.serving.registry import ModelRegistry

router = APIRouter(tags=["innkeeper"])


class EngineCollector:
    """Every loaded model's counters, each sample labelled with its `model`."""

    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        services = [e.service for e in self.registry.loaded() if e.service is not None]
        counters = {
            "requests": ("finished generation requests", lambda p: p.total_requests),
            "requests_aborted": (
                "requests cancelled by the client or an abort route",
                lambda p: p.total_aborted,
            ),
            "requests_failed": ("requests that failed in the engine", lambda p: p.total_errors),
            "prompt_tokens": ("prompt tokens received", lambda p: p.total_prompt_tokens),
            "prompt_tokens_cached": (
                "prompt tokens reused from the KV cache",
                lambda p: p.total_cached_tokens,
            ),
            "generated_tokens": ("tokens generated", lambda p: p.total_generated_tokens),
            "decode_steps": ("llama_decode calls", lambda p: p.decode_steps),
            "prompt_seconds": (
                "time in decode steps that only evaluated prompts",
                lambda p: p.total_prompt_seconds,
            ),
            "generation_seconds": (
                "time in decode steps that generated tokens",
                lambda p: p.total_decode_seconds,
            ),
        }
        for name, (doc, read) in counters.items():
            counter = CounterMetricFamily(f"innkeeper_{name}", doc, labels=["model"])
            for s in services:
                counter.add_metric([s.model_id], read(s.stats().perf))
            yield counter
        gauges = {
            "slots_busy": ("slots generating now", lambda s: s.stats().busy_slots),
            "slots_total": ("generation slots", lambda s: s.stats().slots),
            "queue_length": ("requests waiting for a slot", lambda s: s.stats().queued),
            "kv_cells_used": (
                "KV cache cells holding tokens",
                lambda s: sum(s.stats().slot_cells),
            ),
            "kv_cells_total": ("KV cache cells (the context size)", lambda s: s.n_ctx),
            "last_tokens_per_second": (
                "decode speed of the last request",
                lambda s: s.stats().perf.last_tokens_per_second,
            ),
        }
        for name, (doc, read) in gauges.items():
            gauge = GaugeMetricFamily(f"innkeeper_{name}", doc, labels=["model"])
            for s in services:
                gauge.add_metric([s.model_id], read(s))
            yield gauge
        loaded = GaugeMetricFamily(
            "innkeeper_model_loaded", "1 for each loaded model, 0 for the others", labels=["model"]
        )
        for e in self.registry.entries():
            loaded.add_metric([e.id], 1 if e.service is not None else 0)
        yield loaded


def registry_for(registry: ModelRegistry) -> CollectorRegistry:
    collectors = CollectorRegistry(auto_describe=False)
    collectors.register(EngineCollector(registry))  # type: ignore[arg-type]
    return collectors


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    collectors = getattr(request.app.state, "metrics_registry", None)
    if collectors is None:
        collectors = request.app.state.metrics_registry = registry_for(registry_of(request))
    return Response(generate_latest(collectors), media_type=CONTENT_TYPE_LATEST)
