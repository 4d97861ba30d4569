"""Shared test helpers: free loopback ports and real `innkeeper serve` processes."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"


def ctrl_c_reaches_it() -> None:
    """`preexec_fn` for a child a test sends SIGINT: a suite started in the background by a
    shell (`make test &`) ignores SIGINT, and a child would inherit that and never stop."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerProcess:
    """A running `innkeeper serve` child process and how to reach it."""

    proc: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def run_server(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60.0, name: str = "server"
) -> Iterator[ServerProcess]:
    """Start `python -m innkeeper serve ARGS` on a free port; stop it on exit.

    The server's output goes to a log file under test-artifacts/ so a failing test can show it.
    Servers use one thread unless told otherwise: on a 2-core machine shared with the test
    process itself, two llama.cpp threads spin-wait on each other and decode slows ~100x.
    """
    if "--threads" not in args and "-t" not in args:
        args = (*args, "--threads", "1")
    port = free_port()
    ARTIFACTS.mkdir(exist_ok=True)
    log_path = ARTIFACTS / f"{name}-{port}.log"
    cmd = [sys.executable, "-m", "innkeeper", "serve", "--port", str(port), *args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env)
    url = f"http://127.0.0.1:{port}"
    server = ServerProcess(proc=proc, url=url, log_path=log_path)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not become healthy:\n{server.log()}")
            time.sleep(0.2)
        yield server
    finally:
        stop_process(proc, 15)


def stop_process(proc: subprocess.Popen[Any], timeout: float) -> None:
    """SIGTERM, then SIGKILL if it has not gone within `timeout` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_for_worker(port: int, proc: subprocess.Popen[Any], timeout: float = 60) -> None:
    """Until the `innkeeper worker` on `port` answers the RPC handshake (fails if it exits)."""
    from innkeeper.engine import rpc_probe

    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, "the worker exited"
        try:
            rpc_probe.probe(f"127.0.0.1:{port}", timeout=2)
            return
        except rpc_probe.WorkerUnreachable:
            assert time.monotonic() < deadline, "the worker never answered"
            time.sleep(0.2)
