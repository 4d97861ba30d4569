"""The switch bench's pure parts: arguments, the request plan, model ids, metrics, the report.

No server: `python -m bench.switch` is run by hand, but the arithmetic and the model-id
matching that turn its requests into the table must be right, so they are tested here.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.run import build_rounds  # noqa: E402

from bench import cpu, report, servers, switch  # noqa: E402

pytestmark = pytest.mark.slow  # starts real servers or browsers: not in `make test-fast`

NAMES = ("smollm2", "gemma3")


def test_arguments_defaults_and_refusals(tmp_path: Path) -> None:
    args = switch.parse_args(["--out", str(tmp_path)])
    assert args.models == ["smollm2", "gemma3"]
    assert (args.models_max, args.threads, args.ctx_size, args.max_tokens) == (1, 2, 4096, 8)
    assert switch.parse_args([]).out.name.endswith("-switch")
    for bad in (["--models", "smollm2"], ["--models", "gemma3,gemma3"], ["--switches", "0"]):
        with pytest.raises(SystemExit):
            switch.parse_args(bad)


def test_plan_alternates_and_follows_each_switch_with_a_warm_request() -> None:
    assert switch.switch_plan(NAMES, 3) == [
        ("switch", "gemma3"),
        ("warm", "gemma3"),
        ("switch", "smollm2"),
        ("warm", "smollm2"),
        ("switch", "gemma3"),
        ("warm", "gemma3"),
    ]


def test_listing_and_model_ids() -> None:
    body = {
        "data": [
            {"id": "SmolLM2-135M-Instruct.Q4_1", "status": {"value": "loaded"}},
            {"id": "gemma-3-270m-q4_k_m", "status": "unloaded"},
            {"id": "no-status"},
            {"object": "model"},
        ]
    }
    listing = switch.parse_listing(body)
    assert listing == [
        ("SmolLM2-135M-Instruct.Q4_1", "loaded"),
        ("gemma-3-270m-q4_k_m", "unloaded"),
        ("no-status", ""),
    ]
    assert switch.parse_listing({"error": "x"}) == []
    ids = [i for i, _ in listing]
    smol = Path("/m/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert switch.model_id_for(ids, smol) == "SmolLM2-135M-Instruct.Q4_1"  # llama-server: stem
    assert switch.model_id_for(["smollm2-135m-instruct-q4_1", "x"], smol) == (
        "smollm2-135m-instruct-q4_1"
    )
    assert switch.model_id_for(["dir/gemma-3-270m-q4_k_m.gguf"], Path("gemma-3-270m-q4_k_m.gguf"))
    with pytest.raises(switch.ModelIdError, match="no single model id"):
        switch.model_id_for(["a-smollm2135minstructq41", "b-smollm2135minstructq41"], smol)


def _req(kind: str, model: str, ttft: float, error: str | None = None, loaded: int = 1) -> dict:
    return {"kind": kind, "model": model, "ttft": ttft, "error": error, "loaded": loaded}


def test_sequence_metrics_medians_directions_and_failures() -> None:
    records = [
        _req("switch", "gemma3", 1.0),
        _req("warm", "gemma3", 0.1),
        _req("switch", "smollm2", 0.4),
        _req("warm", "smollm2", 0.06, loaded=2),
        _req("switch", "gemma3", 1.2),
        _req("warm", "gemma3", 9.0, error="HTTP 500"),
    ]
    m = switch.sequence_metrics(records, NAMES)
    assert m["switch_s"] == 1.0
    assert m["warm_s"] == pytest.approx(0.08)  # the failed request is left out
    assert m["switch_overhead_s"] == pytest.approx(0.92)
    assert m["switch_to_gemma3_s"] == pytest.approx(1.1)
    assert m["switch_to_smollm2_s"] == 0.4
    assert m["failed"] == 1.0
    assert m["max_loaded"] == 2.0
    assert math.isnan(switch.sequence_metrics([], NAMES)["switch_s"])


def _run(rnd: int, role: str, records: list[dict], foreign: float = 0.0) -> dict:
    return {
        "round": rnd,
        "scenario": switch.SCENARIO,
        "role": role,
        "metrics": switch.sequence_metrics(records, NAMES),
        "cpu": {"foreign": foreign},
        "gate": {"ok": True},
        "requests": records,
    }


def test_report_pairs_rounds_and_counts_switches() -> None:
    def seq(switch_s: float, warm_s: float) -> list[dict]:
        return [_req("switch", "gemma3", switch_s), _req("warm", "gemma3", warm_s)]

    runs = [
        _run(0, "ref", seq(1.0, 0.1)),
        _run(0, "cand", seq(1.5, 0.1)),
        _run(1, "ref", seq(2.0, 0.2)),
        _run(1, "cand", [*seq(2.0, 0.1), _req("switch", "smollm2", 0.0, error="HTTP 409")]),
    ]
    rounds = build_rounds(runs, 2, max_foreign=None)
    metrics = switch.metrics_for(NAMES)
    result = {
        "meta": {
            "date": "2026-11-26T12:00:00",
            "machine": "test cpu",
            "llama_server_version": "version: x",
            "llama_cpp_python": "0.3.36",
            "innkeeper_version": "0.1.0",
            "git_commit": "abc",
            "args": vars(switch.parse_args(["--out", "/tmp/x"])),
        },
        "models": {n: {"description": n.upper()} for n in NAMES},
        "rounds_done": 2,
        "runs": runs,
        "rounds": rounds,
        "summary": report.summarize(rounds, metrics),
    }
    assert result["summary"]["switch_s"]["ratio"]["median"] == pytest.approx(1.25)  # 1.5, 1.0
    assert switch.side_totals(runs, "cand") == {"switches": 2.0, "failed": 1.0, "max_loaded": 1.0}
    md = switch.render_markdown(result)
    assert "| TTFT after a switch (unload + load + prompt), s (lower is better) | 1.50 " in md
    assert "[router] | 1.75 (1.50-2.00) | 1.25 (1.00-1.50) |" in md
    assert "switch to smollm2" not in md  # no successful switch that way: no row
    assert "Switches measured: llama-server 2, innkeeper 2; failed requests: llama-server 0, " in md
    assert "innkeeper 1; most models loaded at once: llama-server 1, innkeeper 1." in md


def test_router_commands_match_on_both_sides() -> None:
    common = {"models_max": 1, "parallel": 4, "threads": 2, "ctx_size": 4096, "flash_attn": "off"}
    ref = servers.llama_router_spec(Path("/bin/llama-server"), Path("/m"), **common)
    cand = servers.innkeeper_router_spec(Path("/m"), **common)
    for spec, pairs in (
        (ref, [("--models-dir", "/m"), ("--models-max", "1"), ("-t", "2"), ("-c", "4096"),
               ("-np", "4"), ("-fa", "off")]),
        (cand, [("--models-dir", "/m"), ("--models-max", "1"), ("--threads", "2"),
                ("--ctx-size", "4096"), ("--parallel", "4"), ("--flash-attn", "off")]),
    ):  # fmt: skip
        for flag, value in pairs:
            assert spec.cmd[spec.cmd.index(flag) + 1] == value
    assert "-m" not in ref.cmd and "--model" not in ref.cmd  # every model from the folder
    assert cand.cmd[cand.cmd.index("serve") + 1] == "--models-dir"  # no model: the default


def test_cpu_meter_counts_children_that_ended() -> None:
    """A router runs each model in a child that ends on unload: its CPU is the server's."""
    before = cpu._proc_cpu(cpu.os.getpid(), children=True)
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass"
    subprocess.run([sys.executable, "-c", burn], check=True)
    assert cpu._proc_cpu(cpu.os.getpid(), children=True) - before >= 0.25
