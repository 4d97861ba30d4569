"""What `python -m bench.overhead` compares innkeeper's per-token cost with, in its rounds.

`Peer`: llama-server on the same model and settings, measured the same way (`--peer`).
`plain_result`: runs with llama.cpp's plain sampler chains (`--compare-shortcuts`).
`wake_floor`: a bare cross-thread wake at the token rate (`--wake-floor`).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.overhead import (
    Sample,
    all_threads_cpu_ns,
    median_of,
    request_body,
    run_client,
    thread_cpu_ns,
)


class Peer:
    """llama-server on the same model and settings, fed the same client and request: CPU per
    token of its decode thread (its busiest) and of all its other threads together (HTTP)."""

    def __init__(self, args: argparse.Namespace, spec: Any = None) -> None:
        """`spec` (a `bench.servers.ServerSpec`): another server to measure instead (tests)."""
        from bench import servers
        from bench.llama_server import find_llama_server
        from innkeeper.models.store import default_model_path

        self.spec = spec or servers.llama_server_spec(
            find_llama_server(args.llama_server),
            args.model or default_model_path(),
            parallel=args.parallel,
            threads=args.threads,
            ctx_size=args.ctx_size,
            flash_attn=args.flash_attn,
        )
        self._logs = tempfile.TemporaryDirectory()
        self.server = servers.start(self.spec, Path(self._logs.name))
        # llama-server has no Ollama routes: its OpenAI completion stands in for them.
        route = args.route if args.route in ("openai", "chat", "llamacpp") else "openai"
        self.n = args.tokens * args.streams  # ignore_eos: exactly what was asked
        self.streams = args.streams
        path, body = request_body(route, 8)
        run_client(self.spec.port, path, body, 1)  # warm-up
        self.path, self.body = request_body(route, args.tokens, args.sampling)

    def run(self) -> dict[str, float]:
        pid = str(self.server.pid)
        cpu0 = all_threads_cpu_ns(pid)
        wall = run_client(self.spec.port, self.path, self.body, self.streams)
        time.sleep(0.05)
        cpu1 = all_threads_cpu_ns(pid)
        delta = {t: cpu1[t] - cpu0.get(t, 0) for t in cpu1}
        busiest = max(delta, key=lambda t: delta[t])
        return {
            "decode_thread_us": delta[busiest] / self.n / 1000,
            "other_threads_us": (sum(delta.values()) - delta[busiest]) / self.n / 1000,
            "wall_s": wall,
        }

    def result(self, runs: list[dict[str, float]], ours: list[Sample]) -> dict[str, Any]:
        """Medians, and the paired differences innkeeper minus llama-server per round."""
        engine = [
            (s.engine_ns / s.tokens / 1000) - r["decode_thread_us"]
            for s, r in zip(ours, runs, strict=True)
        ]
        http = [
            (s.loop_ns / s.tokens / 1000) - r["other_threads_us"]
            for s, r in zip(ours, runs, strict=True)
        ]
        keys = ("decode_thread_us", "other_threads_us")
        return {
            "command": " ".join(self.spec.cmd),
            "median_per_token": {k: statistics.median(r[k] for r in runs) for k in keys},
            "engine_minus_decode_thread_us": statistics.median(engine),
            "loop_minus_other_threads_us": statistics.median(http),
            "samples": runs,
        }

    def close(self) -> None:
        self.server.stop()
        self._logs.cleanup()


def plain_result(plain: list[Sample], ours: list[Sample]) -> dict[str, Any]:
    """The plain chains' medians and the paired per-round differences (shortcuts - plain)."""
    sampling = [
        (s.sampler_ns - p.sampler_ns / p.tokens * s.tokens) / s.tokens / 1000
        for s, p in zip(ours, plain, strict=True)
    ]
    outside = [
        s.per_token()["engine_outside_decode_us"] - p.per_token()["engine_outside_decode_us"]
        for s, p in zip(ours, plain, strict=True)
    ]
    return {
        "median_per_token": median_of(plain),
        "sampling_difference_us": statistics.median(sampling),
        "outside_decode_difference_us": statistics.median(outside),
        "samples": [p.per_token() | {"wall_s": p.wall_s} for p in plain],
    }


def wake_floor_per_token(s: Sample) -> float:
    return wake_floor(s.decode_ns / s.steps) * s.steps / s.tokens


def wake_floor(interval_ns: float, n: int = 200) -> float:
    """Loop-thread CPU µs per wake when another thread calls `call_soon_threadsafe` once every
    `interval_ns` (busy in between, as the engine thread is in llama_decode) and the callback
    does nothing: what the kernel and the loop charge for waking a sleeping thread at all."""
    import asyncio

    import uvicorn

    factory = uvicorn.Config(lambda: None).get_loop_factory()
    ready = threading.Event()
    box: dict[str, Any] = {}

    def run() -> None:
        loop = factory() if factory else asyncio.new_event_loop()
        box["loop"], box["tid"] = loop, threading.get_native_id()
        ready.set()
        loop.run_forever()
        loop.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    ready.wait(10)
    loop, tid = box["loop"], box["tid"]
    time.sleep(0.05)
    interval_s = interval_ns / 1e9
    before = thread_cpu_ns(tid)
    for _ in range(n):
        loop.call_soon_threadsafe(int)
        end = time.perf_counter() + interval_s
        while time.perf_counter() < end:
            pass
    spent = thread_cpu_ns(tid) - before
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    return spent / n / 1000
