"""Start-up of `innkeeper serve`: check the model, load it, print the banner, run uvicorn."""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import uvicorn
from rich.console import Console
from rich.table import Table

from innkeeper.api.app import create_app
from innkeeper.cli.app import fail
from innkeeper.cli.doctor import (
    GPU_UNUSED_CODES,
    Problem,
    find_problems,
    gather_build,
    gather_hardware,
)
from innkeeper.engine.backend import BackendError, ModelInfo
from innkeeper.engine.engine import Engine
from innkeeper.engine.planning import ModelFileError, checked_model_file
from innkeeper.engine.templates import TemplateRenderError
from innkeeper.models.hardware import format_size
from innkeeper.models.memory import MemoryPlan, Verdict
from innkeeper.models.spec import ModelFormatError, format_params
from innkeeper.serving.registry import ModelRegistry
from innkeeper.serving.service import Service
from innkeeper.settings.server import ServerConfig

log = logging.getLogger("innkeeper")


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind before loading the model, so a busy port fails in a second, not after a load."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        fail(
            f"cannot listen on {host}:{port}: {exc.strerror} (is another server running? try --port)"
        )
    except socket.gaierror as exc:
        sock.close()
        fail(f"cannot listen on {host!r}: {exc}")
    return sock


class GracefulServer(uvicorn.Server):
    """uvicorn, but SIGTERM/SIGINT cancel running generations and the process exits 0.

    Stock uvicorn waits up to the graceful timeout for open streams (a long generation
    would hold shutdown for its whole length) and then re-raises the signal, which kills
    the process before the engine is closed. Here shutdown first cancels every generation,
    so each stream ends at once with its finish event, and the signal is not re-raised.
    """

    def __init__(self, config: uvicorn.Config, on_shutdown: Callable[[], object]) -> None:
        super().__init__(config)
        self.on_shutdown = on_shutdown

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        handled = (signal.SIGINT, signal.SIGTERM)
        try:
            original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        except ValueError:  # not the main thread: signals are not ours to take
            yield
            return
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        n = self.on_shutdown()
        if n:
            log.info("shutting down: cancelled %s running or queued generations", n)
        await super().shutdown(sockets)


def check_model_file(path: Path, allow_pickle: bool) -> Path:
    """Refuse what llama.cpp cannot or must not load, with a message that says why."""
    try:
        return checked_model_file(path, allow_pickle)
    except ModelFileError as exc:
        fail(str(exc))


def run_server(
    config: ServerConfig, *, verbose: bool, console: Console, profile: str | None = None
) -> None:
    model_path = check_model_file(config.model_path, config.allow_pickle)
    sock = bind_socket(config.host, config.port)
    if verbose:
        import os

        os.environ["INNKEEPER_LLAMA_LOG"] = "1"
    registry = ModelRegistry(config, model_path)
    default = registry.default
    try:
        auto = registry.plan_of(default)
    except ModelFormatError as exc:
        sock.close()
        fail(str(exc))
    if auto and auto.plan.verdict is Verdict.SWAP:
        log.warning("this model and context may not fit in memory: %s", auto.plan.summary())
    with console.status(f"loading {model_path.name}…", spinner="dots"):
        try:
            service = registry.load_at_start()
        except (BackendError, ValueError, TemplateRenderError, ModelFormatError) as exc:
            sock.close()
            fail(str(exc))
    app = create_app(registry, config)
    plan = auto.plan if auto else None
    print_banner(console, config, service.engine, service, plan=plan, profile=profile)
    if len(registry.entries_by_id) > 1:
        console.print(
            f"[bold cyan]models[/] {len(registry.entries_by_id)} available "
            f"(up to {config.models_max} loaded at once): {', '.join(registry.entries_by_id)}",
            highlight=False,
        )
    server = GracefulServer(
        uvicorn.Config(
            app,
            log_level="info" if verbose else "warning",
            access_log=verbose,
            timeout_graceful_shutdown=5,
        ),
        on_shutdown=registry.cancel_all,
    )
    try:
        server.run(sockets=[sock])
    finally:
        registry.close()
        log.info("innkeeper stopped")


def banner_warnings(
    *,
    info: ModelInfo,
    template_given: bool,
    template_name: str,
    problems: list[Problem],
    plan: MemoryPlan | None,
) -> list[str]:
    """What the banner must warn about, as plain sentences (a pure function, for tests).

    A GGUF without a chat template (chat then uses the architecture's built-in format); a GPU
    this llama.cpp build cannot use (`doctor`'s problems, with their fixes); and a plan that
    needs more VRAM than is free, where the NVIDIA driver may spill into system RAM.
    """
    out: list[str] = []
    if not info.chat_template and not template_given:
        out.append(
            f"the GGUF has no chat template: chat requests use the {template_name} format "
            f"(chosen from its {info.architecture} architecture); pass --chat-template if the "
            "model expects another"
        )
    for p in problems:
        if p.code in GPU_UNUSED_CODES:
            out.append(f"your GPU is not used: {p.message}. Fix: {p.fix}")
    for d in plan.devices if plan is not None else ():
        if d.kind == "gpu" and not d.fits:
            out.append(
                f"the plan needs {format_size(d.total_bytes)} on {d.name} but only "
                f"{format_size(d.capacity_bytes - d.margin_bytes)} is free to use: the NVIDIA "
                "driver may spill into system RAM, which makes generation many times slower; "
                "lower --ctx-size or --gpu-layers (see `innkeeper fit`)"
            )
    return out


def _doctor_problems() -> list[Problem]:
    """`doctor`'s findings for this machine; none if they cannot be gathered (advice only)."""
    try:
        return find_problems(gather_build(), gather_hardware())
    except Exception as exc:
        log.debug("GPU check skipped: %s", exc)
        return []


def print_banner(
    console: Console,
    config: ServerConfig,
    engine: Engine,
    service: Service,
    plan: MemoryPlan | None = None,
    profile: str | None = None,
) -> None:
    info = engine.info
    stats = engine.stats()
    host = config.host
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    base = f"http://{shown if ':' not in shown else f'[{shown}]'}:{config.port}"
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold cyan")
    table.add_column(overflow="fold")  # a path is shown whole, folded, never cut to `…`
    table.add_row(
        "model",
        f"{service.model_id}  ({info.architecture}, {format_params(info.n_params)} parameters, "
        f"{info.size_bytes / 2**20:.0f} MiB)",
    )
    table.add_row("file", str(config.model_path))  # where a pulled model is stored
    table.add_row(
        "context",
        f"{engine.n_ctx} tokens (trained {info.n_ctx_train}), KV {engine.config.cache_type_k}/"
        f"{engine.config.cache_type_v}, flash attention {engine.config.flash_attn}",
    )
    table.add_row(
        "compute",
        f"{stats.threads} threads ({stats.threads_batch} for prompts), "
        f"GPU layers {engine.config.gpu_layers}, {stats.slots} parallel slots",
    )
    if engine.config.rpc:  # layers split across machines: where each share went
        shares = ", ".join(f"{d} {n} layer{'s' * (n != 1)}" for d, n in info.layer_devices)
        table.add_row("devices", shares or "-")
    if profile is not None:  # what `innkeeper tune` set, or why its profile was not used
        table.add_row("tuned profile", profile)
    template_given = engine.config.chat_template is not None
    no_template = not info.chat_template and not template_given
    table.add_row(
        "chat template",
        engine.template.name + (" [yellow](none in the GGUF)[/]" if no_template else ""),
    )
    table.add_row(
        "auth",
        "API key required"
        if config.api_keys
        else "none (loopback only)"
        if config.loopback
        else "[bold red]none: open to anyone who can reach this address (--insecure-no-auth)[/]",
    )
    if config.cors_origins:
        table.add_row("CORS", ", ".join(config.cors_origins))
    console.print()
    console.print("[bold green]innkeeper is serving[/]")
    console.print(table)
    urls = Table(title="Paste into SillyTavern", title_justify="left", show_edge=False)
    urls.add_column("API type")
    urls.add_column("URL", style="bold")
    urls.add_row("Text Completion → KoboldCpp", base)
    urls.add_row("Text Completion → Default (Oobabooga)", base)
    urls.add_row("Chat Completion → Custom (OpenAI-compatible)", f"{base}/v1")
    urls.add_row("KoboldAI Classic", f"{base}/api")
    urls.add_row("Built-in chat page", f"{base}/")
    console.print(urls)
    for warning in banner_warnings(
        info=info,
        template_given=template_given,
        template_name=engine.template.name,
        problems=_doctor_problems(),
        plan=plan,
    ):
        console.print(f"[bold yellow]warning:[/] {warning}", highlight=False)
    console.print()
