"""innkeeper `serve --rpc` against `llama-server --rpc`: the same model, split the same way
over the same two RPC workers, in the same run.

`python -m bench.rpc` starts two `innkeeper worker`s on loopback ports (ggml's own RPC
server, the same for both sides), then, round after round, one server at a time (a worker
serves one client at a time): llama-server built from the pinned sdist with GGML_RPC, and
innkeeper, both with `--rpc A,B`, the same `--gpu-layers` and `--tensor-split 1,1`, one slot,
the same threads and context. Each round runs the single-stream decode and the cold-prompt
scenarios of `bench.run`; the order alternates (ABBA over an even number of rounds). Output:
results.json and results.md in --out, with the ratio of medians per metric.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from bench import loadgen, report, servers
from bench.llama_server import find_llama_server, server_version
from bench.models import resolve

REPO = Path(__file__).resolve().parent.parent
METRICS = {"single": ["decode_tps", "ttft_short_s"], "prompt": ["pp_tps", "ttft_prompt_s"]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.rpc", description=__doc__)
    p.add_argument("--model", default="smollm2", help="smollm2, gemma3 or a .gguf path")
    p.add_argument("--rounds", type=int, default=4, help="rounds, ABBA when even (default 4)")
    p.add_argument("--threads", type=int, default=2, help="main process threads (default 2)")
    p.add_argument("--worker-threads", type=int, default=2, help="per worker (default 2)")
    p.add_argument("--ctx-size", type=int, default=2048)
    p.add_argument(
        "--gpu-layers",
        type=int,
        default=-1,
        help="layers on the workers, split 1:1 (default: two thirds of the model's layers; "
        "the rest stay in the main process)",
    )
    p.add_argument("--llama-server", help="llama-server binary (else $LLAMA_SERVER, else build)")
    p.add_argument("--quick", action="store_true", help="smaller scenarios, 2 rounds")
    p.add_argument("--out", type=Path, help="result folder (default bench/results/<stamp>-rpc/)")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds = min(args.rounds, 2)
    if args.out is None:
        stamp = dt.datetime.now().strftime("%Y-%m-%d-%H%M")
        args.out = REPO / "bench" / "results" / f"{stamp}-rpc"
    return args


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


@contextlib.contextmanager
def workers(n: int, threads: int, log_dir: Path) -> Iterator[list[str]]:
    """`n` innkeeper workers on free loopback ports, until the block ends."""
    log_dir.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    endpoints = []
    try:
        for _ in range(n):
            port = servers.free_port()
            log = (log_dir / f"worker-{port}.log").open("wb")
            cmd = [sys.executable, "-m", "innkeeper", "worker", "--port", str(port)]
            cmd += ["--threads", str(threads)]
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
            endpoints.append(f"127.0.0.1:{port}")
        for endpoint, proc in zip(endpoints, procs, strict=True):
            _wait_for_worker(endpoint, proc)
        yield endpoints
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()


def _wait_for_worker(endpoint: str, proc: subprocess.Popen[bytes]) -> None:
    from innkeeper.engine import rpc_probe

    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"worker {endpoint} exited with {proc.returncode}")
        try:
            rpc_probe.probe(endpoint, timeout=2)
            return
        except rpc_probe.WorkerUnreachable:
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker {endpoint} never answered") from None
            time.sleep(0.2)


def n_layers(model: Path) -> int:
    from innkeeper.models.gguf_meta import read_gguf_spec

    return read_gguf_spec(model).n_layer


def specs(
    model: Path, endpoints: list[str], args: argparse.Namespace, binary: Path
) -> list[servers.ServerSpec]:
    common = {"threads": args.threads, "ctx_size": args.ctx_size, "flash_attn": "off"}
    rpc = ",".join(endpoints)
    layers = str(args.gpu_layers)
    ref = servers.llama_server_spec(
        binary, model, parallel=1, extra=["--rpc", rpc, "-ngl", layers, "-ts", "1,1"], **common
    )
    ref.name = "llama-server --rpc"
    cand = servers.innkeeper_spec(
        model,
        parallel=1,
        extra=["--rpc", rpc, "--gpu-layers", layers, "--tensor-split", "1,1"],
        **common,
    )
    cand.name = "innkeeper --rpc"
    return [ref, cand]


async def _measure(url: str, gen: loadgen.TextGen, cfg: loadgen.ScenarioConfig) -> dict:
    out: dict[str, Any] = {}
    async with loadgen.new_client() as client:

        async def count(text: str) -> int:
            return len(await loadgen.tokenize(client, url, text))

        target = loadgen.Target("server", url)
        warm = await loadgen.stream_completion(client, target, gen.cold(32), 8)
        if warm.error:
            raise RuntimeError(f"warm-up failed: {warm.error}")
        for scen in METRICS:
            res = await loadgen.SCENARIOS[scen](client, target, gen, cfg, count)
            if res.errors:
                raise RuntimeError(f"{scen}: {res.errors[0]}")
            out.update({k: res.metrics[k] for k in METRICS[scen]})
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    binary = find_llama_server(args.llama_server)
    model = resolve([args.model])[0]
    if args.gpu_layers < 0:
        args.gpu_layers = n_layers(model.path) * 2 // 3
    cfg = loadgen.ScenarioConfig.quick() if args.quick else loadgen.ScenarioConfig()
    rng = random.Random(1234)
    log_dir = args.out / "logs"
    runs: list[dict[str, Any]] = []
    with workers(2, args.worker_threads, log_dir) as endpoints:
        pair = specs(model.path, endpoints, args, binary)
        gen: loadgen.TextGen | None = None
        for rnd in range(args.rounds):
            order = pair if rnd % 2 == 0 else pair[::-1]
            for spec in order:
                spec.port = servers.free_port()
                _rebind_port(spec)
                _log(f"round {rnd + 1}: starting {spec.name}: {' '.join(spec.cmd)}")
                server = servers.start(spec, log_dir)
                try:
                    if gen is None:
                        gen = loadgen.TextGen(rng, asyncio.run(_calibrate(server.url, rng)))
                    metrics = asyncio.run(_measure(server.url, gen, cfg))
                finally:
                    server.stop()
                _log(f"round {rnd + 1}: {spec.name}: {metrics}")
                runs.append({"round": rnd, "server": spec.name, "metrics": metrics})
    return {
        "model": {"name": model.name, "path": str(model.path)},
        "llama_server": server_version(binary),
        "endpoints": "two innkeeper workers on 127.0.0.1",
        "settings": {
            "threads": args.threads,
            "worker_threads": args.worker_threads,
            "ctx_size": args.ctx_size,
            "gpu_layers": args.gpu_layers,
            "tensor_split": "1,1",
            "slots": 1,
        },
        "servers": {s.name: s.cmd for s in pair},
        "runs": runs,
        "summary": summarize(runs, [s.name for s in pair]),
    }


def _rebind_port(spec: servers.ServerSpec) -> None:
    """A fresh port per start: the command line carries it after `--port`."""
    i = spec.cmd.index("--port")
    spec.cmd[i + 1] = str(spec.port)


async def _calibrate(url: str, rng: random.Random) -> float:
    async with httpx.AsyncClient(timeout=60) as client:
        return await loadgen.calibrate(client, url, rng)


def summarize(runs: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """Per metric, each side's spread over rounds and the paired per-round ratio's spread
    (report.paired_ratios: innkeeper over llama-server, round by round)."""
    ref, cand = names
    rounds: list[report.Round] = []
    for rnd in sorted({r["round"] for r in runs}):
        sides = {r["server"]: r["metrics"] for r in runs if r["round"] == rnd}
        if ref in sides and cand in sides:
            rounds.append({"ref": sides[ref], "cand": sides[cand]})
    keys = [m for ms in METRICS.values() for m in ms]
    metrics = [m for m in report.metrics_for() if m.key in keys]
    return report.summarize(rounds, metrics)


def render(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [
        f"# innkeeper --rpc vs llama-server --rpc: {result['model']['name']}",
        "",
        f"llama-server: {result['llama_server']}. {result['endpoints']}; {s['gpu_layers']} "
        f"layers on the workers (tensor split {s['tensor_split']}), the rest in the main "
        f"process; threads {s['threads']} (workers {s['worker_threads']}), ctx "
        f"{s['ctx_size']}, {s['slots']} slot. Rounds: {len(result['runs']) // 2}, ABBA.",
        "",
        "| metric | llama-server | innkeeper | paired ratio innkeeper/llama-server (tok/s: >1 better; TTFT: <1 better) |",
        "|---|---|---|---|",
    ]
    for metric, v in result["summary"].items():
        lines.append(
            f"| {metric} | {report.fmt_spread(v['ref'])} | {report.fmt_spread(v['cand'])} "
            f"| **{report.fmt_spread(v['ratio'])}** |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    result = run(args)
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    text = render(result)
    (args.out / "results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
