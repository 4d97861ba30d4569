"""Start and stop the servers under test on free loopback ports.

Each server runs as a child process with its output in a log file beside the results, and
is stopped (terminate, then kill) when the bench finishes or fails, so no run leaves a
server behind on the shared machine.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServerSpec:
    """How to start one server: a name for reports, its role, and its command line."""

    name: str
    # ref4: llama-server with the bench's slots (-np N -kvu); cand: the candidate with as many;
    # ref1 and cand1: both with one slot (the separate single-slot comparison).
    role: str
    cmd: list[str]
    port: int
    env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@dataclass
class RunningServer:
    """A started server process."""

    spec: ServerSpec
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return self.spec.url

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kv_mib(self) -> float | None:
        """KV cache MiB llama.cpp reported allocating (its `llama_kv_cache: size =` lines,
        one per cache: a sliding-window model has two); None when the log has none."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        sizes = re.findall(r"llama_kv_cache: size =\s*([\d.]+) MiB", text)
        return sum(float(x) for x in sizes) if sizes else None

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self) -> None:
        """Terminate the server's process group; kill it if it does not go in 15 s."""
        if self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class ServerStartError(RuntimeError):
    """A server exited or never became healthy; the message carries its log's tail."""


def llama_server_spec(
    binary: Path,
    model: Path,
    *,
    parallel: int,
    threads: int,
    ctx_size: int,
    flash_attn: str,
    extra: list[str] | None = None,
) -> ServerSpec:
    """llama-server as the peers' baseline ran it; -np 4 adds -kvu (every slot may use all ctx)."""
    port = free_port()
    cmd = [
        str(binary), "-m", str(model), "-t", str(threads), "-c", str(ctx_size),
        "-np", str(parallel), "-fa", flash_attn, "--host", "127.0.0.1", "--port", str(port),
        "--no-webui",
    ]  # fmt: skip
    if parallel > 1:
        cmd.append("-kvu")
    cmd += extra or []
    name = f"llama-server -np {parallel}" + (" -kvu" if parallel > 1 else "")
    return ServerSpec(name, "ref1" if parallel == 1 else "ref4", cmd, port)


def innkeeper_spec(
    model: Path,
    *,
    threads: int,
    ctx_size: int,
    flash_attn: str,
    parallel: int | None = None,
    extra: list[str] | None = None,
) -> ServerSpec:
    """`python -m innkeeper serve` with the same model, threads, context and flash-attn, and
    `parallel` slots like the llama-server it is compared with (None: innkeeper's default)."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "innkeeper", "serve", str(model), "--host", "127.0.0.1",
        "--port", str(port), "--threads", str(threads), "--ctx-size", str(ctx_size),
        "--flash-attn", flash_attn,
        "--no-profile",  # a developer's tuned profile must not skew the comparison
    ]  # fmt: skip
    name, role = "innkeeper", "cand"
    if parallel is not None:
        cmd += ["--parallel", str(parallel)]
        name = f"innkeeper --parallel {parallel}"
        role = "cand1" if parallel == 1 else "cand"
    cmd += extra or []
    # llama.cpp's own log lines (KV cache sizes) go to the server log, as llama-server's do.
    return ServerSpec(name, role, cmd, port, env={"INNKEEPER_LLAMA_LOG": "1"})


def llama_router_spec(
    binary: Path,
    models_dir: Path,
    *,
    models_max: int,
    parallel: int,
    threads: int,
    ctx_size: int,
    flash_attn: str,
    extra: list[str] | None = None,
) -> ServerSpec:
    """llama-server in router mode: every GGUF in `models_dir` by its file stem, loaded on
    demand (each in a child llama-server that inherits these settings)."""
    port = free_port()
    cmd = [
        str(binary), "--models-dir", str(models_dir), "--models-max", str(models_max),
        "-t", str(threads), "-c", str(ctx_size), "-np", str(parallel), "-fa", flash_attn,
        "--host", "127.0.0.1", "--port", str(port), "--no-webui",
    ]  # fmt: skip
    if parallel > 1:
        cmd.append("-kvu")
    cmd += extra or []
    return ServerSpec(f"llama-server router --models-max {models_max}", "ref", cmd, port)


def innkeeper_router_spec(
    models_dir: Path,
    *,
    models_max: int,
    parallel: int,
    threads: int,
    ctx_size: int,
    flash_attn: str,
    extra: list[str] | None = None,
) -> ServerSpec:
    """`innkeeper serve` with no model (the embedded default) plus every GGUF in `models_dir`,
    switching by the request's `model` field."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "innkeeper", "serve", "--models-dir", str(models_dir),
        "--models-max", str(models_max), "--host", "127.0.0.1", "--port", str(port),
        "--threads", str(threads), "--ctx-size", str(ctx_size), "--parallel", str(parallel),
        "--flash-attn", flash_attn,
        "--no-profile",  # a developer's tuned profile must not skew the comparison
    ]  # fmt: skip
    cmd += extra or []
    return ServerSpec("innkeeper", "cand", cmd, port, env={"INNKEEPER_LLAMA_LOG": "1"})


def start(spec: ServerSpec, log_dir: Path, timeout: float = 180.0) -> RunningServer:
    """Start the server and wait until /health answers 200."""
    log_dir.mkdir(parents=True, exist_ok=True)
    slug = spec.name.replace(" ", "_").replace("/", "_")
    log_path = log_dir / f"{slug}-{spec.port}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **spec.env}
    with log_path.open("wb") as log:
        log.write(f"$ {' '.join(spec.cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            spec.cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    server = RunningServer(spec, proc, log_path)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise ServerStartError(
                f"{spec.name} exited with {proc.returncode}:\n{server.log_tail()}"
            )
        try:
            if httpx.get(f"{spec.url}/health", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise ServerStartError(
                f"{spec.name} not healthy after {timeout:.0f} s:\n" + server.log_tail()
            )
        time.sleep(0.25)
