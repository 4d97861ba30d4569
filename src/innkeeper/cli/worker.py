"""`innkeeper worker`: lend this machine's devices to an `innkeeper serve --rpc` elsewhere.

It runs ggml's RPC server (engine/rpc.py). That server has no authentication and no
encryption: anyone who reaches the port can run code on the devices and read what they hold.
So it listens on loopback unless told otherwise with `--insecure-expose`; across machines the
safe way is an SSH tunnel (`ssh -L`) or a VPN to a worker that stays on loopback.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from innkeeper.cli.app import CliError, app, console, err_console, fail
from innkeeper.settings import ConfigError, parse_endpoint

if TYPE_CHECKING:
    from innkeeper.engine.devices import LocalDevice

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 50052
EXPOSE_WARNING = (
    "warning: the RPC worker listens on {host}, beyond this machine. llama.cpp's RPC has no "
    "authentication and no encryption: anyone who reaches {host}:{port} can use these devices "
    "and read the model and prompts they hold. Prefer a worker on 127.0.0.1 reached through "
    "`ssh -L {port}:127.0.0.1:{port} this-machine` or a VPN."
)


def is_loopback(host: str) -> bool:
    """Whether `host` (an IPv4 address) stays on this machine: 127.0.0.0/8."""
    return ipaddress.IPv4Address(host).is_loopback


def check_bind(host: str, port: int, insecure_expose: bool) -> str:
    """The endpoint to listen on, or CliError: a bad address (ggml's server binds IPv4
    addresses only), or one beyond loopback without `--insecure-expose`."""
    host = DEFAULT_HOST if host == "localhost" else host
    try:
        ipaddress.IPv4Address(host)
        endpoint = parse_endpoint(f"{host}:{port}")
    except ipaddress.AddressValueError:
        raise CliError(f"--host takes an IPv4 address such as 127.0.0.1 (got {host!r})") from None
    except ConfigError as exc:
        raise CliError(f"--host/--port: {exc}") from None
    if not is_loopback(host) and not insecure_expose:
        raise CliError(
            f"--host {host} would expose the worker beyond this machine, and llama.cpp's RPC "
            "has no authentication and no encryption: keep it on 127.0.0.1 and reach it "
            f"through `ssh -L {port}:127.0.0.1:{port} this-machine` or a VPN, or add "
            "--insecure-expose if this network is trusted"
        )
    return endpoint


def _port_free(host: str, port: int) -> str | None:
    """None when the address can be bound, else why not (one line, before ggml tries)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def choose_devices(available: list[LocalDevice], wanted: str | None) -> list[LocalDevice]:
    """`--device` names (ggml's), else every GPU, else the CPU, as llama.cpp's rpc-server."""
    from innkeeper.engine.devices import DEV_CPU, DEV_GPU, DEV_IGPU

    if wanted:
        by_name = {d.name.lower(): d for d in available}
        chosen = []
        for name in (n.strip() for n in wanted.split(",") if n.strip()):
            if name.lower() not in by_name:
                known = ", ".join(d.name for d in available)
                raise CliError(f"--device: no device {name!r} here (available: {known})")
            chosen.append(by_name[name.lower()])
        return chosen
    gpus = [d for d in available if d.type in (DEV_GPU, DEV_IGPU)]
    return gpus or [d for d in available if d.type == DEV_CPU][:1]


@app.command("worker")
def worker_command(
    host: str = typer.Option(
        DEFAULT_HOST, "--host", help="address to listen on (beyond loopback: --insecure-expose)"
    ),
    port: int = typer.Option(DEFAULT_PORT, "--port", "-p", help="port to listen on"),
    device: str | None = typer.Option(
        None,
        "--device",
        "-d",
        metavar="NAME,…",
        help="devices to lend, by ggml name (CUDA0, Vulkan1, CPU; default: every GPU, else CPU)",
    ),
    threads: int = typer.Option(0, "--threads", "-t", min=0, help="CPU threads (0: all cores)"),
    cache: Path | None = typer.Option(
        None,
        "--cache",
        metavar="DIR",
        help="keep received weights in DIR, so a reload does not send them again",
    ),
    insecure_expose: bool = typer.Option(
        False,
        "--insecure-expose",
        help="allow listening beyond loopback (the RPC protocol has no authentication)",
    ),
) -> None:
    """Lend this machine's devices to `innkeeper serve --rpc` (llama.cpp's RPC server)."""
    try:
        run_worker(host, port, device, threads, cache, insecure_expose)
    except CliError as exc:
        fail(str(exc))


def run_worker(
    host: str,
    port: int,
    device: str | None,
    threads: int,
    cache: Path | None,
    insecure_expose: bool,
) -> None:
    """The worker, until Ctrl-C; CliError for anything that keeps it from serving."""
    from innkeeper.engine import rpc
    from innkeeper.engine.backend import BackendError, default_threads
    from innkeeper.engine.devices import local_devices

    endpoint = check_bind(host, port, insecure_expose)
    host = endpoint.rpartition(":")[0]
    if not rpc.available():
        raise CliError(rpc.UNAVAILABLE)
    try:
        devices = choose_devices(local_devices(), device)
    except BackendError as exc:
        raise CliError(str(exc)) from None
    why = _port_free(host, port)
    if why is not None:
        raise CliError(f"cannot listen on {endpoint}: {why}")
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
    if not is_loopback(host):
        err_console.print(f"[bold yellow]{EXPOSE_WARNING.format(host=host, port=port)}[/]")
    names = ", ".join(f"{d.name} ({d.description})" for d in devices)
    console.print(f"innkeeper worker on {endpoint}: {names}")
    console.print(f"on the main machine: [bold]innkeeper serve MODEL --rpc {endpoint}[/]")
    if is_loopback(host):
        console.print(
            f"[dim]from another machine: ssh -N -L {port}:127.0.0.1:{port} THIS-MACHINE, "
            f"then --rpc 127.0.0.1:{port} there[/]"
        )
    console.print("[dim]Ctrl-C stops it[/]")
    n_threads = threads or default_threads()
    # ggml's server loop blocks in C forever: a daemon thread, so Ctrl-C ends the process.
    server = threading.Thread(
        target=rpc.start_server, args=(endpoint, devices, n_threads, cache), daemon=True
    )
    server.start()
    try:
        while server.is_alive():
            server.join(0.5)
    except KeyboardInterrupt:
        console.print("worker stopped")
        return
    raise CliError(f"the RPC server on {endpoint} stopped (see the lines above)")
