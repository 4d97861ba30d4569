"""How fast one set of engine settings runs here: a short, real run in a child process.

`innkeeper tune` measures each candidate with the real Engine (the scheduler, sampler and
batching `serve` uses), loaded exactly as `serve` loads it (`planned_engine`). The load runs in
a child process so a candidate that crashes llama.cpp (a GGML_ASSERT) or runs out of memory
cannot take the CLI or the server with it, and so nothing stays loaded afterwards: the child
exits after one measurement and its memory goes back to the system.

A run: a short warm-up request, then one request of `n_prompt` prompt tokens and `n_gen`
decoded tokens (prompt speed as llama.cpp's timings count it; decode speed as the tokens
reach the caller, after the first, the way bench/ measures a server), then, with
`parallel` > 1, that many short-prompt requests at once (their tokens per second while all of
them decode).
Each request's prompt is fresh (no prefix-cache reuse). A run clearly slower than the best so
far (prompt or decode under half of its speed) is cut short and reported as such.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

from innkeeper.settings.engine import EngineConfig

# The sampling bench/loadgen.py asks every server for, so tune and bench measure the same work.
_SAMPLING: dict[str, Any] = {
    "temperature": 0.7,
    "top_k": 40,
    "top_p": 0.95,
    "min_p": 0.05,
    "repeat_penalty": 1.0,
    "seed": 1234,
    "ignore_eos": True,
}
_TEXT = (
    "the innkeeper kept a ledger of every traveller who came through the valley in winter and "
    "wrote down where they came from, what they carried, how long they stayed and what songs "
    "they sang by the fire when the snow closed the mountain pass for weeks at a time"
)
_EARLY_STOP_AFTER = 8  # decoded tokens before a slow candidate may be cut short
_RESULT = "@@SPEED@@"


class SpeedError(Exception):
    """A candidate that could not be measured: the load failed, the child crashed or hung."""


class Cancelled(Exception):
    """The measurement was cancelled (`cancel` set): its child is gone, nothing was kept."""


@dataclass(frozen=True)
class Speed:
    """One candidate's measured speed (tokens per second) and memory."""

    prompt_tps: float
    decode_tps: float
    aggregate_tps: float | None  # all slots decoding at once (parallel > 1), else None
    rss_bytes: int  # the child's peak resident memory
    seconds: float  # the whole child, load included
    early_stop: bool = False  # decode cut short: clearly slower than the best so far

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def config_to_json(cfg: EngineConfig) -> dict[str, Any]:
    """EngineConfig as JSON-friendly values (paths as text, tuples as lists)."""
    out: dict[str, Any] = {}
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        out[f.name] = str(value) if isinstance(value, Path) else value
    return out


def config_from_json(data: dict[str, Any]) -> EngineConfig:
    values = dict(data)
    values["model_path"] = Path(values["model_path"])
    if values.get("tensor_split") is not None:
        values["tensor_split"] = tuple(values["tensor_split"])
    return EngineConfig(**values)


def _prompt(tokens: list[int], n: int, seed: int) -> list[int]:
    """`n` tokens drawn from real text, different per seed from the first token on."""
    rng = random.Random(seed)
    return [rng.choice(tokens) for _ in range(n)]


def _run(
    engine: Any, prompts: list[list[int]], n_gen: int, floor: tuple[float, float] = (0.0, 0.0)
) -> dict[str, Any]:
    """Submit `prompts` at once and wait for all: their finish events, per-request token
    times, and whether a request was cut short for a prompt or decode speed under half of
    `floor` (prompt, decode tokens per second; 0: never)."""
    from innkeeper.engine.events import FinishEvent, GenerationRequest, TokenEvent
    from innkeeper.engine.sampling import SamplingParams

    done = threading.Semaphore(0)
    finishes: list[FinishEvent] = []
    stamps: list[list[float]] = []  # per request: the time each token arrived
    cut = threading.Event()

    min_prompt, min_decode = floor

    def handler(req: list[GenerationRequest], times: list[float], n_prompt: int) -> Any:
        submitted = time.perf_counter()

        def on_event(ev: Any) -> None:
            if isinstance(ev, TokenEvent):
                now = time.perf_counter()
                if not times:  # the prompt is done: the first token's wait is its time
                    slow = n_prompt / max(now - submitted, 1e-9) < min_prompt / 2
                else:
                    rate = len(times) / max(now - times[0], 1e-9)
                    slow = len(times) >= _EARLY_STOP_AFTER and rate < min_decode / 2
                times.extend([now] * len(ev.tokens))
                if slow and not req[0].cancelled:
                    cut.set()
                    req[0].cancel()
            elif isinstance(ev, FinishEvent):
                finishes.append(ev)
                done.release()

        return on_event

    for prompt in prompts:
        box: list[GenerationRequest] = []
        stamps.append([])
        req = GenerationRequest(
            prompt=prompt,
            params=SamplingParams(**_SAMPLING),
            max_tokens=n_gen,
            on_event=handler(box, stamps[-1], len(prompt)),
        )
        box.append(req)
        engine.submit(req)
    for _ in prompts:
        done.acquire()
    errors = [f.error for f in finishes if f.reason == "error"]
    if errors:
        raise SpeedError(f"generation failed: {errors[0]}")
    return {"finishes": finishes, "stamps": stamps, "cut": cut.is_set()}


def decode_rate(times: list[float]) -> float:
    """Tokens per second after the first, as they reached the caller: what a client sees
    (bench/loadgen.py's decode_tps), not only llama.cpp's decode calls."""
    if len(times) < 2 or times[-1] <= times[0]:
        return 0.0
    return (len(times) - 1) / (times[-1] - times[0])


def aggregate_rate(stamps: list[list[float]]) -> float:
    """Tokens per second over all requests while every one of them was decoding.

    The window runs from the last request's first token (all prompts done) to the first
    request's last token, so prompt processing does not dilute the decode throughput.
    """
    start = max(s[0] for s in stamps)
    end = min(s[-1] for s in stamps)
    if end <= start:
        return 0.0
    n = sum(1 for s in stamps for t in s if start < t <= end)
    return n / (end - start)


def _worker(args: dict[str, Any]) -> dict[str, Any]:
    """In the child: load as `serve` does, run the requests, report the speeds."""
    import resource

    from innkeeper.engine.engine import Engine
    from innkeeper.engine.planning import plan_settings, planned_engine

    t0 = time.perf_counter()
    cfg = config_from_json(args["config"])
    engine = Engine(planned_engine(cfg, plan_settings(cfg)))
    try:
        n_gen, parallel = int(args["n_gen"]), cfg.parallel
        room = engine.n_ctx // parallel - n_gen - 4  # each slot's share of the context
        n_prompt = max(1, min(int(args["n_prompt"]), room))
        words = engine.tokenize(_TEXT, add_special=False)
        _run(engine, [_prompt(words, 8, 0)], 2)  # warm-up: first-use allocations
        floor = (float(args["min_prompt"]), float(args["min_decode"]))
        single = _run(engine, [_prompt(words, n_prompt, 1)], n_gen, floor)
        timing = single["finishes"][0].timings
        times = single["stamps"][0]
        aggregate = None
        if parallel > 1 and not single["cut"]:
            # short prompts: this run measures the slots decoding together
            batch = [_prompt(words, min(n_prompt, 16), 2 + i) for i in range(parallel)]
            aggregate = aggregate_rate(_run(engine, batch, n_gen)["stamps"])
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return Speed(
            prompt_tps=timing.prompt_per_second,
            decode_tps=decode_rate(times) or timing.predicted_per_second,
            aggregate_tps=aggregate,
            rss_bytes=int(rss),
            seconds=time.perf_counter() - t0,
            early_stop=bool(single["cut"]),
        ).to_json()
    finally:
        engine.close()


def _die_with_parent() -> None:
    """Linux: the kernel kills this child when its parent dies, however it dies (a server
    stopped mid-tune, `kill -9` of the CLI), so no measurement outlives it."""
    import ctypes

    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the parent's own cleanup still applies
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


def _child_main() -> None:
    # Ctrl-C ends the child at once: it holds nothing that needs cleaning (no files), and the
    # OS takes its memory back, so no half-stopped engine thread can keep it alive.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    _die_with_parent()
    try:
        result = _worker(json.loads(sys.argv[1]))
    except Exception as exc:
        print(_RESULT + json.dumps({"error": f"{type(exc).__name__}: {exc}"}), flush=True)
        raise SystemExit(1) from None
    print(_RESULT + json.dumps(result), flush=True)


def measure_speed(
    cfg: EngineConfig,
    *,
    n_prompt: int = 256,
    n_gen: int = 32,
    floor: Speed | None = None,
    timeout: float = 120.0,
    cancel: threading.Event | None = None,
) -> Speed:
    """Measure `cfg` in a child process; SpeedError if it fails, crashes or takes too long.

    With `floor` (the best so far), a run clearly slower than it is cut short.

    Ctrl-C (KeyboardInterrupt), `cancel` being set (Cancelled) or any other exception kills the
    child and waits for it before propagating, so nothing stays loaded.
    """
    args = {
        "config": config_to_json(replace(cfg, model_path=Path(cfg.model_path).resolve())),
        "n_prompt": n_prompt,
        "n_gen": n_gen,
        "min_prompt": floor.prompt_tps if floor else 0.0,
        "min_decode": floor.decode_tps if floor else 0.0,
    }
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("INNKEEPER_LLAMA_LOG", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "innkeeper.engine.speed", json.dumps(args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + timeout
    try:
        while True:
            if cancel is not None and cancel.is_set():
                raise Cancelled("cancelled")
            left = deadline - time.monotonic()
            if left <= 0:
                raise SpeedError(f"no result within {timeout:.0f} s")
            try:
                out, err = proc.communicate(timeout=min(left, 0.25))
                break
            except subprocess.TimeoutExpired:
                continue
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    for line in out.splitlines():
        if line.startswith(_RESULT):
            data = json.loads(line[len(_RESULT) :])
            if "error" in data:
                raise SpeedError(str(data["error"]))
            return Speed(**data)
    if proc.returncode == -signal.SIGINT:  # Ctrl-C reached the child first: the user's stop
        raise KeyboardInterrupt
    if proc.returncode and proc.returncode < 0:
        raise SpeedError(f"the measuring process died of signal {-proc.returncode}")
    tail = " | ".join((err.strip() or out.strip()).splitlines()[-3:])
    raise SpeedError(f"the measuring process exited {proc.returncode}: {tail}")


if __name__ == "__main__":
    _child_main()
