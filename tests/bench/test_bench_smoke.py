"""The bench's pure parts: paired ratios, checks, report formatting, prompt shapes.

No server and no network: the bench itself is run by hand (`make bench`), but the arithmetic
that turns its measurements into PASS/FAIL must be right, so it is tested here.
"""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.models import expected_sha256  # noqa: E402
from bench.run import build_rounds  # noqa: E402

from bench import loadgen, report  # noqa: E402


def test_paired_ratio_is_median_of_per_round_ratios() -> None:
    # Round 2 ran in a slow minute for both sides: pairing cancels it.
    rounds = [
        {"ref": {"decode_tps": 100.0}, "cand": {"decode_tps": 96.0}},
        {"ref": {"decode_tps": 50.0}, "cand": {"decode_tps": 49.0}},
        {"ref": {"decode_tps": 110.0}, "cand": {"decode_tps": 99.0}},
    ]
    ratios = report.paired_ratios(rounds, "decode_tps")
    assert ratios == [0.96, 0.98, 0.9]
    summary = report.summarize(rounds, report.metrics_for())
    assert summary["decode_tps"]["ratio"]["median"] == 0.96
    assert summary["decode_tps"]["ref"] == {"median": 100.0, "min": 50.0, "max": 110.0, "n": 3}
    # A ratio of medians would say 96/100 too here, but 0.9 and 0.98 must be the spread.
    assert summary["decode_tps"]["ratio"]["min"] == 0.9


def test_missing_and_nan_values_are_skipped() -> None:
    rounds = [
        {"ref": {"pp_tps": 200.0}, "cand": {"pp_tps": math.nan}},
        {"ref": {"pp_tps": 0.0}, "cand": {"pp_tps": 10.0}},
        {"ref": {}, "cand": {"pp_tps": 210.0}},
        {"ref": {"pp_tps": 200.0}, "cand": {"pp_tps": 220.0}},
    ]
    assert report.paired_ratios(rounds, "pp_tps") == [1.1]
    assert report.spread([None, math.nan])["n"] == 0


def test_checks_pass_fail_and_no_data() -> None:
    rounds = [
        {
            "ref": {"decode_tps": 100.0, "agg_c4": 100.0, "chat_tN_s": 0.2},
            "cand": {
                "decode_tps": 94.0,
                "agg_c4": 101.0,
                "chat_tN_s": 0.25,
                "trim_over_cold": 0.2,
                "ttft_max_over_med_c4": 1.5,
                "failed_total": 0.0,
            },
        },
        {
            "ref": {"decode_tps": 100.0, "agg_c4": 100.0, "chat_tN_s": 0.2},
            "cand": {
                "decode_tps": 94.0,
                "agg_c4": 120.0,
                "chat_tN_s": 0.22,
                "trim_over_cold": 0.35,
                "ttft_max_over_med_c4": 2.5,
                "failed_total": 1.0,
            },
        },
    ]
    verdicts = {r["metric"]: r["verdict"] for r in report.evaluate(rounds)}
    assert verdicts["decode_tps"] == "FAIL"  # 0.94 < 0.97
    assert verdicts["agg_c4"] == "PASS"
    assert verdicts["chat_tN_s"] == "PASS"  # median of 1.25 and 1.10 = 1.175 <= 1.2
    assert verdicts["trim_over_cold"] == "PASS"  # median 0.275
    assert verdicts["ttft_max_over_med_c4"] == "FAIL"  # worst round counts
    assert verdicts["failed_total"] == "FAIL"  # summed over rounds
    assert verdicts["pp_tps"] == "NO DATA"


def test_build_rounds_merges_scenarios_and_drops_contaminated_pairs() -> None:
    def run(rnd: int, scen: str, role: str, metrics: dict[str, float], foreign: float) -> dict:
        return {"round": rnd, "scenario": scen, "role": role, "metrics": metrics,
                "cpu": {"foreign": foreign}}  # fmt: skip

    runs = [
        run(0, "single", "ref", {"decode_tps": 100.0}, 0.0),
        run(0, "single", "cand", {"decode_tps": 98.0}, 0.0),
        run(0, "concurrency", "ref", {"agg_c4": 90.0, "failed_c4": 0.0}, 0.1),
        run(0, "concurrency", "cand", {"agg_c4": 95.0, "failed_c4": 2.0}, 0.9),
    ]
    rounds = build_rounds(runs, 1, max_foreign=None)
    assert rounds[0]["cand"] == {"decode_tps": 98.0, "agg_c4": 95.0, "failed_c4": 2.0,
                                 "failed_total": 2.0}  # fmt: skip
    rounds = build_rounds(runs, 1, max_foreign=0.5)
    assert rounds[0]["ref"] == {"decode_tps": 100.0}
    assert rounds[0]["cand"] == {"decode_tps": 98.0}


def test_every_scenario_compares_the_same_slots_and_one_slot_apart() -> None:
    """Default: -np 4 -kvu against --parallel 4 for every scenario, alternated over an even
    number of rounds; `single` also with one slot each, in rounds of its own."""
    from bench.models import BenchModel
    from bench.run import _pairs, _specs, parse_args

    args = parse_args(["--out", "/tmp/x"])
    assert (args.parallel, args.rounds, args.single_slot) == (4, 4, ["single"])
    specs = _specs(BenchModel("m", Path("/m.gguf"), "m"), args, Path("/bin/llama-server"))
    roles = {s.role: s.cmd for s in specs}
    assert sorted(roles) == ["cand", "cand1", "ref1", "ref4"]
    assert roles["ref4"][roles["ref4"].index("-np") + 1] == "4" and "-kvu" in roles["ref4"]
    assert roles["cand"][roles["cand"].index("--parallel") + 1] == "4"
    assert roles["cand1"][roles["cand1"].index("--parallel") + 1] == "1"
    assert roles["ref1"][roles["ref1"].index("-np") + 1] == "1"
    assert _pairs("single", args) == ["same", "single"]
    assert _pairs("concurrency", args) == ["same"]

    one = parse_args(["--out", "/tmp/x", "--parallel", "1"])
    specs = _specs(BenchModel("m", Path("/m.gguf"), "m"), one, Path("/bin/llama-server"))
    assert sorted(s.role for s in specs) == ["cand", "ref4"]  # one comparison serves both
    assert _pairs("single", one) == ["same"]

    def run(role: str, group: str, tps: float) -> dict:
        return {"round": 0, "scenario": "single", "role": role, "group": group,
                "metrics": {"decode_tps": tps}, "cpu": {"foreign": 0.0}}  # fmt: skip

    runs = [run("ref", "same", 90.0), run("cand", "same", 91.0),
            run("ref", "single", 100.0), run("cand", "single", 97.0)]  # fmt: skip
    assert build_rounds(runs, 1, None)[0] == {
        "ref": {"decode_tps": 90.0},
        "cand": {"decode_tps": 91.0},
    }
    assert build_rounds(runs, 1, None, group="single")[0]["cand"] == {"decode_tps": 97.0}


def test_markdown_tables() -> None:
    rounds = [
        {"ref": {"decode_tps": 113.0, "ttft_short_s": 0.25}, "cand": {"decode_tps": 110.0}},
        {"ref": {"decode_tps": 100.0, "ttft_short_s": 0.27}, "cand": {"decode_tps": 105.0}},
    ]
    metrics = report.metrics_for()
    table = report.render_table(report.summarize(rounds, metrics), metrics, "innkeeper")
    lines = table.splitlines()
    assert lines[0] == "| metric | llama-server | innkeeper | ratio innkeeper/llama-server |"
    assert "| 106 (100-113) | 108 (105-110) | 1.01 (0.973-1.05) |" in lines[2]
    assert "| 0.260 (0.250-0.270) | n/a | n/a |" in lines[3]
    assert len(lines) == 4  # rows without data are left out
    checks = report.render_checks(report.evaluate(rounds))
    assert (
        "| single-stream decode ≥ 0.97x llama-server, same slots | 1.01x | >= 0.97 | **PASS** |"
        in (checks)
    )
    single = report.render_checks(report.evaluate(rounds, report.SINGLE_SLOT_CHECKS))
    assert "| single-stream decode ≥ 0.97x llama-server -np 1 | 1.01x | >= 0.97 | **PASS** |" in (
        single
    )
    header = report.render_table({}, metrics, "innkeeper", "llama-server -np 4 -kvu")
    assert header.splitlines()[0].startswith("| metric | llama-server -np 4 -kvu | innkeeper |")
    assert "| n/a | <= 2 | **NO DATA** |" in checks
    assert report.fmt(math.nan) == "n/a"
    assert report.fmt(1234.5) == "1234"
    assert report.fmt(0.01234) == "0.012"


def test_prompts_are_unique_and_sized() -> None:
    gen = loadgen.TextGen(random.Random(7), tokens_per_word=1.25)
    a, b = gen.cold(1000), gen.cold(1000)
    assert a.split()[:2] != b.split()[:2]  # different nonce lines
    assert a.startswith("Session ")
    assert 780 <= len(a.split()) <= 810  # ~ (1000 - 8) / 1.25 words + nonce


def test_chat_prompt_and_its_cold_shadow_have_the_same_shape() -> None:
    gen = loadgen.TextGen(random.Random(1))
    chat = loadgen.Chat("Session 1. The system text.", [("hi there", "hello friend"), ("a b", "c")])
    prompt = chat.prompt("how are you")
    assert prompt == (
        "Session 1. The system text.\nUser: hi there\nAssistant: hello friend"
        "\nUser: a b\nAssistant: c\nUser: how are you\nAssistant:"
    )
    cold = loadgen.shadow(gen, chat, "how are you")
    assert cold.count("\nUser: ") == 3 and cold.endswith("\nAssistant:")
    assert [len(line.split()) for line in cold.splitlines()][1:] == [
        len(line.split()) for line in prompt.splitlines()
    ][1:]
    assert cold.splitlines()[0] != prompt.splitlines()[0]


def test_token_counting_prefers_usage() -> None:
    assert loadgen._count({"completion_tokens": 7}, "length", 9, 3) == (7, "usage")
    assert loadgen._count(None, "length", 9, 3) == (9, "length")
    assert loadgen._count({}, "stop", 9, 3) == (3, "chunks")


def test_gemma_sha_is_read_from_the_index_package() -> None:
    src = 'MODEL_NAME = "x"\nEXPECTED_SHA256 = "' + "ab" * 32 + '"\n'
    assert expected_sha256(src) == "ab" * 32


def test_kv_bytes_are_read_from_llama_cpp_logs_and_compared(tmp_path: Path) -> None:
    """Both servers' KV MiB come from llama.cpp's own lines (two caches for a SWA model)."""
    from bench.servers import RunningServer, ServerSpec

    log = tmp_path / "innkeeper.log"
    log.write_text(
        "llama_kv_cache: size =   24.00 MiB (  8192 cells,   3 layers,  4/1 seqs), K (f16): ...\n"
        "llama_kv_cache: size =   37.50 MiB (  2560 cells,  15 layers,  4/1 seqs), K (f16): ...\n"
    )
    server = RunningServer(ServerSpec("innkeeper", "cand", [], 0), None, log)  # type: ignore[arg-type]
    assert server.kv_mib() == 61.5
    assert RunningServer(ServerSpec("x", "ref1", [], 0), None, tmp_path / "none").kv_mib() is None  # type: ignore[arg-type]
    assert report.kv_check({"cand": 61.5, "ref4": 61.5, "ref1": 40.0})["verdict"] == "PASS"
    assert report.kv_check({"cand": 144.0, "ref4": 61.5})["verdict"] == "FAIL"
    assert report.kv_check({"cand": 61.5, "ref1": None})["verdict"] == "NO DATA"


def test_revisit_is_a_scenario_with_its_goal() -> None:
    assert "revisit" in loadgen.SCENARIOS
    rounds = [{"ref": {"revisit_overhead_s": 0.05}, "cand": {"revisit_overhead_s": 0.08}}]
    (result,) = [r for r in report.evaluate(rounds) if r["metric"] == "revisit_overhead_s"]
    assert result["verdict"] == "PASS"
    rounds[0]["cand"]["revisit_overhead_s"] = 0.5
    (result,) = [r for r in report.evaluate(rounds) if r["metric"] == "revisit_overhead_s"]
    assert result["verdict"] == "FAIL"
