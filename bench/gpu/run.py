"""One command on a machine with an NVIDIA GPU: innkeeper against llama-server, same build.

`python -m bench.gpu` (what `make bench-gpu` calls):

1. builds llama.cpp with CUDA from the sources the pinned llama-cpp-python vendors, once, into
   the bench cache (bench/gpu/build.py), and runs innkeeper on that very build's libraries;
2. writes models with the shapes of Llama-3.1-8B and SmolLM2-135M (bench/gpu/shapes.py);
3. per model, measures each server's GPU memory alone and compares innkeeper's with `innkeeper
   fit`'s plan (bench/gpu/memory.py); on the first model, a partial offload too;
4. runs the CPU bench's scenarios and paired rounds on both (bench/run.py's run_model), with
   `-ngl 99` for llama-server and `--gpu-layers auto` for innkeeper.

Output: results.json and results.md in --out. `--smoke` runs the same pipeline on CPU with the
135M shape and a tiny budget: a check that the harness works, not a result.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from bench import loadgen, servers
from bench import run as cpu_bench
from bench.gpu import build, memory, nvml, shapes
from bench.llama_server import LlamaServerError, cache_root
from bench.models import BenchModel

SCENARIOS = "single,prompt,concurrency"
# --smoke: every stage once, each as small as it can be and still mean something.
SMOKE = loadgen.ScenarioConfig(
    single_requests=1,
    single_tokens=8,
    short_prompt_tokens=16,
    prompt_requests=1,
    prompt_tokens=64,
    conc_levels=(1, 2),
    conc_per_client=1,
    conc_tokens=8,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__)
    p.add_argument(
        "--shapes",
        default=None,
        help="comma-separated: " + ", ".join(shapes.SHAPES) + " (default: 8b,tiny; --smoke: tiny)",
    )
    p.add_argument("--rounds", type=int, help="interleaved rounds (default 3; --smoke: 1)")
    p.add_argument("--scenarios", default=SCENARIOS, help=f"default {SCENARIOS}")
    p.add_argument("--ctx-size", type=int, help="default 8192 (--smoke: 2048)")
    p.add_argument(
        "--threads",
        type=int,
        default=min(8, psutil.cpu_count(logical=False) or 2),
        help="CPU threads of both servers (default: physical cores, at most 8)",
    )
    p.add_argument(
        "--max-minutes",
        type=float,
        default=math.inf,
        help="start no new round after this many minutes (split between the models)",
    )
    p.add_argument("--cuda-arch", help="CMAKE_CUDA_ARCHITECTURES (default: the GPUs' own)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="parallel compile jobs")
    p.add_argument(
        "--llama-server",
        type=Path,
        help="use this llama-server instead of building one (its folder's libllama, if any, "
        "also goes under innkeeper)",
    )
    p.add_argument(
        "--lib-dir",
        type=Path,
        help="the llama.cpp shared libraries innkeeper runs on (default: the llama-server's "
        "folder)",
    )
    p.add_argument(
        "--out", type=Path, help="result folder (default bench/results/<date-time>-gpu/)"
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="the whole pipeline on CPU-sized settings: tiny shape, tiny budget, no GPU needed",
    )
    args = p.parse_args(argv)
    args.shapes = (args.shapes or ("tiny" if args.smoke else "8b,tiny")).split(",")
    unknown = [s for s in args.shapes if s not in shapes.SHAPES]
    if unknown:
        p.error(f"unknown shape(s) {unknown}; known: {', '.join(shapes.SHAPES)}")
    args.rounds = args.rounds or (1 if args.smoke else 3)
    args.ctx_size = args.ctx_size or (2048 if args.smoke else shapes.CTX)
    if args.out is None:
        stamp = dt.datetime.now().strftime("%Y-%m-%d-%H%M")
        args.out = (
            cpu_bench.REPO / "bench" / "results" / f"{stamp}-gpu{'-smoke' if args.smoke else ''}"
        )
    return args


def bench_args(args: argparse.Namespace, binary: Path) -> argparse.Namespace:
    """The CPU bench's arguments for the same run: its rounds, gate and servers, on the GPU."""
    argv = [
        "--llama-server", str(binary), "--out", str(args.out), "--rounds", str(args.rounds),
        "--scenarios", args.scenarios, "--threads", str(args.threads),
        "--ctx-size", str(args.ctx_size), "--flash-attn", "on",
        "--llama-arg=-ngl", "--llama-arg=99", "--innkeeper-arg=--gpu-layers=auto",
        "--max-minutes", str(args.max_minutes),
    ]  # fmt: skip
    if args.smoke:  # a shared CPU: do not wait for quiet minutes, do not repeat pairs
        argv += ["--gate-wait", "0", "--retries", "0"]
    else:
        argv += ["--gate-wait", "20"]
    return cpu_bench.parse_args(argv)


def footprints(
    model: BenchModel, n_layers: int, rargs: argparse.Namespace, binary: Path, partial: bool
) -> list[memory.Footprint]:
    """Each server alone on the GPU with `model`; innkeeper's against fit's plan."""
    log_dir = rargs.out / "logs"
    common = {"threads": rargs.threads, "ctx_size": rargs.ctx_size, "flash_attn": "on"}
    layers: list[int | None] = [None, max(1, n_layers // 2)] if partial else [None]
    rows = []
    for n in layers:
        flag = "auto" if n is None else str(n)
        spec = servers.innkeeper_spec(model.path, extra=["--gpu-layers", flag], **common)
        row = memory.measure(spec, flag, log_dir)
        plan = memory.fit_plan(model.path, rargs.ctx_size, "on", n)
        row.planned_mib = memory.planned_gpu_mib(plan)
        rows.append(row)
    ref = servers.llama_server_spec(binary, model.path, parallel=4, extra=["-ngl", "99"], **common)
    rows.append(memory.measure(ref, "99", log_dir))
    return rows


def render(result: dict[str, Any]) -> str:
    """The CPU bench's tables, with the GPU, the build and the memory table first."""
    gpu = result["gpu"]
    names = ", ".join(f"{g['name']} (compute {g['compute_capability']})" for g in gpu["gpus"])
    head = [
        f"GPU: {names or 'none'}; driver {gpu['driver'] or 'n/a'}; innkeeper runs on "
        f"{gpu['libllama']} (GPU offload {'yes' if gpu['offload'] else 'no'}). "
        "Models: real shapes, synthetic Q4_0 weights, SmolLM2's tokenizer.",
        "",
        "## GPU memory",
        "",
        memory.render(result["memory"]),
    ]
    body = cpu_bench.render_markdown(result)
    title, rest = body.split("\n", 1)
    return "\n".join([title.replace("innkeeper bench", "innkeeper GPU bench"), "", *head, rest])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        binary = args.llama_server or build.cuda_llama_server(args.cuda_arch, args.jobs)
        lib_dir = args.lib_dir or binary.parent
        # Every innkeeper process from here on (servers, fit) loads llama.cpp from lib_dir.
        os.environ.update(build.with_site(build.innkeeper_site(lib_dir)))
        libllama, offload = build.loaded_llama()
    except LlamaServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if not offload and not args.smoke:
        print(
            f"error: llama.cpp in {lib_dir} cannot offload to a GPU (no GPU visible to it, or "
            "not a CUDA build); `--smoke` runs the pipeline on CPU",
            file=sys.stderr,
        )
        return 1
    from innkeeper.models.store import default_model_path

    folder = cache_root() / "models" / "synthetic"
    models = [
        (
            BenchModel(
                name,
                shapes.write_model(name, folder, default_model_path()),
                f"{shapes.SHAPES[name].description}, synthetic Q4_0",
            ),
            shapes.SHAPES[name].n_layer,
        )
        for name in args.shapes
    ]
    rargs = bench_args(args, binary)
    args.out.mkdir(parents=True, exist_ok=True)
    found = nvml.gpus()
    result: dict[str, Any] = {
        "meta": cpu_bench.run_meta(binary, rargs),
        "gpu": {
            "gpus": [g.__dict__ for g in found],
            "driver": found[0].driver if found else None,
            "lib_dir": str(lib_dir),
            "libllama": str(libllama),
            "offload": offload,
        },
        "memory": {},
        "models": {},
    }
    cfg = SMOKE if args.smoke else None
    start = time.monotonic()
    for i, (model, n_layers) in enumerate(models):
        left = args.max_minutes * 60 - (time.monotonic() - start)
        deadline = time.monotonic() + left / (len(models) - i)
        try:
            rows = footprints(model, n_layers, rargs, binary, partial=i == 0)
            result["memory"][model.name] = [r.as_dict() for r in rows]
            result["models"][model.name] = cpu_bench.run_model(model, rargs, binary, deadline, cfg)
        except (servers.ServerStartError, RuntimeError) as exc:
            print(f"error: {model.name}: {exc}", file=sys.stderr)
            return 1
        (args.out / "results.json").write_text(json.dumps(cpu_bench._json_safe(result), indent=1))
        if result["models"][model.name]["interrupted"]:
            break
    md = render(result)
    (args.out / "results.md").write_text(md)
    print(md)
    failed = [c for m in result["models"].values() for c in m["checks"] if c["verdict"] == "FAIL"]
    print(f"wrote {args.out / 'results.json'} and {args.out / 'results.md'}; "
          f"{len(failed)} target(s) FAIL")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
