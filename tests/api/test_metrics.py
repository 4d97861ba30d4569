"""/metrics: Prometheus text with real engine counters."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow  # starts real servers or browsers: not in `make test-fast`


def scrape(client: httpx.Client) -> dict[str, float]:
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return {s.name: s.value for fam in text_string_to_metric_families(r.text) for s in fam.samples}


def test_metrics_count_real_work(client: httpx.Client) -> None:
    before = scrape(client)
    out = client.post(
        "/v1/completions", json={"prompt": "Hello there", "max_tokens": 5, "ignore_eos": True}
    ).json()
    after = scrape(client)
    assert after["innkeeper_requests_total"] == before["innkeeper_requests_total"] + 1
    assert (
        after["innkeeper_generated_tokens_total"] - before["innkeeper_generated_tokens_total"] == 5
    )
    assert (
        after["innkeeper_prompt_tokens_total"] - before["innkeeper_prompt_tokens_total"]
        == out["usage"]["prompt_tokens"]
    )
    assert after["innkeeper_decode_steps_total"] > before["innkeeper_decode_steps_total"]
    assert after["innkeeper_slots_total"] == 2
    assert after["innkeeper_slots_busy"] == 0
    assert after["innkeeper_kv_cells_total"] == 2048
    assert after["innkeeper_kv_cells_used"] > 0


def test_page_is_revalidated(client: httpx.Client) -> None:
    assert client.get("/").headers.get("cache-control") == "no-cache"
    assert client.get("/static/app.js").headers.get("cache-control") == "no-cache"
