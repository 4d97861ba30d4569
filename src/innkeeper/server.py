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
from innkeeper.api.service import Service
from innkeeper.cli.app import fail
from innkeeper.config import ServerConfig
from innkeeper.engine.backend import BackendError, supports_gpu_offload
from innkeeper.engine.engine import Engine, EngineConfig
from innkeeper.engine.templates import TemplateRenderError
from innkeeper.models.memory import AutoSettings, auto_settings
from innkeeper.models.safety import is_pickle_weights
from innkeeper.models.spec import ModelFormatError

log = logging.getLogger("innkeeper")

GGUF_MAGIC = b"GGUF"


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
    if is_pickle_weights(path):
        if not allow_pickle:
            fail(
                f"{path.name} holds PyTorch pickle weights, which can run arbitrary code when "
                "loaded; innkeeper refuses them (see `innkeeper inspect` for a scan; pass "
                "--allow-pickle only if you trust the file)"
            )
        fail(f"{path.name} is a PyTorch checkpoint: convert it to GGUF to serve it")
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        firsts = [p for p in ggufs if "-00001-of-" in p.name]
        if len(ggufs) == 1 or len(firsts) == 1:
            return check_model_file((firsts or ggufs)[0], allow_pickle)
        if not ggufs:
            fail(
                f"{path} holds no GGUF file: innkeeper serves GGUF models "
                f"(see `innkeeper inspect {path}`)"
            )
        fail(f"{path} holds {len(ggufs)} GGUF files: name the one to serve")
    try:
        with path.open("rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror}")
    if magic != GGUF_MAGIC:
        if path.suffix.lower() == ".safetensors":
            fail(
                f"{path.name} is a safetensors file: innkeeper serves GGUF models "
                "(convert it, or pull a GGUF build)"
            )
        fail(f"{path} is not a GGUF model file (it does not start with the GGUF magic bytes)")
    return path


def plan_settings(config: ServerConfig, model_path: Path) -> AutoSettings | None:
    """Context size and GPU layers from the memory plan (`--ctx-size`/`--gpu-layers` win)."""
    try:
        return auto_settings(
            model_path,
            config.ctx_size,
            config.cache_type_k,
            config.flash_attn != "off",
            config.gpu_layers,
            config.parallel,
            n_ubatch=config.ubatch_size,
            kv_unified=True,  # the engine shares one cache among its slots
        )
    except ModelFormatError as exc:
        fail(str(exc))
    except Exception as exc:  # the plan is advice: never let it stop a loadable model
        log.warning("memory plan unavailable: %s", exc)
        return None


def model_id_for(path: Path) -> str:
    name = path.name
    return name[: -len(".gguf")] if name.lower().endswith(".gguf") else name


def run_server(config: ServerConfig, *, verbose: bool, console: Console) -> None:
    model_path = check_model_file(config.model_path, config.allow_pickle)
    sock = bind_socket(config.host, config.port)
    auto = plan_settings(config, model_path)
    gpu_layers = config.gpu_layers
    if gpu_layers is None:
        gpu_layers = auto.gpu_layers if auto else (999 if supports_gpu_offload() else 0)
    if not supports_gpu_offload():
        gpu_layers = 0
    ctx_size = config.ctx_size or (auto.ctx_size if auto else 0)
    if auto and auto.plan.verdict == "would swap":
        log.warning("this model and context may not fit in memory: %s", auto.plan.summary())
    engine_config = EngineConfig(
        model_path=model_path,
        ctx_size=ctx_size,
        gpu_layers=gpu_layers,
        threads=config.threads,
        threads_batch=config.threads_batch,
        batch_size=config.batch_size,
        ubatch_size=config.ubatch_size,
        parallel=config.parallel,
        flash_attn=config.flash_attn,
        cache_type_k=config.cache_type_k,
        cache_type_v=config.cache_type_v,
        use_mmap=config.mmap,
        use_mlock=config.mlock,
        cache_reuse=config.cache_reuse,
        cache_ram_mib=config.cache_ram_mib,
        max_queue=config.max_queue,
        chat_template=config.chat_template,
    )
    if verbose:
        import os

        os.environ["INNKEEPER_LLAMA_LOG"] = "1"
    with console.status(f"loading {model_path.name}…", spinner="dots"):
        try:
            engine = Engine(engine_config)
        except (BackendError, ValueError, TemplateRenderError) as exc:
            sock.close()
            fail(str(exc))
    service = Service(
        engine,
        model_id=config.model_alias or model_id_for(model_path),
        default_max_tokens=config.default_max_tokens,
        request_timeout=config.request_timeout,
        sse_ping_interval=config.sse_ping_interval,
    )
    app = create_app(service, config)
    if auto is not None:
        app.state.memory_plan = auto.plan.to_json()
    print_banner(console, config, engine, service)
    server = GracefulServer(
        uvicorn.Config(
            app,
            log_level="info" if verbose else "warning",
            access_log=verbose,
            timeout_graceful_shutdown=5,
        ),
        on_shutdown=engine.scheduler.cancel_all,
    )
    try:
        server.run(sockets=[sock])
    finally:
        engine.close()
        log.info("innkeeper stopped")


def print_banner(console: Console, config: ServerConfig, engine: Engine, service: Service) -> None:
    info = engine.info
    host = config.host
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    base = f"http://{shown if ':' not in shown else f'[{shown}]'}:{config.port}"
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold cyan")
    table.add_column()
    table.add_row(
        "model", f"{service.model_id}  ({info.description}, {info.size_bytes / 2**20:.0f} MiB)"
    )
    table.add_row(
        "context",
        f"{engine.n_ctx} tokens (trained {info.n_ctx_train}), KV {engine.config.cache_type_k}/"
        f"{engine.config.cache_type_v}, flash attention {engine.config.flash_attn}",
    )
    table.add_row(
        "compute",
        f"{engine.ctx.threads} threads ({engine.ctx.threads_batch} for prompts), "
        f"GPU layers {engine.config.gpu_layers}, {len(engine.scheduler.slots)} parallel slots",
    )
    table.add_row("chat template", engine.template.name)
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
    console.print()
