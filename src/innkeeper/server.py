"""Start-up of `innkeeper serve`: check the model, load it, print the banner, run uvicorn."""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import uvicorn
from rich.console import Console
from rich.table import Table

from innkeeper.api.app import create_app
from innkeeper.api.service import Service
from innkeeper.cli.app import fail
from innkeeper.cli.doctor import (
    GPU_UNUSED_CODES,
    Problem,
    find_problems,
    gather_build,
    gather_hardware,
)
from innkeeper.config import ServerConfig
from innkeeper.engine.backend import BackendError, ModelInfo, supports_gpu_offload
from innkeeper.engine.engine import Engine, EngineConfig
from innkeeper.engine.templates import TemplateRenderError
from innkeeper.models.hardware import format_size
from innkeeper.models.memory import (
    AutoSettings,
    MemoryPlan,
    auto_settings,
    memory_settings,
)
from innkeeper.models.safety import is_pickle_weights
from innkeeper.models.spec import ModelFormatError, format_params

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
    if path.exists() and not path.is_file():  # a FIFO would block open() forever
        fail(f"{path} is not a regular file (a FIFO, device or socket): serve a GGUF file")
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


def plan_settings(cfg: EngineConfig) -> AutoSettings | None:
    """Context size and GPU layers from the memory plan (`--ctx-size`/`--gpu-layers` win)."""
    try:
        return auto_settings(cfg.model_path, memory_settings(cfg), cfg.ctx_size, cfg.gpu_layers)
    except ModelFormatError as exc:
        fail(str(exc))
    except Exception as exc:  # the plan is advice: never let it stop a loadable model
        log.warning("memory plan unavailable: %s", exc)
        return None


def planned_engine(cfg: EngineConfig, auto: AutoSettings | None) -> EngineConfig:
    """The engine settings to load with: what the user gave, the plan's choices for the rest.

    Several GPUs and no --tensor-split: the plan's per-GPU layer counts become the split, so
    llama.cpp places layers exactly as `fit` and the plan did.
    """
    offload = supports_gpu_offload()
    gpu_layers = cfg.gpu_layers
    if gpu_layers is None:
        gpu_layers = auto.gpu_layers if auto else (999 if offload else 0)
    tensor_split = cfg.tensor_split
    if auto is not None and tensor_split is None and cfg.split_mode != "none":
        gpus = [d for d in auto.plan.devices if d.kind == "gpu"]
        if len(gpus) > 1 and any(d.layers for d in gpus):
            tensor_split = tuple(float(d.layers) for d in gpus)
    return replace(
        cfg,
        ctx_size=cfg.ctx_size or (auto.ctx_size if auto else None),
        gpu_layers=gpu_layers if offload else 0,
        tensor_split=tensor_split,
    )


def model_id_for(path: Path) -> str:
    name = path.name
    return name[: -len(".gguf")] if name.lower().endswith(".gguf") else name


def run_server(config: ServerConfig, *, verbose: bool, console: Console) -> None:
    model_path = check_model_file(config.model_path, config.allow_pickle)
    sock = bind_socket(config.host, config.port)
    auto = plan_settings(replace(config.engine, model_path=model_path))
    if auto and auto.plan.verdict == "would swap":
        log.warning("this model and context may not fit in memory: %s", auto.plan.summary())
    engine_config = planned_engine(replace(config.engine, model_path=model_path), auto)
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
    print_banner(console, config, engine, service, plan=auto.plan if auto else None)
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
) -> None:
    info = engine.info
    host = config.host
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    base = f"http://{shown if ':' not in shown else f'[{shown}]'}:{config.port}"
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold cyan")
    table.add_column()
    table.add_row(
        "model",
        f"{service.model_id}  ({info.architecture}, {format_params(info.n_params)} parameters, "
        f"{info.size_bytes / 2**20:.0f} MiB)",
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
