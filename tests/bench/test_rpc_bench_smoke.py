"""bench.rpc's arithmetic: rounds paired by number, ratios innkeeper over llama-server."""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.rpc import render, summarize  # noqa: E402


def test_rounds_pair_by_number_and_a_round_missing_a_side_is_dropped() -> None:
    ref, cand = "llama-server --rpc", "innkeeper --rpc"
    m = lambda d, p: {"decode_tps": d, "pp_tps": p, "ttft_short_s": 1.0, "ttft_prompt_s": 2.0}  # noqa: E731
    runs = [
        {"round": 0, "server": ref, "metrics": m(100.0, 500.0)},
        {"round": 0, "server": cand, "metrics": m(95.0, 510.0)},
        {"round": 1, "server": cand, "metrics": m(50.0, 250.0)},  # a slow minute for both
        {"round": 1, "server": ref, "metrics": m(50.0, 260.0)},
        {"round": 2, "server": ref, "metrics": m(1.0, 1.0)},  # its pair never ran
    ]
    summary = summarize(runs, [ref, cand])
    assert summary["decode_tps"]["ratio"]["n"] == 2
    assert summary["decode_tps"]["ratio"]["min"] == 0.95
    assert summary["decode_tps"]["ratio"]["max"] == 1.0
    assert summary["pp_tps"]["ref"]["median"] == 380.0
    result = {
        "model": {"name": "m"},
        "llama_server": "version: 1",
        "endpoints": "two workers",
        "settings": {
            "gpu_layers": 20,
            "tensor_split": "1,1",
            "threads": 2,
            "worker_threads": 2,
            "ctx_size": 2048,
            "slots": 1,
        },
        "runs": runs,
        "summary": summary,
    }
    assert "| decode_tps |" in render(result)
