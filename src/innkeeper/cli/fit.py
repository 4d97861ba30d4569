"""`innkeeper fit PATH|REPO`: the memory calculator — will it fit, where, and how much of it."""

from __future__ import annotations

import json
from dataclasses import replace
from inspect import Parameter, Signature
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from innkeeper.cli.app import app, console, fail
from innkeeper.cli.help import PanelHelp
from innkeeper.cli.options import build_config, options
from innkeeper.models import hub
from innkeeper.models.hardware import Hardware, format_size, hardware_with_overrides
from innkeeper.models.identify import Identification, identify
from innkeeper.models.memory import (
    CUDA_CONTEXT_BYTES,
    RUNTIME_RAM_BYTES,
    MemoryPlan,
    MemorySettings,
    Verdict,
    auto_settings,
    memory_settings,
    plan_memory,
)
from innkeeper.models.spec import ModelFormatError, ModelSpec
from innkeeper.settings import ConfigError
from innkeeper.settings.engine import EngineConfig
from innkeeper.settings.server import ServerConfig

EXIT_DOES_NOT_FIT = 2
"""Exit status of `fit` when the plan does not fit (1 stays "could not plan": bad input)."""

_VERDICT_STYLE = {
    Verdict.VRAM: "green",
    Verdict.PARTIAL: "yellow",
    Verdict.RAM: "cyan",
    Verdict.SWAP: "red",
    Verdict.VRAM_OOM: "red",
}


def _short(n: int) -> str:
    """Compact sizes for table cells: 7.35G, 224M."""
    if n >= 1024**3:
        return f"{n / 1024**3:.2f}G"
    if n >= 1024**2:
        return f"{n / 1024**2:.0f}M"
    return f"{n / 1024:.0f}K"


def _overhead_caption(plan: MemoryPlan, measured: dict[str, int] | None) -> str:
    """What the overhead column holds: most of it is the runtime llama.cpp does not count."""
    runtime = f"{_short(RUNTIME_RAM_BYTES)} of RAM for Python, the server and llama.cpp's code"
    if any(d.kind == "gpu" and d.overhead_bytes for d in plan.devices):
        runtime += f", {_short(CUDA_CONTEXT_BYTES)} per GPU for the CUDA context"
    text = (
        f"G = GiB, M = MiB. Overhead: llama.cpp's output buffer "
        f"({_short(plan.output_buffer_bytes)}) plus the runtime llama.cpp does not allocate "
        f"itself ({runtime})."
    )
    if measured:
        text += (
            f" Without the runtime the plan is {_short(plan.llama_bytes)}, against the "
            f"{_short(measured['total_bytes'])} llama.cpp measured."
        )
    return text


def _plan_table(plan: MemoryPlan, measured: dict[str, int] | None) -> Table:
    t = Table(
        title_justify="left", caption=_overhead_caption(plan, measured), caption_justify="left"
    )
    t.add_column("device", no_wrap=True)
    t.add_column("layers", justify="right", no_wrap=True, min_width=6)
    for col in ("weights", "KV", "compute", "overhead", "total", "free"):
        t.add_column(col, justify="right", no_wrap=True)
    for d in plan.devices:
        style = "" if d.fits else "red"
        t.add_row(
            d.name.split(":")[0],
            str(d.layers),
            _short(d.weights_bytes),
            _short(d.kv_cache_bytes),
            _short(d.compute_bytes),
            _short(d.overhead_bytes),
            f"[{style}]{_short(d.total_bytes)}[/]" if style else _short(d.total_bytes),
            _short(d.capacity_bytes),
        )
    t.add_section()
    t.add_row(
        "[bold]all[/]",
        "",
        _short(plan.weights_bytes),
        _short(plan.kv_cache_bytes),
        _short(plan.compute_bytes),
        _short(plan.overhead_bytes),
        f"[bold]{_short(plan.total_bytes)}[/]",
        "",
    )
    if measured:
        t.add_row(
            "[dim]llama.cpp[/]",
            "",
            _short(measured["model_bytes"]),
            _short(measured["kv_cache_bytes"]),
            _short(measured["compute_bytes"]),
            _short(measured["output_bytes"]),
            _short(measured["total_bytes"]),
            "",
        )
    return t


def fit_command(**values: Any) -> None:
    """Will this model fit? Weights, KV cache, compute buffers and overhead per device.

    The options are `serve`'s that change memory, with serve's defaults: the plan is what
    `serve` would allocate.

    Exit status: 0 fits (VRAM, part-offloaded or RAM), 2 does not fit (would swap), 1 error.
    """
    target, measure = values.pop("model"), values.pop("measure")
    as_json = values.pop("as_json")
    try:
        server = build_config(Path(), values)  # serve's settings, parsed and checked as serve's
        cfg = server.engine
        hw = hardware_with_overrides(vram=server.plan_vram, ram=server.plan_ram)
        if cfg.rpc:  # each worker's devices, sized by what it reports free
            hw = _with_workers(hw, cfg.rpc)
        # hub repos and folders of variants: the file `pull` would pick, planned with these flags
        machine = hub.Machine(hw, memory_settings(cfg), cfg.ctx_size, cfg.gpu_layers)
        ident = identify(target, machine)
    except (ModelFormatError, ValueError, OSError) as exc:  # ConfigError is a ValueError
        fail(str(exc))
    if cfg.mmproj is None and ident.vision is not None:  # serve pairs it the same way
        cfg = replace(cfg, mmproj=ident.vision.path)
    spec = ident.spec
    if spec is None:
        fail(f"cannot plan memory for {target}: {ident.format} model without readable metadata")
    if not spec.n_vocab or not spec.n_layer:
        fail(f"{target}: the metadata lacks the vocabulary size or layer count needed to plan")

    header = int(spec.extra.get("header_bytes") or 0)
    variants = ident.variants if ident.kind == "hub" or len(ident.variants) > 1 else []
    try:
        auto = auto_settings(cfg, hw, spec=spec)  # the context `serve` would pick
        ctx, plan = auto.ctx_size, auto.plan
        rows = []
        for v in variants:
            weights = max(v.size - header, 0)
            vp = plan
            if v.name != ident.selected:
                vp = plan_memory(spec, MemorySettings(cfg, ctx), hw, weights_bytes=weights)
            rows.append((v, vp))
    except ConfigError as exc:
        fail(str(exc))
    fitting = [(v, p) for v, p in rows if p.fits]
    best = max(fitting, key=lambda vp: vp[0].size)[0] if fitting else None

    measured = _measure(ident, cfg, plan) if measure else None

    if as_json:
        out: dict[str, Any] = {
            "model": ident.target,
            "format": ident.format,
            "quantization": ident.quantization,
            "selected": ident.selected,
            "selected_file": ident.selected_file,
            "selected_because": ident.choice,
            **plan.to_json(),
            "ctx_size": ctx,
            "hardware": hw.to_json(),
        }
        if cfg.rpc:
            out["network_bytes_per_token"] = _network(spec, plan)
        if rows:
            out["variants"] = [
                {
                    **v.to_json(),
                    **{
                        k: p.to_json()[k]
                        for k in ("total_bytes", "gpu_layers", "verdict", "verdict_code", "fits")
                    },
                    "best": best is not None and v.name == best.name,
                }
                for v, p in rows
            ]
            out["best_variant"] = best.name if best else None
        if measured is not None:
            out["measured"] = measured
        print(json.dumps(out, indent=2))
    else:
        _render(ident, spec, hw, plan, ctx, rows, best, measured)
    if not plan.fits:
        raise typer.Exit(EXIT_DOES_NOT_FIT)


def _measure(ident: Identification, cfg: EngineConfig, plan: MemoryPlan) -> dict[str, int]:
    """llama.cpp's own allocations for the planned settings (a dry-run load in a child)."""
    if ident.kind == "hub" or ident.format != "gguf":
        fail("--measure needs a local GGUF file (it loads the model in llama.cpp)")
    from innkeeper.engine.measure import measure

    path = Path(ident.target)
    if path.is_dir():
        chosen = next(v for v in ident.variants if v.name == ident.selected)
        path = path / chosen.main_file
    try:
        m = measure(
            path,
            plan.settings.ctx_size,
            cache_type=cfg.cache_type_k,
            cache_type_v=cfg.cache_type_v,
            flash_attn=plan.kv.flash_attn,
            gpu_layers=plan.gpu_layers,
            parallel=cfg.parallel,
            n_batch=cfg.batch_size,
            n_ubatch=cfg.ubatch_size,
            swa_full=cfg.swa_full,
            kv_unified=plan.settings.kv_unified,
        )
    except (ModelFormatError, ValueError) as exc:
        fail(str(exc))
    return {
        "model_bytes": m.model_bytes,
        "kv_cache_bytes": m.kv_cache_bytes,
        "compute_bytes": m.compute_bytes,
        "output_bytes": m.output_bytes,
        "total_bytes": m.total_bytes,
    }


def _with_workers(hw: Hardware, endpoints: tuple[str, ...]) -> Hardware:
    """`hw` with the RPC workers' devices, or one error line naming the one that failed."""
    from innkeeper.engine.rpc import RpcError, with_workers

    try:
        return with_workers(hw, endpoints)
    except RpcError as exc:
        fail(str(exc))


def _network(spec: ModelSpec, plan: MemoryPlan) -> int:
    """Bytes per token crossing between the devices that hold layers (RAM included)."""
    from innkeeper.engine.rpc import transfer_per_token

    used = sum(1 for d in plan.devices if d.layers or d.kind == "ram")
    return transfer_per_token(spec.n_embd, used)


def _render(
    ident: Identification,
    spec: ModelSpec,
    hw: Hardware,
    plan: MemoryPlan,
    ctx: int,
    rows: list[Any],
    best: Any,
    measured: dict[str, int] | None,
) -> None:
    e = plan.settings.engine
    gpus = ", ".join(f"{g.name} ({format_size(g.free_bytes)} free)" for g in hw.gpus) or "no GPU"
    console.print(
        f"[bold]{ident.target}[/] [dim]{spec.architecture}, {ident.quantization or '?'}, "
        f"trained context {spec.context_length:,}[/]"
    )
    if ident.choice:
        console.print(
            f"[dim]planned file {ident.selected_file}: {ident.choice}[/]", highlight=False
        )
    console.print(
        f"[dim]context {ctx:,} ({plan.kv.n_ctx:,} cells), KV {e.cache_type_k}/{e.cache_type_v}, "
        f"flash attention {'on' if plan.kv.flash_attn else 'off'}, {e.parallel} parallel; "
        f"{hw.source} hardware: {format_size(hw.ram_available_bytes)} RAM available, {gpus}[/]"
    )
    console.print(_plan_table(plan, measured))
    style = _VERDICT_STYLE[plan.verdict]
    layers = f" ({plan.gpu_layers}/{plan.n_layers} layers on GPU)" if hw.gpus else ""
    console.print(
        f"[bold {style}]{plan.verdict_text}[/]{layers}: {format_size(plan.total_bytes)} needed"
    )
    for note in plan.notes:
        console.print(f"[dim]· {note}[/]")
    if e.rpc:
        console.print(
            f"[dim]· network: {format_size(_network(spec, plan))} per generated token between "
            "the devices (hidden state hand-overs; a prompt sends as much per token)[/]"
        )
    if rows:
        t = Table(title=f"all quantizations at context {ctx:,}", title_justify="left")
        t.add_column("")
        t.add_column("file")
        t.add_column("quant")
        t.add_column("file size", justify="right")
        t.add_column("total", justify="right")
        t.add_column("GPU layers", justify="right")
        t.add_column("verdict")
        for v, p in rows:
            mark = "[bold green]★[/]" if best is not None and v.name == best.name else ""
            st = _VERDICT_STYLE[p.verdict]
            t.add_row(
                mark,
                v.name,
                v.quantization or "?",
                format_size(v.size),
                format_size(p.total_bytes),
                f"{p.gpu_layers}/{p.n_layers}",
                f"[{st}]{p.verdict_text}[/]",
            )
        console.print(t)
        if best is not None:
            console.print(f"[green]★ {best.name}[/] is the largest that fits this machine.")
        else:
            console.print("[red]none of these fits this machine at this context.[/]")


# typer reads the options from the signature: `serve`'s memory options, generated from the
# same declarations (cli/options.py), between the model and fit's own options.
fit_command.__signature__ = Signature(  # type: ignore[attr-defined]
    [
        Parameter(
            "model",
            Parameter.POSITIONAL_OR_KEYWORD,
            annotation=Annotated[
                str,
                typer.Argument(
                    metavar="MODEL",
                    help="a model file, a model folder, or a hub repo id (owner/name[:QUANT])",
                    show_default=False,
                ),
            ],
        ),
        *options(EngineConfig, ServerConfig, keep=lambda spec: spec.memory),
        Parameter(
            "measure",
            Parameter.KEYWORD_ONLY,
            default=False,
            annotation=Annotated[
                bool,
                typer.Option(
                    "--measure",
                    help="also dry-run the load in llama.cpp and show what it allocates "
                    "(local GGUF only)",
                ),
            ],
        ),
        Parameter(
            "as_json",
            Parameter.KEYWORD_ONLY,
            default=False,
            annotation=Annotated[bool, typer.Option("--json", help="print machine-readable JSON")],
        ),
    ]
)
app.command("fit", cls=PanelHelp)(fit_command)
