"""Per-token CPU cost outside `llama_decode`, per thread, independent of machine load.

`python -m bench.overhead` loads a model in this process (the embedded SmolLM2 unless a
path is given), serves it with uvicorn on a thread of its own, and streams fixed-length
greedy generations (`ignore_eos`) from a client in another process. Around each run it reads
the on-CPU nanoseconds of the engine thread and the event-loop thread from
/proc/self/task/TID/schedstat; the engine thread's CPU inside `ctx.decode` is timed with
`time.thread_time_ns` around each call. What is left, divided by the tokens generated, is
the Python cost per token: it does not move with the load other processes put on the cores
(wall-clock tokens per second does). `--profile` then runs once more under cProfile on both
threads and prints call counts per token and the functions that cost most.

`--peer` measures llama.cpp's own llama-server the same way, in the same run, on the same
model, threads, context and slots, with the same client and request: the CPU of its decode
thread (llama_decode, sampling and the rest of its per-token work) and of all its other
threads (HTTP), per token. The two servers run the same llama_decode, so the difference of
the decode threads is the difference of what each spends outside it, and the HTTP side
compares with innkeeper's event loop. `--wake-floor` first measures what waking a sleeping
event-loop thread costs here at all (a bare `call_soon_threadsafe` every token-time apart):
a floor any server that hands tokens between two threads pays, llama-server included.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import pstats
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The client runs in its own process so its CPU and its GIL hold stay out of the figures.
CLIENT = r"""
import http.client, json, sys, threading
port, path, body, n = int(sys.argv[1]), sys.argv[2], sys.argv[3].encode(), int(sys.argv[4])
def one():
    conn = http.client.HTTPConnection("127.0.0.1", port)
    conn.request("POST", path, body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    while resp.read1(65536):
        pass
threads = [threading.Thread(target=one) for _ in range(n)]
for t in threads: t.start()
for t in threads: t.join()
"""

ROUTES = {
    # route -> (path, body maker); every one streams, greedy, a fixed number of tokens.
    "openai": ("/v1/completions", lambda n: {"prompt": PROMPT, "max_tokens": n, "stream": True}),
    "chat": (
        "/v1/chat/completions",
        lambda n: {
            "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": n,
            "stream": True,
        },
    ),
    "llamacpp": ("/completion", lambda n: {"prompt": PROMPT, "n_predict": n, "stream": True}),
    "ollama": (
        "/api/generate",
        lambda n: {"prompt": PROMPT, "options": {"num_predict": n}, "stream": True},
    ),
}
PROMPT = "Once upon a time, in a quiet village by the sea, there lived"


def thread_cpu_ns(tid: int, pid: str = "self") -> int:
    """On-CPU nanoseconds of one thread of a process (the scheduler's own count)."""
    with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
        return int(f.read().split()[0])


def all_threads_cpu_ns(pid: str = "self") -> dict[int, int]:
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            out[int(task.name)] = thread_cpu_ns(int(task.name), pid)
    return out


def run_client(port: int, path: str, body: dict[str, Any], streams: int) -> float:
    """Run the streaming client process once; its wall-clock seconds."""
    t0 = time.monotonic()
    cmd = [sys.executable, "-c", CLIENT, str(port), path, json.dumps(body), str(streams)]
    subprocess.run(cmd, check=True)
    return time.monotonic() - t0


class CpuTimer:
    """Counts calls of a function and the calling thread's CPU inside them."""

    def __init__(self) -> None:
        self.calls = 0
        self.cpu_ns = 0

    def wrap(self, inner: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any) -> Any:
            t0 = time.thread_time_ns()
            try:
                return inner(*args)
            finally:
                self.cpu_ns += time.thread_time_ns() - t0
                self.calls += 1

        return timed


@dataclass
class Sample:
    """One measured run: CPU nanoseconds per thread role, tokens and decode steps."""

    tokens: int
    steps: int
    engine_ns: int
    decode_ns: int
    sampler_ns: int
    deliver_ns: int
    loop_ns: int
    workers_ns: int
    wall_s: float

    def per_token(self) -> dict[str, float]:
        n = max(self.tokens, 1)
        python_engine = self.engine_ns - self.decode_ns - self.sampler_ns
        return {
            "engine_outside_decode_us": (self.engine_ns - self.decode_ns) / n / 1000,
            "engine_python_us": python_engine / n / 1000,
            "sampler_c_us": self.sampler_ns / n / 1000,
            "deliver_us": self.deliver_ns / n / 1000,
            "event_loop_us": self.loop_ns / n / 1000,
            "total_python_us": (python_engine + self.loop_ns) / n / 1000,
            "engine_in_decode_us": self.decode_ns / n / 1000,
            "llama_workers_us": self.workers_ns / n / 1000,
            "steps_per_token": self.steps / n,
        }


class Harness:
    """A real server (app, service, engine) in this process, uvicorn on its own thread."""

    def __init__(
        self,
        model: Path | None,
        threads: int,
        ctx_size: int,
        parallel: int,
        time_handoff: bool = False,
        flash_attn: str = "auto",
        sampling: str = "greedy",
    ) -> None:
        import uvicorn

        from innkeeper.api.app import create_app
        from innkeeper.cli.options import build_config
        from innkeeper.engine.sampling import SamplerChain
        from innkeeper.models.store import default_model_path
        from innkeeper.serving.registry import ModelRegistry

        self.sampling = sampling
        path = model or default_model_path()
        values = {
            "ctx_size": ctx_size,
            "threads": threads,
            "parallel": parallel,
            "flash_attn": flash_attn,
        }
        config = build_config(path, values)
        self.registry = ModelRegistry(config, path)
        service = self.registry.load_at_start()
        self.engine = service.engine
        self.scheduler = self.engine.scheduler
        # llama_decode, and llama_sampler_sample (llama.cpp's own sampling work, which
        # llama-server does too): timed apart from the Python around them.
        self.decode = CpuTimer()
        self.scheduler.ctx.decode = self.decode.wrap(self.scheduler.ctx.decode)
        # Handing a step's events to the event loop (the write that wakes it): timed only
        # when asked, as the timer's own cost would skew comparisons with code without it.
        self.deliver = CpuTimer()
        tokens = self.scheduler.tokens
        if time_handoff and hasattr(tokens, "deliver"):
            tokens.deliver = self.deliver.wrap(tokens.deliver)
        self.sampler = CpuTimer()
        self._unwrap_sampler = SamplerChain.sample
        SamplerChain.sample = self.sampler.wrap(SamplerChain.sample)  # type: ignore[method-assign]
        app = create_app(self.registry, config)
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
        )
        self.loop_tid = 0
        self.loop: Any = None
        self.thread = threading.Thread(target=self._serve, name="bench-loop", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.05)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.engine_tid = self.scheduler._thread.native_id

    def _serve(self) -> None:
        """uvicorn's own loop (uvloop where installed), as `innkeeper serve` runs it."""
        import asyncio

        self.loop_tid = threading.get_native_id()

        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            await self.server.serve()

        with asyncio.Runner(loop_factory=self.server.config.get_loop_factory()) as runner:
            runner.run(main())

    def close(self) -> None:
        from innkeeper.engine.sampling import SamplerChain

        self.server.should_exit = True
        self.thread.join(10)
        self.registry.close()
        SamplerChain.sample = self._unwrap_sampler  # type: ignore[method-assign]

    def generate(self, route: str, n_tokens: int, streams: int) -> Sample:
        path, body = request_body(route, n_tokens, self.sampling)
        body["model"] = self.registry.default_id
        perf = self.scheduler.perf
        tok0, steps0, dec0 = perf.total_generated_tokens, self.decode.calls, self.decode.cpu_ns
        smp0, del0 = self.sampler.cpu_ns, self.deliver.cpu_ns
        cpu0 = all_threads_cpu_ns()
        wall = run_client(self.port, path, body, streams)
        time.sleep(0.05)  # the last finish event is counted after the response ends
        cpu1 = all_threads_cpu_ns()
        delta = {tid: cpu1[tid] - cpu0.get(tid, 0) for tid in cpu1}
        known = {self.engine_tid, self.loop_tid, threading.get_native_id()}
        return Sample(
            tokens=perf.total_generated_tokens - tok0,
            steps=self.decode.calls - steps0,
            engine_ns=delta.get(self.engine_tid, 0),
            decode_ns=self.decode.cpu_ns - dec0,
            sampler_ns=self.sampler.cpu_ns - smp0,
            deliver_ns=self.deliver.cpu_ns - del0,
            loop_ns=delta.get(self.loop_tid, 0),
            workers_ns=sum(v for t, v in delta.items() if t not in known),
            wall_s=wall,
        )

    def generate_plain(self, args: argparse.Namespace) -> Sample:
        """One run with llama.cpp's plain sampler chains (no numpy shortcuts)."""
        from innkeeper.engine.sampling import SamplerChain

        SamplerChain.SHORTCUTS = False
        try:
            return self.generate(args.route, args.tokens, args.streams)
        finally:
            SamplerChain.SHORTCUTS = True

    def on_engine(self, fn: Callable[[], Any]) -> None:
        self.scheduler.call(fn).result(10)

    def on_loop(self, fn: Callable[[], Any]) -> None:
        done = threading.Event()

        def run() -> None:
            fn()
            done.set()

        self.loop.call_soon_threadsafe(run)
        done.wait(10)


@contextlib.contextmanager
def profiled(h: Harness) -> Iterator[tuple[cProfile.Profile, cProfile.Profile]]:
    """cProfile on the engine thread and on the event-loop thread (each enables its own)."""
    eng, loop = cProfile.Profile(), cProfile.Profile()
    h.on_engine(eng.enable)
    h.on_loop(loop.enable)
    try:
        yield eng, loop
    finally:
        h.on_engine(eng.disable)
        h.on_loop(loop.disable)


def top_functions(prof: cProfile.Profile, tokens: int, n: int) -> list[dict[str, Any]]:
    """The `n` functions with the most own time: calls and own µs per token."""
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    rows = []
    for (file, line, name), (_cc, ncalls, tottime, _ct, _callers) in stats.items():
        where = f"{Path(file).name}:{line}" if line else file
        rows.append(
            {
                "function": f"{where}({name})",
                "calls_per_token": ncalls / tokens,
                "own_us_per_token": tottime * 1e6 / tokens,
            }
        )
    rows.sort(key=lambda r: -r["own_us_per_token"])
    return rows[:n]


def total_calls(prof: cProfile.Profile) -> int:
    return sum(v[1] for v in pstats.Stats(prof).stats.values())  # type: ignore[attr-defined]


def median_of(samples: list[Sample]) -> dict[str, float]:
    keys = samples[0].per_token().keys()
    return {k: statistics.median(s.per_token()[k] for s in samples) for k in keys}


def measure(args: argparse.Namespace, peer_spec: Any = None) -> dict[str, Any]:
    """innkeeper's runs; with `--peer`/`--wake-floor`, each round also measures llama-server
    and the bare wake right next to innkeeper's run (the order alternating), so every
    comparison is paired in time on a machine whose speed drifts."""
    from bench.overhead_compare import Peer, plain_result, wake_floor_per_token

    h = Harness(
        args.model,
        args.threads,
        args.ctx_size,
        args.parallel,
        args.time_handoff,
        args.flash_attn,
        args.sampling,
    )
    peer = Peer(args, peer_spec) if args.peer else None
    try:
        h.generate(args.route, 8, 1)  # warm-up: first-request paths, caches
        samples: list[Sample] = []
        peer_runs: list[dict[str, float]] = []
        floors: list[float] = []
        plain: list[Sample] = []  # --compare-shortcuts: runs with llama.cpp's plain chains
        for i in range(args.repeats):
            others: list[Callable[[], None]] = []
            if peer is not None:
                others.append(lambda: peer_runs.append(peer.run()))
            if args.compare_shortcuts:
                others.append(lambda: plain.append(h.generate_plain(args)))
            if args.wake_floor:
                # A bare wake at the step rate innkeeper's latest run had, per token (one
                # wake a step, several tokens a step with several streams).
                others.append(lambda: floors.append(wake_floor_per_token(samples[-1])))
            if i % 2 and others:  # ABBA: the order alternates
                others[0]()
                samples.append(h.generate(args.route, args.tokens, args.streams))
                for other in others[1:]:
                    other()
            else:
                samples.append(h.generate(args.route, args.tokens, args.streams))
                for other in others:
                    other()
        result: dict[str, Any] = {
            "route": args.route,
            "sampling": args.sampling,
            "loop": type(h.loop).__module__.split(".")[0],
            "time_handoff": args.time_handoff,
            "streams": args.streams,
            "tokens_per_run": samples[0].tokens,
            "runs": len(samples),
            "median_per_token": median_of(samples),
            "samples": [s.per_token() | {"wall_s": s.wall_s} for s in samples],
        }
        if floors:
            result["wake_floor_us"] = statistics.median(floors)
            med = result["median_per_token"]
            result["step_ms"] = med["engine_in_decode_us"] / med["steps_per_token"] / 1000
        if peer is not None:
            result["peer"] = peer.result(peer_runs, samples)
        if plain:
            result["plain_chains"] = plain_result(plain, samples)
        if args.profile:
            with profiled(h) as (eng, loop):
                s = h.generate(args.route, args.tokens, args.streams)
            result["profile"] = {
                "tokens": s.tokens,
                "engine_calls_per_token": total_calls(eng) / s.tokens,
                "loop_calls_per_token": total_calls(loop) / s.tokens,
                "engine_top": top_functions(eng, s.tokens, args.top),
                "loop_top": top_functions(loop, s.tokens, args.top),
            }
        return result
    finally:
        h.close()
        if peer is not None:
            peer.close()


# Sampler settings a run can use (--sampling): greedy; SillyTavern's "Universal-Light" preset
# (min-p alone); the bench's top-k chain; min-p with a repetition penalty over 64 tokens.
SAMPLING: dict[str, dict[str, Any]] = {
    "greedy": {"temperature": 0},
    "min-p": {"temperature": 1.25, "top_k": 0, "top_p": 1.0, "min_p": 0.1, "seed": 1},
    "top-k": {"temperature": 0.7, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "seed": 1},
    "rep-pen": {
        "temperature": 1.0,
        "top_k": 0,
        "top_p": 1.0,
        "min_p": 0.05,
        "repeat_penalty": 1.1,
        "repeat_last_n": 64,
        "seed": 1,
    },
}


def request_body(route: str, n_tokens: int, sampling: str = "greedy") -> tuple[str, dict[str, Any]]:
    """The route's path and a fixed-length streaming body (model named by the caller)."""
    path, make = ROUTES[route]
    body = make(n_tokens)
    body["ignore_eos"] = True
    if route == "ollama":
        body["options"].update(SAMPLING[sampling])
    else:
        body.update(SAMPLING[sampling])
    return path, body


def render(result: dict[str, Any]) -> str:
    med = result["median_per_token"]
    lines = [
        f"route {result['route']}, {result['sampling']} sampling, {result['streams']} "
        f"stream(s), {result['loop']} loop, "
        f"{result['tokens_per_run']} tokens a run, median of {result['runs']} runs (µs/token):",
        f"  engine thread outside llama_decode  {med['engine_outside_decode_us']:8.1f}",
        f"    of which sampling (llama.cpp+numpy){med['sampler_c_us']:8.1f}",
        f"    of which Python (the rest)        {med['engine_python_us']:8.1f}",
        *(
            [f"      incl. handing events to the loop{med['deliver_us']:8.1f}"]
            if result["time_handoff"]
            else []
        ),
        f"  event-loop thread                   {med['event_loop_us']:8.1f}",
        f"  Python total (engine rest + loop)   {med['total_python_us']:8.1f}",
        f"  engine thread inside llama_decode   {med['engine_in_decode_us']:8.1f}",
        f"  llama.cpp worker threads            {med['llama_workers_us']:8.1f}",
        f"  decode steps per token              {med['steps_per_token']:8.3f}",
    ]
    floor = result.get("wake_floor_us")
    if floor is not None:
        lines.append(
            f"  of the loop's: waking a sleeping loop thread at all {floor:8.1f}"
            f"  (a bare call_soon_threadsafe every {result['step_ms']:.1f} ms)"
        )
    peer = result.get("peer")
    if peer:
        ours = result["median_per_token"]
        theirs = peer["median_per_token"]
        engine_total = ours["engine_outside_decode_us"] + ours["engine_in_decode_us"]
        lines += [
            "llama-server, the same model, settings, client and request (µs/token):",
            f"  decode thread (all of it)           {theirs['decode_thread_us']:8.1f}"
            f"   innkeeper's engine thread {engine_total:8.1f}",
            f"  other threads (HTTP)                {theirs['other_threads_us']:8.1f}"
            f"   innkeeper's event loop    {ours['event_loop_us']:8.1f}",
            "  innkeeper minus llama-server, median of the rounds' paired differences:",
            f"    engine thread - decode thread     {peer['engine_minus_decode_thread_us']:+8.1f}",
            f"    event loop - other threads        {peer['loop_minus_other_threads_us']:+8.1f}",
        ]
    plain = result.get("plain_chains")
    if plain:
        lines += [
            "llama.cpp's plain sampler chains, the same rounds (µs/token):",
            f"  sampling                            {plain['median_per_token']['sampler_c_us']:8.1f}",
            f"  engine thread outside llama_decode  "
            f"{plain['median_per_token']['engine_outside_decode_us']:8.1f}",
            "  shortcuts minus plain, median of the rounds' paired differences:",
            f"    sampling                          {plain['sampling_difference_us']:+8.1f}",
            f"    engine thread outside decode      {plain['outside_decode_difference_us']:+8.1f}",
        ]
    prof = result.get("profile")
    if prof:
        for side in ("engine", "loop"):
            lines.append(
                f"{side} thread under cProfile: {prof[side + '_calls_per_token']:.1f} "
                "Python calls/token; top own time (µs/token, inflated by the profiler):"
            )
            for row in prof[side + "_top"]:
                lines.append(
                    f"  {row['own_us_per_token']:7.1f}  {row['calls_per_token']:6.2f}x  "
                    f"{row['function']}"
                )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__)
    p.add_argument("model", nargs="?", type=Path, help="GGUF file (default: embedded SmolLM2)")
    p.add_argument("--route", choices=sorted(ROUTES), default="openai")
    p.add_argument("--tokens", type=int, default=256, help="tokens per run (default 256)")
    p.add_argument("--streams", type=int, default=1, help="concurrent streams (default 1)")
    p.add_argument("--parallel", type=int, default=0, help="slots (default: --streams)")
    p.add_argument("--repeats", type=int, default=5, help="measured runs (default 5)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="llama.cpp threads (default 1: the Python cost per token does not depend on it, "
        "and two spinning threads on a loaded 2-core machine make runs minutes long)",
    )
    p.add_argument("--ctx-size", type=int, default=4096)
    p.add_argument("--profile", action="store_true", help="one more run under cProfile")
    p.add_argument(
        "--time-handoff",
        action="store_true",
        help="also time the engine's hand-off of events to the loop (costs a few µs itself)",
    )
    p.add_argument("--top", type=int, default=15, help="functions listed per thread")
    p.add_argument("--flash-attn", choices=["auto", "on", "off"], default="auto")
    p.add_argument(
        "--sampling",
        choices=sorted(SAMPLING),
        default="greedy",
        help="sampler settings of every request (default greedy; min-p: SillyTavern's "
        "Universal-Light preset)",
    )
    p.add_argument(
        "--peer",
        action="store_true",
        help="also measure llama-server the same way (same model, settings, client, request)",
    )
    p.add_argument("--llama-server", help="llama-server binary (else $LLAMA_SERVER, else build)")
    p.add_argument(
        "--compare-shortcuts",
        action="store_true",
        help="also run every round with llama.cpp's plain sampler chains (no numpy shortcuts)",
    )
    p.add_argument(
        "--wake-floor",
        action="store_true",
        help="also measure the loop-thread CPU of a bare cross-thread wake at the token rate",
    )
    p.add_argument("--json", type=Path, help="also write the result here")
    args = p.parse_args(argv)
    args.parallel = args.parallel or args.streams
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = measure(args)
    print(render(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
