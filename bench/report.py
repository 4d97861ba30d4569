"""Statistics and the report: medians over rounds, paired ratios, the issue's checks, markdown.

Pure functions over plain dicts, so they can be tested without a server. One round's data is
`{"ref": {metric: value}, "cand": {metric: value}}`, both sides with as many slots (llama-server
-np N -kvu and innkeeper --parallel N for every scenario; the single-slot comparison, -np 1
and --parallel 1, has rounds of its own and its own checks). A ratio is candidate/reference *within one round* (both measured in the
same minutes, order rotated), and the reported ratio is the median of those per-round ratios:
on a shared 2-core machine the drift between minutes is larger than most differences we want
to see, and pairing cancels it.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

Round = dict[str, dict[str, float]]


@dataclass(frozen=True)
class Metric:
    """A reported number: its key in the scenario metrics, a label, and which way is better."""

    key: str
    label: str
    higher_is_better: bool
    ref: str = ""  # a reference of its own for this row, shown as a tag (empty: the column's)


@dataclass(frozen=True)
class Check:
    """One target of the issue.

    kind "ratio": median over rounds of candidate/reference must satisfy `op threshold`;
    kind "own": the candidate's own value (aggregated over rounds by `over`) must.
    """

    name: str
    metric: str
    kind: str
    op: str
    threshold: float
    over: str = "median"  # how rounds are combined for kind "own": median | max | sum


NP1 = "llama-server -np 1"


def metrics_for(levels: tuple[int, ...] = (1, 2, 4, 8), turns: int = 10) -> list[Metric]:
    """Every metric of the table, in table order."""
    rows = [
        Metric("decode_tps", "decode tok/s (1 stream, after 1st token)", True),
        Metric("ttft_short_s", "TTFT ~77-token prompt, s", False),
        Metric("pp_tps", "prompt tok/s (cold ~1000 tokens)", True),
        Metric("ttft_prompt_s", "TTFT cold ~1000-token prompt, s", False),
        Metric("chat_t1_s", "chat TTFT turn 1, s", False),
        Metric("chat_t5_s", "chat TTFT turn 5, s", False),
        Metric("chat_tN_s", f"chat TTFT turn {turns}, s", False),
        Metric("chat_tN_cold_s", f"turn-{turns} prompt sent cold, s", False),
        Metric("chat_tN_over_cold", f"turn {turns} / same prompt cold", False),
        Metric("trim_s", "TTFT after top-trim, s", False),
        Metric("trim_cold_s", "trimmed prompt sent cold, s", False),
        Metric("trim_over_cold", "after trim / same prompt cold", False),
        Metric("revisit_warm_s", "TTFT next chat turn right away, s", False),
        Metric("revisit_s", "TTFT same-size turn after another long prompt, s", False),
        Metric("revisit_overhead_s", "revisit overhead beyond the new tokens, s", False),
    ]
    for n in levels:
        rows.append(Metric(f"agg_c{n}", f"aggregate tok/s, {n} streams", True))
    for n in levels:
        if n > 1:
            rows.append(Metric(f"ttft_med_c{n}", f"TTFT median, {n} streams, s", False))
            rows.append(Metric(f"ttft_max_c{n}", f"TTFT max, {n} streams, s", False))
    return rows


CHECKS = [
    Check(
        "single-stream decode ≥ 0.97x llama-server, same slots", "decode_tps", "ratio", ">=", 0.97
    ),
    Check("prompt processing ≥ 0.95x llama-server, same slots", "pp_tps", "ratio", ">=", 0.95),
    Check("turn-10 TTFT ≤ 1.2x llama-server's", "chat_tN_s", "ratio", "<=", 1.2),
    Check("TTFT after top-trim ≤ 0.3x same prompt cold", "trim_over_cold", "own", "<=", 0.3),
    Check("turn-10 TTFT ≤ 0.3x same prompt cold", "chat_tN_over_cold", "own", "<=", 0.3),
    Check("revisit: TTFT overhead ≤ 0.1 s", "revisit_overhead_s", "own", "<=", 0.1),
    Check("aggregate tok/s at 4 streams ≥ llama-server, same slots", "agg_c4", "ratio", ">=", 1.0),
    Check("aggregate tok/s at 8 streams ≥ llama-server, same slots", "agg_c8", "ratio", ">=", 1.0),
    Check(
        "4 streams: max TTFT ≤ 2x median (worst round)",
        "ttft_max_over_med_c4",
        "own",
        "<=",
        2.0,
        "max",
    ),
    Check(
        "8 streams: max TTFT ≤ 2x median (worst round)",
        "ttft_max_over_med_c8",
        "own",
        "<=",
        2.0,
        "max",
    ),
    Check("no failed request under concurrency", "failed_total", "own", "<=", 0.0, "sum"),
]
# The single-slot comparison, reported apart: one slot on both sides.
SINGLE_SLOT_CHECKS = [
    Check("single-stream decode ≥ 0.97x llama-server -np 1", "decode_tps", "ratio", ">=", 0.97),
]


def finite(values: list[float | None]) -> list[float]:
    """The values that are real numbers (missing and NaN dropped)."""
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def spread(values: list[float | None]) -> dict[str, float]:
    """median, min, max and n of the finite values (NaN medians when there are none)."""
    vals = finite(values)
    if not vals:
        return {"median": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    return {
        "median": float(statistics.median(vals)),
        "min": min(vals),
        "max": max(vals),
        "n": len(vals),
    }


def paired_ratios(rounds: list[Round], key: str) -> list[float]:
    """candidate/reference for `key` in every round that has both (and a non-zero reference)."""
    out = []
    for rnd in rounds:
        ref = rnd.get("ref", {}).get(key)
        cand = rnd.get("cand", {}).get(key)
        vals = finite([ref, cand])
        if len(vals) == 2 and vals[0] != 0:
            out.append(vals[1] / vals[0])
    return out


def with_derived(metrics: dict[str, float]) -> dict[str, float]:
    """Add the totals the checks need (failed requests over every concurrency level)."""
    out = dict(metrics)
    failed = [v for k, v in metrics.items() if k.startswith("failed_c")]
    if failed:
        out["failed_total"] = float(sum(failed))
    return out


def summarize(rounds: list[Round], metrics: list[Metric]) -> dict[str, dict[str, Any]]:
    """Per metric: reference and candidate spread over rounds, and the paired-ratio spread."""
    out: dict[str, dict[str, Any]] = {}
    keys = [m.key for m in metrics]
    extra = sorted({k for r in rounds for side in r.values() for k in side} - set(keys))
    for key in keys + extra:
        out[key] = {
            "ref": spread([r.get("ref", {}).get(key) for r in rounds]),
            "cand": spread([r.get("cand", {}).get(key) for r in rounds]),
            "ratio": spread(paired_ratios(rounds, key)),
        }
    return out


def _compare(value: float, op: str, threshold: float) -> bool:
    return value >= threshold if op == ">=" else value <= threshold


def evaluate(rounds: list[Round], checks: list[Check] = CHECKS) -> list[dict[str, Any]]:
    """Each check's value and verdict: PASS, FAIL, or NO DATA when nothing was measured."""
    out = []
    for check in checks:
        if check.kind == "ratio":
            value = spread(paired_ratios(rounds, check.metric))["median"]
        else:
            vals = finite([r.get("cand", {}).get(check.metric) for r in rounds])
            if not vals:
                value = math.nan
            elif check.over == "max":
                value = max(vals)
            elif check.over == "sum":
                value = sum(vals)
            else:
                value = float(statistics.median(vals))
        verdict = (
            "NO DATA"
            if math.isnan(value)
            else ("PASS" if _compare(value, check.op, check.threshold) else "FAIL")
        )
        out.append(
            {
                "check": check.name,
                "metric": check.metric,
                "kind": check.kind,
                "value": value,
                "target": f"{check.op} {check.threshold:g}",
                "verdict": verdict,
            }
        )
    return out


def kv_check(kv_mib: dict[str, float | None]) -> dict[str, Any]:
    """innkeeper's KV cache MiB / llama-server's with as many slots (-np 4 -kvu, else -np 1
    when only that one ran), both read from llama.cpp's log: issue #12 wants ≤ 1."""
    cand = kv_mib.get("cand")
    ref = kv_mib.get("ref4") or kv_mib.get("ref1")
    which = "-np 4 -kvu" if kv_mib.get("ref4") else "-np 1"
    value = cand / ref if cand and ref else math.nan
    verdict = "NO DATA" if math.isnan(value) else ("PASS" if value <= 1.0 else "FAIL")
    return {
        "check": f"KV bytes ≤ llama-server {which}'s (llama.cpp log: {fmt(cand)} / {fmt(ref)} MiB)",
        "metric": "kv_mib",
        "kind": "ratio",
        "value": value,
        "target": "<= 1",
        "verdict": verdict,
    }


def fmt(value: float | None) -> str:
    """Three significant digits, no scientific notation for the sizes we see."""
    if value is None or not math.isfinite(value):
        return "n/a"
    if value == 0:
        return "0"
    mag = abs(value)
    if mag >= 100:
        return f"{value:.0f}"
    if mag >= 10:
        return f"{value:.1f}"
    if mag >= 1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def fmt_spread(s: dict[str, float]) -> str:
    """`median (min-max)`, or just the median when there is one value."""
    if not s or s.get("n", 0) == 0:
        return "n/a"
    if s["n"] == 1 or s["min"] == s["max"]:
        return fmt(s["median"])
    return f"{fmt(s['median'])} ({fmt(s['min'])}-{fmt(s['max'])})"


def render_table(
    summary: dict[str, dict[str, Any]],
    metrics: list[Metric],
    cand_name: str,
    ref_name: str = "llama-server",
) -> str:
    """The markdown table of one model: reference, candidate, paired ratio."""
    lines = [
        f"| metric | {ref_name} | {cand_name} | ratio {cand_name}/llama-server |",
        "|---|---|---|---|",
    ]
    for m in metrics:
        s = summary.get(m.key)
        if s is None or (s["ref"]["n"] == 0 and s["cand"]["n"] == 0):
            continue
        better = "higher" if m.higher_is_better else "lower"
        tag = f" [{m.ref.removeprefix('llama-server ')}]" if m.ref else ""
        lines.append(
            f"| {m.label} ({better} is better) | {fmt_spread(s['ref'])}{tag} | "
            f"{fmt_spread(s['cand'])} | {fmt_spread(s['ratio'])} |"
        )
    return "\n".join(lines)


def render_checks(results: list[dict[str, Any]]) -> str:
    """The issue's targets with the measured value and PASS/FAIL."""
    lines = ["| target | measured | goal | result |", "|---|---|---|---|"]
    for r in results:
        is_ratio = r["kind"] == "ratio" or "_over_" in r["metric"]
        unit = "x" if is_ratio else (" s" if r["metric"].endswith("_s") else "")
        unit = unit if math.isfinite(r["value"]) else ""
        lines.append(
            f"| {r['check']} | {fmt(r['value'])}{unit} | {r['target']} | **{r['verdict']}** |"
        )
    return "\n".join(lines)
