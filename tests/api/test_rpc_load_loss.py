"""An RPC worker lost in the middle of a load, over HTTP: a real worker behind a TCP proxy of
the test's own that cuts every connection (and stops listening) once a third of the model's
weights went through, as a worker that dies mid-upload. The load fails at once naming the
worker and leaves the model failed, the server keeps serving and loading, and once the worker answers again on the same
port a load across it gives the local model's greedy text."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from innkeeper.engine import rpc
from innkeeper.models.store import default_model_path
from tests.api.test_rpc_load import ADMIN, ADMIN_KEY, SMOL, complete, load
from tests.engine.test_rpc import run_worker
from tests.helpers import free_port, run_server

pytestmark = pytest.mark.skipif(
    not rpc.available(), reason="this llama-cpp-python has no RPC backend"
)


class Proxy:
    """127.0.0.1:`port` forwarded both ways to the worker at `target`. With `cut_after`: once
    that many bytes went towards the worker, every connection is closed, both sides, and the
    port refuses connections from then on."""

    def __init__(self, port: int, target: int, cut_after: int | None = None) -> None:
        self.target, self.cut_after = target, cut_after
        self.sent = 0
        self.cut = threading.Event()
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._server = socket.create_server(("127.0.0.1", port))
        self._server.settimeout(0.1)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.cut.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            worker = socket.create_connection(("127.0.0.1", self.target))
            with self._lock:
                self._socks += [client, worker]
            for src, dst, up in ((client, worker, True), (worker, client, False)):
                threading.Thread(target=self._pump, args=(src, dst, up), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 16):
                if up:
                    with self._lock:
                        self.sent += len(data)
                        over = self.cut_after is not None and self.sent >= self.cut_after
                    if over:
                        self.close()
                        return
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.cut.set()
        self._server.close()
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()


@contextlib.contextmanager
def proxy(port: int, target: int, cut_after: int | None = None) -> Iterator[Proxy]:
    p = Proxy(port, target, cut_after)
    try:
        yield p
    finally:
        p.close()


@pytest.mark.slow
def test_a_worker_lost_mid_load_fails_that_load_and_the_next_load_reaches_it_again() -> None:
    worker_port, port = free_port(), free_port()
    endpoint = f"127.0.0.1:{port}"
    across = {"rpc": [endpoint], "gpu_layers": "all"}
    args = ("--ctx-size", "512", "--parallel", "1", "--admin-key", ADMIN_KEY)
    third = default_model_path().stat().st_size // 3  # every layer goes to the worker
    with (
        run_worker(worker_port),
        run_server(*args, name="rpc-load-loss") as srv,
        httpx.Client(base_url=srv.url, timeout=120, headers=ADMIN) as c,
    ):
        local = complete(c)
        assert c.post("/api/innkeeper/models/unload", json={"model": SMOL}).status_code == 200
        with proxy(port, worker_port, cut_after=third) as cutting:
            t0 = time.monotonic()
            r = load(c, across)
            took = time.monotonic() - t0
            assert cutting.cut.is_set()  # the upload was under way, and cut
        assert r.status_code == 502, r.text
        assert endpoint in r.text and "gone" in r.text
        assert took < 20, took  # no hang: at once, whatever the weights still to send

        health = c.get("/health")
        assert health.status_code == 200
        assert [w["endpoint"] for w in health.json()["rpc_workers_lost"]] == [endpoint]
        status = c.get("/api/innkeeper/status").json()
        assert status["model"]["status"] == "failed" and endpoint in status["model"]["error"]
        [stuck] = status["models_stranded"]
        assert stuck["while"] == "loading" and stuck["workers"] == [endpoint]
        assert stuck["memory_held_bytes"] > 0  # its planned share here: RAM for the rest

        # The registry is free: a load here alone works, and answers as before.
        r = load(c, {"rpc": [], "gpu_layers": "all"})
        assert r.status_code == 200, r.text
        assert complete(c) == local

        # The worker answers again on the same port: a load across it reconnects.
        with proxy(port, worker_port) as again:
            r = load(c, across)
            assert r.status_code == 200, r.text
            assert complete(c) == local
            assert again.sent > third  # the weights went through it this time
            assert "rpc_workers_lost" not in c.get("/health").json()
            assert srv.proc.poll() is None
            srv.proc.terminate()  # the stuck load's thread does not hold the exit up
            assert srv.proc.wait(timeout=15) == 0, srv.log()[-2000:]


@pytest.mark.slow
def test_a_worker_lost_while_its_model_unloads_does_not_hold_the_registry() -> None:
    """The connection is cut as the unload starts freeing the model's buffers on the worker:
    the unload answers at once, and the server keeps loading and answering."""
    worker_port, port = free_port(), free_port()
    endpoint = f"127.0.0.1:{port}"
    args = ("--ctx-size", "512", "--parallel", "1", "--admin-key", ADMIN_KEY)
    with (
        run_worker(worker_port),
        run_server(*args, name="rpc-unload-loss") as srv,
        httpx.Client(base_url=srv.url, timeout=120, headers=ADMIN) as c,
        proxy(port, worker_port) as p,
    ):
        local = complete(c)
        assert load(c, {"rpc": [endpoint], "gpu_layers": "all"}).status_code == 200
        assert complete(c) == local
        p.cut_after = p.sent + 1  # the next byte towards the worker: the unload's first free
        t0 = time.monotonic()
        r = c.post("/api/innkeeper/models/unload", json={"model": SMOL})
        assert time.monotonic() - t0 < 20
        assert r.status_code == 200, r.text
        assert p.cut.wait(5)  # the unload did talk to the worker, and lost it
        assert c.get("/health").status_code == 200
        r = load(c, {"rpc": [], "gpu_layers": "all"})  # the registry is free
        assert r.status_code == 200, r.text
        assert complete(c) == local
        assert srv.proc.poll() is None
