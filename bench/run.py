"""One command: innkeeper against llama.cpp's llama-server, same model, same run.

`python -m bench.run` (what `make bench` calls) finds or builds llama-server from the
llama.cpp that llama-cpp-python vendors, then compares like with like: llama-server
-np N -kvu and innkeeper --parallel N (N = --parallel, default 4) on the same model, threads,
context and flash-attn setting run every scenario. The single-stream scenarios also run on
llama-server -np 1 against innkeeper --parallel 1, reported apart (--single-slot). Rounds
interleave: within a round each scenario runs on the two servers of a pair back to back, the
order alternating between rounds (ABBA over an even number of rounds), so each
innkeeper/llama-server ratio is paired in time. Output: results.json and results.md in --out.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import math
import platform
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from bench import cpu, loadgen, report, servers
from bench.llama_server import (
    LLAMA_CPP_PYTHON_VERSION,
    LlamaServerError,
    find_llama_server,
    server_version,
)
from bench.models import BenchModel, ModelError, resolve

REPO = Path(__file__).resolve().parent.parent
# Which servers each comparison pairs: every scenario runs on "same" (as many slots on both
# sides); the --single-slot scenarios also on "single" (one slot on both sides).
PAIRS = {"same": ("ref4", "cand"), "single": ("ref1", "cand1")}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    p.add_argument(
        "--models",
        help="comma-separated: smollm2, gemma3, fast or .gguf paths (default: smollm2,gemma3; "
        "--quick: smollm2)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        help="interleaved rounds, the order alternating: ABBA when even (default 4; --quick: 2)",
    )
    p.add_argument("--quick", action="store_true", help="~3-minute smoke run: smaller scenarios")
    p.add_argument("--out", type=Path, help="result folder (default bench/results/<date-time>/)")
    p.add_argument(
        "--scenarios",
        default="single,prompt,chat,revisit,concurrency",
        help="comma-separated subset of " + ",".join(loadgen.SCENARIOS),
    )
    p.add_argument("--llama-server", help="llama-server binary (else $LLAMA_SERVER, else build)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--gen-tokens",
        type=int,
        help="tokens each single-stream and concurrency request generates (default 128; "
        "--quick: 64 for concurrency); raise it for the `fast` model, whose 128 tokens take "
        "~40 ms",
    )
    p.add_argument("--ctx-size", type=int, default=4096)
    p.add_argument(
        "--flash-attn",
        choices=["off", "on"],
        default="off",
        help="same setting on both sides (default off, as in the peers' baseline)",
    )
    p.add_argument(
        "--parallel",
        "--ref-parallel",
        dest="parallel",
        type=int,
        default=4,
        help="slots on both sides for every scenario: llama-server -np N -kvu, innkeeper "
        "--parallel N (default 4)",
    )
    p.add_argument(
        "--single-slot",
        default="single",
        help="scenarios also compared with one slot on both sides (llama-server -np 1, "
        "innkeeper --parallel 1), reported apart; comma-separated, empty for none "
        "(default single)",
    )
    p.add_argument(
        "--candidate",
        choices=["innkeeper", "llama-server"],
        default="innkeeper",
        help="llama-server: a second llama-server -np 4 -kvu plays the candidate "
        "(checks the harness itself: ratios should sit near 1)",
    )
    p.add_argument(
        "--innkeeper-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for `innkeeper serve` (repeat: --innkeeper-arg=--parallel=4)",
    )
    p.add_argument(
        "--llama-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for every llama-server (repeat)",
    )
    p.add_argument(
        "--max-cores",
        type=float,
        default=0.7,
        help="load gate: start a scenario when other load is below this many cores",
    )
    p.add_argument(
        "--gate-wait",
        type=float,
        help="load gate: give up waiting after this many "
        "seconds and run anyway, recorded (default 120; --quick: 20)",
    )
    p.add_argument(
        "--max-foreign",
        type=float,
        help="drop a round's pair when other processes used more than this many cores",
    )
    p.add_argument(
        "--retry-foreign",
        type=float,
        default=0.5,
        help="run a scenario pair again when other processes used more than this "
        "many cores during it (default 0.5)",
    )
    p.add_argument("--retries", type=int, default=1, help="how often at most (default 1)")
    p.add_argument(
        "--max-minutes",
        type=float,
        default=math.inf,
        help="start no new round after this share of the time (split between the "
        "models); the first round always runs",
    )
    p.add_argument("--seed", type=int, help="prompt text seed (default: random per run)")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target FAILs")
    args = p.parse_args(argv)
    args.models = (args.models or ("smollm2" if args.quick else "smollm2,gemma3")).split(",")
    args.rounds = args.rounds or (2 if args.quick else 4)
    args.gate_wait = (
        args.gate_wait if args.gate_wait is not None else (20.0 if args.quick else 120.0)
    )
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    args.single_slot = [s.strip() for s in args.single_slot.split(",") if s.strip()]
    unknown = [s for s in args.scenarios + args.single_slot if s not in loadgen.SCENARIOS]
    if unknown:
        p.error(f"unknown scenario(s) {unknown}; known: {', '.join(loadgen.SCENARIOS)}")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    if args.gen_tokens is not None and args.gen_tokens < 2:
        p.error("--gen-tokens must be at least 2 (decode speed is measured after the first)")
    if args.seed is None:
        args.seed = random.SystemRandom().getrandbits(48)
    if args.out is None:
        stamp = dt.datetime.now().strftime("%Y-%m-%d-%H%M")
        args.out = REPO / "bench" / "results" / (stamp + ("-quick" if args.quick else ""))
    return args


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return out.stdout.strip() or "none"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _innkeeper_version() -> str:
    try:
        import innkeeper

        return str(getattr(innkeeper, "__version__", "unknown"))
    except ImportError:
        return "not installed"


def _specs(model: BenchModel, args: argparse.Namespace, binary: Path) -> list[servers.ServerSpec]:
    """The servers of both comparisons: N slots on each side, and one slot on each side
    when a --single-slot scenario runs."""
    common = {"threads": args.threads, "ctx_size": args.ctx_size, "flash_attn": args.flash_attn}
    slots = [args.parallel]
    if any(s in args.scenarios for s in args.single_slot) and args.parallel != 1:
        slots.append(1)
    specs = []
    for n in slots:
        specs.append(
            servers.llama_server_spec(
                binary, model.path, parallel=n, extra=args.llama_arg, **common
            )
        )
        if args.candidate == "innkeeper":
            cand = servers.innkeeper_spec(
                model.path, parallel=n, extra=args.innkeeper_arg, **common
            )
        else:
            cand = servers.llama_server_spec(
                binary, model.path, parallel=n, extra=args.llama_arg, **common
            )
            cand.name = f"candidate {cand.name}"
        cand.role = "cand1" if n == 1 else "cand"
        specs.append(cand)
    if args.parallel == 1:  # one comparison serves both: the same servers under both names
        for spec in specs:
            spec.role = {"ref1": "ref4", "cand1": "cand"}.get(spec.role, spec.role)
    return specs


def _pairs(scen: str, args: argparse.Namespace) -> list[str]:
    """The comparisons scenario `scen` runs in."""
    if scen in args.single_slot and args.parallel != 1:
        return ["same", "single"]
    return ["same"]


async def _run_scenario(
    name: str,
    server: servers.RunningServer,
    tokenizer_url: str,
    gen: loadgen.TextGen,
    cfg: loadgen.ScenarioConfig,
) -> loadgen.ScenarioResult:
    async with loadgen.new_client() as client:

        async def count(text: str) -> int:
            return len(await loadgen.tokenize(client, tokenizer_url, text))

        target = loadgen.Target(server.spec.name, server.url)
        return await loadgen.SCENARIOS[name](client, target, gen, cfg, count)


async def _warm_up(url: str, name: str) -> loadgen.RequestResult:
    async with loadgen.new_client() as client:
        return await loadgen.stream_completion(client, loadgen.Target(name, url), "Hello there.", 8)


async def _calibrate(url: str, rng: random.Random) -> float:
    async with loadgen.new_client() as client:
        return await loadgen.calibrate(client, url, rng)


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _fmt_metrics(metrics: dict[str, float], keys: list[str]) -> str:
    return " ".join(f"{k}={report.fmt(metrics[k])}" for k in keys if k in metrics)


HEADLINE = {
    "single": ["decode_tps", "ttft_short_s"],
    "prompt": ["pp_tps", "ttft_prompt_s"],
    "chat": ["chat_t1_s", "chat_tN_s", "chat_tN_over_cold", "trim_s", "trim_over_cold"],
    "revisit": ["revisit_warm_s", "revisit_s", "revisit_overhead_s"],
    "concurrency": ["agg_c1", "agg_c4", "agg_c8", "ttft_med_c4", "ttft_max_c8"],
}


def _run_one(
    model: str,
    rnd: int,
    scen: str,
    server: servers.RunningServer,
    tokenizer_url: str,
    gen: loadgen.TextGen,
    cfg: loadgen.ScenarioConfig,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """One scenario on one server, behind the load gate and under the CPU meter."""
    if server.proc.poll() is not None:
        raise RuntimeError(f"{server.spec.name} died:\n{server.log_tail()}")
    gate = cpu.wait_for_idle(args.max_cores, args.gate_wait)
    meter = cpu.CpuMeter(server.pid)
    res = asyncio.run(_run_scenario(scen, server, tokenizer_url, gen, cfg))
    use = meter.stop()
    err = f" ERRORS: {len(res.errors)} ({res.errors[0]})" if res.errors else ""
    _log(
        f"{model} r{rnd + 1} {scen:<11} {server.spec.name:<24} "
        f"{_fmt_metrics(res.metrics, HEADLINE.get(scen, []))} "
        f"[cpu srv {use.server:.2f} foreign {use.foreign:.2f}"
        f"{'' if gate.ok else ' GATE TIMEOUT'}]{err}"
    )
    return {
        "round": rnd, "scenario": scen, "server": server.spec.name,
        "role": "cand" if server.spec.role.startswith("cand") else "ref",
        "group": "single" if server.spec.role.endswith("1") else "same",
        "metrics": res.metrics, "errors": res.errors,
        "gate": cpu.as_dict(gate), "cpu": cpu.as_dict(use),
        "requests": res.requests,
    }  # fmt: skip


def _llama_server_kv_mib(
    model: BenchModel, args: argparse.Namespace, binary: Path, log_dir: Path
) -> float | None:
    """KV MiB llama-server -np 4 -kvu allocates, from its own log.

    Its default verbosity hides llama.cpp's `llama_kv_cache: size` lines and `-lv 4` would
    also log per request, so a separate instance with `-lv 4` starts, logs and stops: the
    measured servers run as usual.
    """
    spec = servers.llama_server_spec(
        binary,
        model.path,
        parallel=args.parallel,
        threads=args.threads,
        ctx_size=args.ctx_size,
        flash_attn=args.flash_attn,
        extra=[*(args.llama_arg or []), "-lv", "4"],
    )
    spec.name = f"kv probe {spec.name}"
    try:
        server = servers.start(spec, log_dir)
    except servers.ServerStartError as exc:
        _log(f"{model.name}: llama-server KV probe failed: {exc}")
        return None
    try:
        return server.kv_mib()
    finally:
        server.stop()


def scenario_config(args: argparse.Namespace) -> loadgen.ScenarioConfig:
    """The scenarios' sizes: full or --quick, with --gen-tokens' length where given."""
    cfg = loadgen.ScenarioConfig.quick() if args.quick else loadgen.ScenarioConfig()
    if args.gen_tokens:
        cfg = dataclasses.replace(cfg, single_tokens=args.gen_tokens, conc_tokens=args.gen_tokens)
    return cfg


def run_model(
    model: BenchModel,
    args: argparse.Namespace,
    binary: Path,
    deadline: float = math.inf,
    cfg: loadgen.ScenarioConfig | None = None,
) -> dict[str, Any]:
    """Start the servers for one model, run the rounds, stop the servers; the model's record.

    No new round starts after `deadline` (time.monotonic()); the first always runs. `cfg`
    sizes the scenarios (default: full, or quick with --quick).
    """
    if cfg is None:
        cfg = scenario_config(args)
    log_dir = args.out / "logs"
    started: dict[str, servers.RunningServer] = {}
    runs: list[dict[str, Any]] = []
    done_rounds = 0
    interrupted = False
    gen: loadgen.TextGen | None = None
    discarded: list[dict[str, Any]] = []
    try:
        for spec in _specs(model, args, binary):
            _log(f"{model.name}: starting {spec.name}: {' '.join(spec.cmd)}")
            started[spec.role] = servers.start(spec, log_dir)
        # Prompt tokens are counted (when a reply has no usage) by a llama-server: same model.
        refs = [s for r, s in started.items() if r.startswith("ref")] or list(started.values())
        refs.sort(key=lambda s: s.spec.role != "ref4")
        tokenizer_url = refs[0].url
        rng = random.Random(args.seed)
        gen = loadgen.TextGen(rng, asyncio.run(_calibrate(tokenizer_url, rng)))
        _log(f"{model.name}: {gen.tokens_per_word:.2f} tokens per word")
        for role, server in started.items():
            warm = asyncio.run(_warm_up(server.url, server.spec.name))
            if warm.error:
                raise RuntimeError(f"warm-up of {server.spec.name} failed: {warm.error}")
            _log(f"{model.name}: warm-up {role} ok ({warm.total:.2f} s)")
        n = len(args.scenarios)
        for rnd in range(args.rounds):
            if rnd > 0 and time.monotonic() > deadline:
                _log(f"{model.name}: time budget spent, stopping after {rnd} round(s)")
                break
            done_rounds = rnd + 1
            for k in range(n):
                scen = args.scenarios[(rnd + k) % n]
                for group in _pairs(scen, args):
                    ref_role, cand_role = PAIRS[group]
                    pair = [started[ref_role], started[cand_role]]
                    if (rnd + k) % 2:
                        pair.reverse()
                    runs += _run_pair(model.name, rnd, scen, pair, tokenizer_url, gen, cfg, args,
                                      discarded)  # fmt: skip
    except KeyboardInterrupt:
        # Ctrl-C: keep what was measured; main() reports it and runs no further model.
        _log(f"{model.name}: interrupted; reporting the pairs measured so far")
        interrupted = True
    finally:
        for server in started.values():
            server.stop()
    rounds = build_rounds(runs, done_rounds, args.max_foreign)
    single = build_rounds(runs, done_rounds, args.max_foreign, group="single")
    metrics = report.metrics_for(cfg.conc_levels, cfg.chat_turns)
    kv = {role: s.kv_mib() for role, s in started.items()}
    kv["ref4"] = _llama_server_kv_mib(model, args, binary, log_dir)
    return {
        "model": {"name": model.name, "path": str(model.path), "description": model.description},
        "servers": {r: {"name": s.spec.name, "cmd": s.spec.cmd} for r, s in started.items()},
        "tokens_per_word": gen.tokens_per_word if gen else None,
        "config": cfg.__dict__,
        "rounds_done": done_rounds,
        "interrupted": interrupted,
        "runs": runs,
        "discarded_runs": discarded,
        "rounds": rounds,
        "summary": report.summarize(rounds, metrics),
        "kv_mib": kv,
        "checks": [*report.evaluate(rounds), report.kv_check(kv)],
        "single_slot": {
            "rounds": single,
            "summary": report.summarize(single, metrics),
            "checks": report.evaluate(single, report.SINGLE_SLOT_CHECKS),
        },
    }


def _run_pair(
    model: str,
    rnd: int,
    scen: str,
    pair: list[servers.RunningServer],
    tokenizer_url: str,
    gen: loadgen.TextGen,
    cfg: loadgen.ScenarioConfig,
    args: argparse.Namespace,
    discarded: list[dict[str, Any]],
) -> list[dict[str, Any]]:
    """One scenario on both servers of a pair, again when other processes got in the way."""
    for attempt in range(args.retries + 1):
        pair_runs = [
            _run_one(model, rnd, scen, server, tokenizer_url, gen, cfg, args) for server in pair
        ]
        worst = max(r["cpu"]["foreign"] for r in pair_runs)
        if worst <= args.retry_foreign or attempt == args.retries:
            return pair_runs
        _log(f"{model} r{rnd + 1} {scen}: other processes used {worst:.2f} "
             "cores: running the pair again")  # fmt: skip
        discarded += pair_runs
    return []


def build_rounds(
    runs: list[dict[str, Any]], n_rounds: int, max_foreign: float | None, group: str = "same"
) -> list[report.Round]:
    """Per round, the merged metrics of each side of one comparison (`group`: "same" slots,
    or "single" slot); a pair over `max_foreign` cores is dropped."""
    rounds: list[report.Round] = [{"ref": {}, "cand": {}} for _ in range(n_rounds)]
    by_key: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for run in runs:
        if run.get("group", "same") != group:
            continue
        by_key.setdefault((run["round"], run["scenario"]), []).append(run)
    for (rnd, _scen), pair in by_key.items():
        if max_foreign is not None and any(r["cpu"]["foreign"] > max_foreign for r in pair):
            continue
        for run in pair:
            rounds[rnd][run["role"]].update(report.with_derived(run["metrics"]))
    return rounds


def contamination(runs: list[dict[str, Any]]) -> str:
    """One line: the worst foreign CPU use seen, and how many scenario runs had > 0.3 cores."""
    foreign = [r["cpu"]["foreign"] for r in runs]
    gated = sum(1 for r in runs if not r["gate"]["ok"])
    if not foreign:
        return ""
    dirty = sum(1 for f in foreign if f > 0.3)
    return (
        f"Other processes: max {max(foreign):.2f} cores during a scenario; {dirty} of "
        f"{len(runs)} scenario runs above 0.3 cores; {gated} load-gate timeouts."
    )


def render_markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    cand = "innkeeper" if meta["args"]["candidate"] == "innkeeper" else "candidate"
    quick = " (--quick)" if meta["args"]["quick"] else ""
    done = sorted({m.get("rounds_done", meta["args"]["rounds"]) for m in result["models"].values()})
    rounds = "/".join(str(d) for d in done) or str(meta["args"]["rounds"])
    lines = [
        f"# innkeeper bench, {meta['date']}",
        "",
        f"{meta['machine']}; llama-server {meta['llama_server_version']} (llama-cpp-python "
        f"{meta['llama_cpp_python']} vendored sources); innkeeper {meta['innkeeper_version']} "
        f"(commit {meta['git_commit']}); threads {meta['args']['threads']}, context "
        f"{meta['args']['ctx_size']}, flash-attn {meta['args']['flash_attn']}; "
        f"{rounds} interleaved rounds{quick}.",
        "",
        "Values: median over rounds (min-max). Ratio: median over rounds of the per-round "
        f"ratio {cand}/llama-server (both measured in the same minutes, the order "
        f"alternating). Both sides have {meta['args']['parallel']} slot(s) in every row; the "
        "single-slot comparison (one slot each) follows each model's table.",
    ]
    for name, m in result["models"].items():
        metrics = report.metrics_for(tuple(m["config"]["conc_levels"]), m["config"]["chat_turns"])
        ref = next((s["name"] for r, s in m["servers"].items() if r == "ref4"), "llama-server")
        lines += [
            "",
            f"## {m['model']['description']} ({name})",
            "",
            report.render_table(m["summary"], metrics, cand, ref),
            "",
            report.render_checks(m["checks"]),
        ]
        single = m.get("single_slot")
        if single and any(r["ref"] or r["cand"] for r in single["rounds"]):
            lines += [
                "",
                "### One slot on both sides (llama-server -np 1, innkeeper --parallel 1)",
                "",
                report.render_table(single["summary"], metrics, cand, report.NP1),
                "",
                report.render_checks(single["checks"]),
            ]
        lines += ["", contamination(m["runs"])]
    return "\n".join(lines) + "\n"


def _json_safe(obj: Any) -> Any:
    """NaN is not JSON: write null instead."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def run_meta(binary: Path, args: argparse.Namespace) -> dict[str, Any]:
    """What a result file says about the run: when, where, which builds, which arguments."""
    return {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{_cpu_name()}, {psutil.cpu_count()} CPUs, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB",
        "llama_server": str(binary),
        "llama_server_version": server_version(binary),
        "llama_cpp_python": LLAMA_CPP_PYTHON_VERSION,
        "innkeeper_version": _innkeeper_version(),
        "git_commit": _git_commit(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        binary = find_llama_server(args.llama_server)
        models = resolve(args.models)
    except (LlamaServerError, ModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"meta": run_meta(binary, args), "models": {}}
    _log(f"llama-server: {binary} ({result['meta']['llama_server_version']}); out: {args.out}")
    start = time.monotonic()
    for i, model in enumerate(models):
        # Each model gets an equal share of what is left of --max-minutes.
        left = args.max_minutes * 60 - (time.monotonic() - start)
        deadline = time.monotonic() + left / (len(models) - i)
        try:
            result["models"][model.name] = run_model(model, args, binary, deadline)
        except (servers.ServerStartError, RuntimeError) as exc:
            print(f"error: {model.name}: {exc}", file=sys.stderr)
            return 1
        (args.out / "results.json").write_text(json.dumps(_json_safe(result), indent=1))
        if result["models"][model.name]["interrupted"]:
            break
    md = render_markdown(result)
    (args.out / "results.md").write_text(md)
    print(md)
    _log(f"wrote {args.out / 'results.json'} and {args.out / 'results.md'}")
    failed = any(c["verdict"] != "PASS" for m in result["models"].values() for c in m["checks"])
    return 1 if (args.strict and failed) else 0


if __name__ == "__main__":
    sys.exit(main())
