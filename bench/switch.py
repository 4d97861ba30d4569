"""Switching models: innkeeper's registry against llama-server's router mode, same two models.

`python -m bench.switch` puts SmolLM2 (embedded) and Gemma 3 270M in one models folder and
starts both servers on it with one model loaded at most (`--models-max 1`: every switch
unloads A and loads B), the same threads, context, slots and flash-attn setting. Then each
server gets requests that alternate between the two models (streaming /v1/completions with
`model` set, a short unique prompt, 8 tokens), each switch followed by one request to the
model now loaded. Per switch, the time from sending the request to the first text chunk is
what a user waits after picking the other model: unload + load + prompt + first token. The
request after it is the warm baseline (prompt + first token alone).

Rounds interleave the servers (the order alternates), behind the bench's load gate and CPU
meter, and the ratio innkeeper/llama-server is paired within each round, as in `bench.run`.
Output: results.json and results.md in --out (default bench/results/<date-time>-switch/).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import random
import re
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from bench import cpu, loadgen, report, servers
from bench.llama_server import (
    LlamaServerError,
    find_llama_server,
)
from bench.models import BenchModel, ModelError, resolve
from bench.run import (
    REPO,
    _json_safe,
    _log,
    build_rounds,
    contamination,
    run_meta,
)

REF_NAME = "llama-server router"
SCENARIO = "switch"


class ModelIdError(RuntimeError):
    """A server's model listing has no entry for one of the bench's model files."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.switch", description=__doc__)
    p.add_argument(
        "--models",
        default="smollm2,gemma3",
        help="the two models to switch between: smollm2, gemma3 or .gguf paths "
        "(default smollm2,gemma3)",
    )
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument(
        "--switches",
        type=int,
        default=4,
        help="switches per server and round, alternating direction (default 4)",
    )
    p.add_argument("--out", type=Path, help="result folder (default bench/results/<date>-switch/)")
    p.add_argument("--llama-server", help="llama-server binary (else $LLAMA_SERVER, else build)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ctx-size", type=int, default=4096)
    p.add_argument("--parallel", type=int, default=4, help="slots on both sides (default 4)")
    p.add_argument("--flash-attn", choices=["off", "on"], default="off")
    p.add_argument("--models-max", type=int, default=1, help="models loaded at once (default 1)")
    p.add_argument("--prompt-tokens", type=int, default=16, help="unique prompt (default ~16)")
    p.add_argument("--max-tokens", type=int, default=8, help="tokens per request (default 8)")
    p.add_argument(
        "--candidate",
        choices=["innkeeper", "llama-server"],
        default="innkeeper",
        help="llama-server: a second router plays the candidate (checks the harness itself)",
    )
    p.add_argument("--innkeeper-arg", action="append", default=[], metavar="ARG")
    p.add_argument("--llama-arg", action="append", default=[], metavar="ARG")
    p.add_argument("--max-cores", type=float, default=0.7, help="load gate threshold (cores)")
    p.add_argument(
        "--gate-wait", type=float, default=30.0, help="load gate: run anyway after this (s)"
    )
    p.add_argument(
        "--retry-foreign",
        type=float,
        default=0.5,
        help="run a round's pair again when other processes used more cores than this",
    )
    p.add_argument("--retries", type=int, default=1)
    p.add_argument("--max-foreign", type=float, help="drop pairs above this many foreign cores")
    p.add_argument(
        "--max-minutes",
        type=float,
        default=math.inf,
        help="start no new round after this long; the first round always runs",
    )
    p.add_argument("--seed", type=int, help="prompt text seed (default: random per run)")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if len(args.models) != 2 or args.models[0] == args.models[1]:
        p.error("--models needs exactly two different models")
    if args.rounds < 1 or args.switches < 1:
        p.error("--rounds and --switches must be at least 1")
    if args.models_max < 1:
        p.error("--models-max must be at least 1")
    if args.seed is None:
        args.seed = random.SystemRandom().getrandbits(48)
    if args.out is None:
        stamp = dt.datetime.now().strftime("%Y-%m-%d-%H%M")
        args.out = REPO / "bench" / "results" / f"{stamp}-switch"
    return args


# ---------------------------------------------------------------- pure parts


def switch_plan(names: tuple[str, str], switches: int) -> list[tuple[str, str]]:
    """(kind, model) steps, starting with names[0] loaded: switch to the other model, then one
    warm request to it, and so on, alternating the direction."""
    steps: list[tuple[str, str]] = []
    for i in range(switches):
        target = names[1] if i % 2 == 0 else names[0]
        steps += [("switch", target), ("warm", target)]
    return steps


def parse_listing(body: Any) -> list[tuple[str, str]]:
    """(id, status) of each model in a `/models` or `/v1/models` reply; the status is
    llama-server's `status.value` or a plain string field, "" when there is none."""
    out = []
    for entry in body.get("data") or [] if isinstance(body, dict) else []:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            continue
        status = entry.get("status")
        if isinstance(status, dict):
            status = status.get("value")
        out.append((entry["id"], status if isinstance(status, str) else ""))
    return out


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower().removesuffix(".gguf"))


def model_id_for(ids: list[str], path: Path) -> str:
    """The listed id of a model file: its file stem (llama-server's rule), else the one id
    equal to it once case, `.gguf` and punctuation are ignored, else the one that contains it."""
    if path.stem in ids or path.name in ids:
        return path.stem if path.stem in ids else path.name
    want = _norm(path.stem)
    for match in (lambda i: _norm(i) == want, lambda i: want in _norm(i)):
        found = [i for i in ids if match(i)]
        if len(found) == 1:
            return found[0]
    raise ModelIdError(f"no single model id for {path.name} in the listing {ids}")


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else math.nan


def sequence_metrics(records: list[dict[str, Any]], names: tuple[str, str]) -> dict[str, float]:
    """One server's run: median TTFT after a switch (and per direction), of the warm request,
    their difference, failed requests, and the most models seen loaded at once."""

    def ttfts(kind: str, model: str | None = None) -> list[float]:
        return [
            r["ttft"]
            for r in records
            if r["kind"] == kind and r["error"] is None and model in (None, r["model"])
        ]

    switch, warm = _median(ttfts("switch")), _median(ttfts("warm"))
    metrics = {
        "switch_s": switch,
        "warm_s": warm,
        "switch_overhead_s": switch - warm,
        "failed": float(sum(1 for r in records if r["error"] is not None)),
    }
    for name in names:
        metrics[f"switch_to_{name}_s"] = _median(ttfts("switch", name))
    loaded = [r["loaded"] for r in records if r.get("loaded") is not None]
    if loaded:
        metrics["max_loaded"] = float(max(loaded))
    return metrics


def metrics_for(names: tuple[str, str]) -> list[report.Metric]:
    """The table rows, in order."""
    rows = [
        report.Metric(
            "switch_s", "TTFT after a switch (unload + load + prompt), s", False, REF_NAME
        ),
        *(
            report.Metric(f"switch_to_{n}_s", f"TTFT after a switch to {n}, s", False, REF_NAME)
            for n in names
        ),
        report.Metric("warm_s", "TTFT, model already loaded, s", False, REF_NAME),
        report.Metric("switch_overhead_s", "switch cost beyond a warm request, s", False, REF_NAME),
    ]
    return rows


def side_totals(runs: list[dict[str, Any]], side: str) -> dict[str, float]:
    """Over one side's kept runs: successful switches, failed requests, and the most models
    it listed as loaded at once (the sanity check of --models-max)."""
    reqs = [q for run in runs if run["role"] == side for q in run["requests"]]
    loaded = [q["loaded"] for q in reqs if q.get("loaded") is not None]
    return {
        "switches": float(sum(1 for q in reqs if q["kind"] == "switch" and q["error"] is None)),
        "failed": float(sum(1 for q in reqs if q["error"] is not None)),
        "max_loaded": float(max(loaded)) if loaded else math.nan,
    }


def _count(value: float) -> str:
    return f"{value:.0f}" if math.isfinite(value) else "n/a"


def render_markdown(result: dict[str, Any]) -> str:
    """The report: settings, the table (median over rounds, paired ratio) and the sanity line."""
    meta, args = result["meta"], result["meta"]["args"]
    names = tuple(result["models"])
    cand = "innkeeper" if args["candidate"] == "innkeeper" else "candidate"
    tot = {side: side_totals(result["runs"], side) for side in ("ref", "cand")}
    models = ", ".join(f"{m['description']} ({n})" for n, m in result["models"].items())
    lines = [
        f"# innkeeper bench: switching models, {meta['date']}",
        "",
        f"{meta['machine']}; llama-server {meta['llama_server_version']} (llama-cpp-python "
        f"{meta['llama_cpp_python']} vendored sources) in router mode; innkeeper "
        f"{meta['innkeeper_version']} (commit {meta['git_commit']}); models: {models}; "
        f"--models-max {args['models_max']}, threads {args['threads']}, context "
        f"{args['ctx_size']}, {args['parallel']} slots, flash-attn {args['flash_attn']}; "
        f"{result['rounds_done']} interleaved rounds of {args['switches']} switches per server.",
        "",
        "Each switch is a streaming /v1/completions request naming the model not loaded "
        f"(~{args['prompt_tokens']}-token unique prompt, {args['max_tokens']} tokens); its TTFT "
        "includes unloading the other model and loading this one. The warm row is the request "
        "right after it, to the same model. Values: median over rounds of each round's median "
        f"(min-max). Ratio: median of the per-round ratios {cand}/llama-server.",
        "",
        report.render_table(result["summary"], metrics_for(names), cand),
        "",
        f"Switches measured: llama-server {tot['ref']['switches']:.0f}, {cand} "
        f"{tot['cand']['switches']:.0f}; failed requests: llama-server "
        f"{tot['ref']['failed']:.0f}, {cand} {tot['cand']['failed']:.0f}; most models loaded "
        f"at once: llama-server {_count(tot['ref']['max_loaded'])}, {cand} "
        f"{_count(tot['cand']['max_loaded'])}.",
        "",
        contamination(result["runs"]),
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- talking to the servers


async def _listing(client: httpx.AsyncClient, url: str) -> list[tuple[str, str]]:
    """The server's models: the router listing `/models`, else OpenAI's `/v1/models`."""
    for path in ("/models", "/v1/models"):
        resp = await client.get(url + path, timeout=30)
        if resp.status_code == 200:
            found = parse_listing(resp.json())
            if found:
                return found
    return []


async def _resolve_ids(url: str, paths: list[Path]) -> list[str]:
    async with loadgen.new_client() as client:
        ids = [i for i, _ in await _listing(client, url)]
    return [model_id_for(ids, p) for p in paths]


async def _sequence(
    server: servers.RunningServer,
    ids: dict[str, str],
    steps: list[tuple[str, str]],
    gen: loadgen.TextGen,
    args: argparse.Namespace,
    *,
    probe: bool = True,
) -> list[dict[str, Any]]:
    """Send the steps one after another; after each, count the models the server says are
    loaded (outside the timed request)."""
    records = []
    async with loadgen.new_client() as client:
        for kind, name in steps:
            target = loadgen.Target(server.spec.name, server.url, extra={"model": ids[name]})
            res = await loadgen.stream_completion(
                client, target, gen.cold(args.prompt_tokens), args.max_tokens
            )
            loaded = None
            if probe:
                try:
                    listing = await _listing(client, server.url)
                    loaded = sum(1 for _, status in listing if status == "loaded")
                except httpx.HTTPError:
                    pass
            records.append({"kind": kind, "model": name, **res.brief(), "loaded": loaded})
    return records


def _run_one(
    rnd: int,
    server: servers.RunningServer,
    role: str,
    ids: dict[str, str],
    names: tuple[str, str],
    gen: loadgen.TextGen,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """One server's switch sequence behind the load gate, under the CPU meter."""
    if server.proc.poll() is not None:
        raise RuntimeError(f"{server.spec.name} died:\n{server.log_tail()}")
    # Start from names[0] loaded (unmeasured), so every timed switch unloads one model.
    asyncio.run(_sequence(server, ids, [("warm", names[0])], gen, args, probe=False))
    gate = cpu.wait_for_idle(args.max_cores, args.gate_wait)
    meter = cpu.CpuMeter(server.pid)
    records = asyncio.run(_sequence(server, ids, switch_plan(names, args.switches), gen, args))
    use = meter.stop()
    metrics = sequence_metrics(records, names)
    errors = [f"{r['kind']} {r['model']}: {r['error']}" for r in records if r["error"]]
    most = _count(metrics.get("max_loaded", math.nan))
    _log(
        f"r{rnd + 1} {server.spec.name:<36} switch {report.fmt(metrics['switch_s'])} s, warm "
        f"{report.fmt(metrics['warm_s'])} s, most loaded {most} "
        f"[cpu srv {use.server:.2f} foreign {use.foreign:.2f}"
        f"{'' if gate.ok else ' GATE TIMEOUT'}]"
        + (f" ERRORS: {len(errors)} ({errors[0]})" if errors else "")
    )
    return {
        "round": rnd, "scenario": SCENARIO, "server": server.spec.name, "role": role,
        "metrics": metrics, "errors": errors, "gate": cpu.as_dict(gate),
        "cpu": cpu.as_dict(use), "requests": records,
    }  # fmt: skip


def _models_dir(models: list[BenchModel], root: Path) -> Path:
    """A folder holding (links to) the two model files, as a user's models folder would."""
    folder = root / "models"
    folder.mkdir()
    for model in models:
        link = folder / model.path.name
        link.symlink_to(model.path.resolve())
    return folder


def _specs(binary: Path, models_dir: Path, args: argparse.Namespace) -> list[servers.ServerSpec]:
    common = {
        "models_max": args.models_max,
        "parallel": args.parallel,
        "threads": args.threads,
        "ctx_size": args.ctx_size,
        "flash_attn": args.flash_attn,
    }
    ref = servers.llama_router_spec(binary, models_dir, extra=args.llama_arg, **common)
    if args.candidate == "innkeeper":
        cand = servers.innkeeper_router_spec(models_dir, extra=args.innkeeper_arg, **common)
    else:
        cand = servers.llama_router_spec(binary, models_dir, extra=args.llama_arg, **common)
        cand.name = f"candidate {cand.name}"
    cand.role = "cand"
    return [ref, cand]


def run_switch(
    models: list[BenchModel], binary: Path, args: argparse.Namespace, work: Path
) -> dict[str, Any]:
    """Start both routers, run the interleaved rounds, stop them; the run's record."""
    names = (models[0].name, models[1].name)
    models_dir = _models_dir(models, work)
    started: dict[str, servers.RunningServer] = {}
    ids: dict[str, dict[str, str]] = {}
    runs: list[dict[str, Any]] = []
    discarded: list[dict[str, Any]] = []
    done_rounds = 0
    interrupted = False
    deadline = time.monotonic() + args.max_minutes * 60
    gen = loadgen.TextGen(random.Random(args.seed))
    try:
        for spec in _specs(binary, models_dir, args):
            _log(f"starting {spec.name}: {' '.join(spec.cmd)}")
            started[spec.role] = servers.start(spec, args.out / "logs")
        for role, server in started.items():
            found = asyncio.run(_resolve_ids(server.url, [m.path for m in models]))
            ids[role] = dict(zip(names, found, strict=True))
            _log(f"{server.spec.name}: model ids {ids[role]}")
            # Load each model once (file in the page cache, first-use costs paid).
            warm = asyncio.run(
                _sequence(server, ids[role], [("warm", names[1]), ("warm", names[0])], gen, args)
            )
            bad = [r["error"] for r in warm if r["error"]]
            if bad:
                raise RuntimeError(f"warm-up of {server.spec.name} failed: {bad[0]}")
        for rnd in range(args.rounds):
            if rnd > 0 and time.monotonic() > deadline:
                _log(f"time budget spent, stopping after {rnd} round(s)")
                break
            done_rounds = rnd + 1
            order = ["ref", "cand"] if rnd % 2 == 0 else ["cand", "ref"]
            for attempt in range(args.retries + 1):
                pair = [
                    _run_one(rnd, started[role], role, ids[role], names, gen, args)
                    for role in order
                ]
                worst = max(r["cpu"]["foreign"] for r in pair)
                if worst <= args.retry_foreign or attempt == args.retries:
                    runs += pair
                    break
                _log(f"r{rnd + 1}: other processes used {worst:.2f} cores: running it again")
                discarded += pair
    except KeyboardInterrupt:
        _log("interrupted; reporting the rounds measured so far")
        interrupted = True
    finally:
        for server in started.values():
            server.stop()
    rounds = build_rounds(runs, done_rounds, args.max_foreign)
    return {
        "models": {
            m.name: {
                "path": str(m.path),
                "description": m.description,
                "ids": {role: ids.get(role, {}).get(m.name) for role in started},
            }
            for m in models
        },
        "servers": {r: {"name": s.spec.name, "cmd": s.spec.cmd} for r, s in started.items()},
        "rounds_done": done_rounds,
        "interrupted": interrupted,
        "runs": runs,
        "discarded_runs": discarded,
        "rounds": rounds,
        "summary": report.summarize(rounds, metrics_for(names)),
    }


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # `timeout` or a kill stops like Ctrl-C: servers stopped (they run in their own sessions,
    # so they would outlive us), the rounds measured so far reported.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        binary = find_llama_server(args.llama_server)
        models = resolve(args.models)
    except (LlamaServerError, ModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    meta = run_meta(binary, args)
    _log(f"llama-server: {binary} ({meta['llama_server_version']}); out: {args.out}")
    with tempfile.TemporaryDirectory(prefix="innkeeper-switch-") as work:
        try:
            result = {"meta": meta, **run_switch(models, binary, args, Path(work))}
        except (servers.ServerStartError, ModelIdError, RuntimeError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    (args.out / "results.json").write_text(json.dumps(_json_safe(result), indent=1))
    md = render_markdown(result)
    (args.out / "results.md").write_text(md)
    print(md)
    _log(f"wrote {args.out / 'results.json'} and {args.out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
