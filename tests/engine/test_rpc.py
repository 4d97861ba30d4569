"""llama.cpp's RPC backend: the embedded model split across this process and two real
`innkeeper worker`s on loopback (CPU devices), and workers that cannot take part."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import replace

import httpx
import psutil
import pytest

from innkeeper.engine import rpc, rpc_probe
from innkeeper.models.hardware import GPU, Hardware, format_size
from tests.engine.conftest import Runner, make_engine
from tests.helpers import ARTIFACTS, free_port, run_server, stop_process, wait_for_worker

pytestmark = pytest.mark.skipif(
    not rpc.available(),
    reason="this llama-cpp-python has no RPC backend (no libggml-rpc.so): `make install` "
    "rebuilds it with -DGGML_RPC=ON",
)

PROMPT = "The three primary colours are"


@contextlib.contextmanager
def run_worker(port: int, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """`innkeeper worker --port PORT` until it answers the RPC handshake; stopped on exit."""
    ARTIFACTS.mkdir(exist_ok=True)
    log = (ARTIFACTS / f"worker-{port}.log").open("wb")
    cmd = [sys.executable, "-m", "innkeeper", "worker", "--port", str(port), "--threads", "1"]
    proc = subprocess.Popen([*cmd, *args], stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
    try:
        try:
            wait_for_worker(port, proc)
        except AssertionError:
            raise AssertionError((ARTIFACTS / f"worker-{port}.log").read_text()) from None
        yield proc
    finally:
        stop_process(proc, 10)
        log.close()


@pytest.fixture(scope="module")
def workers() -> Iterator[list[tuple[str, subprocess.Popen[bytes]]]]:
    a, b = free_port(), free_port()
    with run_worker(a) as pa, run_worker(b) as pb:
        yield [(f"127.0.0.1:{a}", pa), (f"127.0.0.1:{b}", pb)]


def greedy(**config: object) -> tuple[str, int]:
    """Greedy text of PROMPT on an engine loaded with `config`, and the model's layer count."""
    engine = make_engine(parallel=1, ctx_size=512, **config)
    try:
        text, _, _ = Runner(engine).run(engine.model.tokenize(PROMPT), max_tokens=24)
        return text, engine.model.info.n_layer
    finally:
        engine.close()


def test_probe_reports_the_protocol_and_each_device(workers) -> None:
    for endpoint, _ in workers:
        info = rpc_probe.probe(endpoint)
        assert info.version[:2] == (rpc_probe.PROTO_MAJOR, rpc_probe.PROTO_MINOR)
        assert len(info.devices) == 1  # the CPU: this machine has no accelerator to lend
        assert 0 < info.devices[0].free_bytes <= info.devices[0].total_bytes


@pytest.mark.slow
def test_split_across_this_process_and_two_workers_is_identical_to_local(workers) -> None:
    """A third of the layers here, a third on each worker: the same greedy text, and each
    worker's memory grew by about its share of the weights."""
    local, n_layer = greedy()
    before = [psutil.Process(p.pid).memory_info().rss for _, p in workers]
    offloaded = n_layer * 2 // 3
    engine = make_engine(
        parallel=1,
        ctx_size=512,
        rpc=tuple(e for e, _ in workers),
        gpu_layers=offloaded,
        tensor_split=(1.0, 1.0),
    )
    try:
        grown = [
            psutil.Process(p.pid).memory_info().rss - b
            for (_, p), b in zip(workers, before, strict=True)
        ]
        text, _, _ = Runner(engine).run(engine.model.tokenize(PROMPT), max_tokens=24)
        share = engine.model.info.size_bytes * (offloaded // 2 - 1) / n_layer
        placed = engine.model.info.layer_devices
    finally:
        engine.close()
    assert text == local
    (a, _), (b, _) = workers
    # llama.cpp counts the output layer among --gpu-layers: one repeating layer fewer moves
    assert [d for d, _ in placed] == ["CPU", f"RPC0 [{a}]", f"RPC1 [{b}]"]
    assert placed[0][1] == n_layer + 1 - offloaded and sum(n for _, n in placed) == n_layer
    assert min(n for _, n in placed[1:]) >= offloaded // 2 - 1
    for g in grown:  # the worker really holds its layers (RSS: what it wrote into its RAM)
        assert g > 0.6 * share, (g, share)


def test_an_unreachable_worker_is_one_error_naming_it_before_any_load() -> None:
    endpoint = f"127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(rpc_probe.WorkerUnreachable, match=endpoint):
        make_engine(parallel=1, ctx_size=512, rpc=(endpoint,), gpu_layers=10)
    assert time.monotonic() - t0 < 10  # ggml's own client would have aborted the process


@contextlib.contextmanager
def fake_worker(reply: bytes | None) -> Iterator[str]:
    """A TCP server that answers one HELLO with `reply` (None: hangs up)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            conn.recv(1 + 8 + 24)
            if reply is not None:
                conn.sendall(struct.pack("<Q", len(reply)) + reply)
                time.sleep(0.5)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield f"127.0.0.1:{srv.getsockname()[1]}"
    finally:
        t.join(5)
        srv.close()


def test_a_worker_on_another_protocol_version_is_refused_by_name() -> None:
    with (
        fake_worker(bytes([6, 0, 0, 0]) + bytes(24)) as endpoint,
        pytest.raises(rpc_probe.WorkerVersionMismatch, match=rf"{endpoint}.*6\.0\.0"),
    ):
        rpc_probe.probe(endpoint)


def test_something_else_on_the_port_is_not_a_worker() -> None:
    with fake_worker(None) as endpoint, pytest.raises(rpc_probe.WorkerUnreachable, match=endpoint):
        rpc_probe.probe(endpoint)


@pytest.mark.slow
def test_serve_rpc_answers_as_the_local_model_and_its_banner_shows_the_split(workers) -> None:
    local, n_layer = greedy()
    endpoints = ",".join(e for e, _ in workers)
    args = ("--rpc", endpoints, "--gpu-layers", str(n_layer), "--ctx-size", "512")
    with run_server(*args, "--parallel", "1", name="rpc") as srv:
        body = {"prompt": PROMPT, "max_tokens": 24, "temperature": 0}
        reply = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=120)
        assert reply.status_code == 200, reply.text
        banner = srv.log()
    assert reply.json()["choices"][0]["text"] == local
    flat = "".join(banner.split())  # the banner's table wraps long rows
    (a, _), (b, _) = workers
    assert f"devicesCPU1layer,RPC0[{a}]" in flat and f"RPC1[{b}]" in flat


# Loads as `serve` would (the plan's layers and split) with EngineConfig fields given as JSON,
# and prints llama.cpp's buffer lines.
LOAD_AS_SERVE = """
import json, sys
from innkeeper.engine.engine import Engine, EngineConfig
from innkeeper.engine.planning import plan_settings, planned_engine
from innkeeper.models.store import default_model_path
cfg = EngineConfig(model_path=default_model_path(), threads=1, parallel=1,
                   rpc=tuple(sys.argv[1].split(",")), **json.loads(sys.argv[2]))
Engine(planned_engine(cfg, plan_settings(cfg))).close()
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "settings",
    [
        {"ctx_size": 512},  # flash attention auto (on here), pipeline parallelism
        {"ctx_size": 2048, "flash_attn": "off"},  # the KQ scores dominate
        {"ctx_size": 2048, "flash_attn": "on", "gpu_layers": 20, "ubatch_size": 256},
    ],
)
def test_fit_rpc_plans_what_the_workers_allocate(workers, settings: dict[str, object]) -> None:
    """`fit --rpc` asks the workers, splits the layers as llama.cpp does, and each worker's
    share (weights, KV cache, compute buffer: its planned total) is what llama.cpp then
    allocates there, within 5%."""
    from innkeeper.models.store import default_model_path
    from innkeeper.settings import settings_of
    from innkeeper.settings.engine import EngineConfig

    flags = {f.name: spec.flag for f, spec in settings_of(EngineConfig)}
    cli = [x for k, v in settings.items() for x in (flags[k], str(v))]
    endpoints = [e for e, _ in workers]
    args = ["--rpc", ",".join(endpoints), "--parallel", "1", *cli]
    fit = subprocess.run(
        [sys.executable, "-m", "innkeeper", "fit", str(default_model_path()), *args, "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert fit.returncode == 0, fit.stderr
    plan = json.loads(fit.stdout)
    gpus = [d for d in plan["devices"] if d["kind"] == "gpu"]
    assert [g["name"].split(": ", 1)[-1] for g in gpus] == [f"RPC {e}" for e in endpoints]
    assert [g["endpoint"] for g in gpus] == endpoints
    assert all(g["layers"] > 0 for g in gpus) and plan["network_bytes_per_token"] > 0
    load = subprocess.run(
        [sys.executable, "-c", LOAD_AS_SERVE, ",".join(endpoints), json.dumps(settings)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "INNKEEPER_LLAMA_LOG": "1"},
    )
    assert load.returncode == 0, load.stderr[-2000:]
    for endpoint, planned in zip(endpoints, gpus, strict=True):
        sizes = re.findall(
            rf"RPC\d+\[{re.escape(endpoint)}\] (?:model|KV|compute) buffer size =\s*([\d.]+) MiB",
            load.stderr,
        )
        assert len(sizes) == 3, load.stderr[-2000:]
        allocated = sum(float(s) for s in sizes) * 2**20
        wanted = planned["total_bytes"]  # nothing else: a worker has no runtime of ours
        assert abs(allocated - wanted) <= 0.05 * wanted, (endpoint, allocated, planned)


def worker_hw(*free: int) -> Hardware:
    """This machine without GPUs, and workers whose one device each reports `free` bytes."""
    gpus = tuple(
        GPU(i, f"RPC 10.0.0.{i + 1}:50052", 2**36, f, f"10.0.0.{i + 1}:50052")
        for i, f in enumerate(free)
    )
    return Hardware(2**36, 2**36, gpus)


def test_a_share_beyond_a_workers_free_memory_is_refused_by_name() -> None:
    """The check over the plan and the probed free memory, both ways: a --tensor-split that
    puts almost everything on a worker with 100 MiB free is refused, naming the worker, its
    free memory and the share; a worker with room passes."""
    from innkeeper.engine.planning import check_worker_shares
    from innkeeper.models.gguf_meta import read_gguf_spec
    from innkeeper.models.memory import MemorySettings, plan_memory
    from innkeeper.models.store import default_model_path
    from innkeeper.settings.engine import EngineConfig

    spec = read_gguf_spec(default_model_path())
    cfg = EngineConfig(default_model_path(), rpc=("a:1", "b:1"), tensor_split=(9.0, 1.0))
    small = plan_memory(spec, MemorySettings(cfg, 2048), worker_hw(100 * 2**20, 2**33), 999)
    share = small.devices[1]
    assert share.endpoint == "10.0.0.1:50052" and share.total_bytes > 100 * 2**20
    with pytest.raises(rpc_probe.WorkerTooSmall) as err:
        check_worker_shares(small)
    line = str(err.value)
    assert "\n" not in line and "10.0.0.1:50052" in line and "100.00 MiB free" in line
    assert format_size(share.total_bytes) in line
    check_worker_shares(plan_memory(spec, MemorySettings(cfg, 2048), worker_hw(2**33, 2**33), 999))
    # the plan's own choice (no --gpu-layers) never overfills a worker: it offloads less
    auto = plan_memory(
        spec, MemorySettings(replace(cfg, tensor_split=None), 2048), worker_hw(100 * 2**20, 2**33)
    )
    check_worker_shares(auto)


@pytest.mark.slow
def test_serve_refuses_a_share_the_worker_cannot_hold_before_any_weights_move() -> None:
    """A real worker: a context whose KV cache and KQ scores are beyond any machine's free
    memory, all layers on the worker: serve exits with one error line naming the worker, and
    the worker received nothing."""
    port = free_port()
    endpoint = f"127.0.0.1:{port}"
    with run_worker(port) as worker:
        free = rpc_probe.probe(endpoint).devices[0].free_bytes
        before = psutil.Process(worker.pid).memory_info().rss
        args = ("--rpc", endpoint, "--gpu-layers", "all", "--flash-attn", "off", "-ub", "2048")
        t0 = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "innkeeper", "serve", *args, "--ctx-size", "1048576"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert time.monotonic() - t0 < 60
        grown = psutil.Process(worker.pid).memory_info().rss - before
        assert worker.poll() is None  # still serving: nothing reached ggml's client
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if endpoint in line]
    assert errors and format_size(free)[:-4] in errors[-1] and "share" in errors[-1], done.stderr
    assert grown < 16 * 2**20  # no weights arrived
