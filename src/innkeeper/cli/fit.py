"""`innkeeper fit PATH|REPO`: the memory calculator — will it fit, where, and how much of it."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from innkeeper.cli.app import app, console, fail
from innkeeper.engine.config import DEFAULT_CTX, EngineConfig
from innkeeper.models import hub
from innkeeper.models.hardware import Hardware, format_size, hardware_with_overrides
from innkeeper.models.identify import Identification, identify
from innkeeper.models.memory import (
    MemoryPlan,
    MemorySettings,
    default_ctx_candidates,
    flash_attn_enabled,
    memory_settings,
    plan_memory,
)
from innkeeper.models.spec import ModelFormatError, ModelSpec
from innkeeper.settings import parse_text, settings_of

# `fit` plans what `serve` would load: its defaults are serve's (declared once, in EngineConfig).
_SERVE = EngineConfig(model_path=Path())
_GPU = {f.name: spec for f, spec in settings_of(EngineConfig)}
EXIT_DOES_NOT_FIT = 2
"""Exit status of `fit` when the plan does not fit (1 stays "could not plan": bad input)."""

_VERDICT_STYLE = {
    "vram": "green",
    "partial": "yellow",
    "ram": "cyan",
    "swap": "red",
    "vram_oom": "red",
}


def _choose_ctx(spec: ModelSpec, make: Any) -> tuple[int, MemoryPlan]:
    """No --ctx-size: the largest default context that fits (as `serve` will pick)."""
    plans = [(c, make(c)) for c in default_ctx_candidates(spec.context_length)]
    for wanted in (("vram",), ("vram", "partial", "ram")):
        for c, p in plans:
            if p.verdict_code in wanted:
                return c, p
    return plans[-1]


def _short(n: int) -> str:
    """Compact sizes for table cells: 7.35G, 224M."""
    if n >= 1024**3:
        return f"{n / 1024**3:.2f}G"
    if n >= 1024**2:
        return f"{n / 1024**2:.0f}M"
    return f"{n / 1024:.0f}K"


def _plan_table(plan: MemoryPlan, measured: dict[str, int] | None) -> Table:
    t = Table(title_justify="left", caption="G = GiB, M = MiB", caption_justify="left")
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


@app.command("fit")
def fit_command(
    target: str = typer.Argument(
        ..., help="A model file, a model folder, or a hub repo id (owner/name[:QUANT])."
    ),
    ctx_size: int | None = typer.Option(
        None, "--ctx-size", "-c", help="Context size (default: the largest ≤ 8192 that fits)."
    ),
    cache_type: str = typer.Option(
        "f16",
        "--cache-type",
        "--cache-type-k",
        "-ctk",
        help="KV cache type (K, and V unless --cache-type-v): f16, q8_0, q4_0, q4_1, q5_0, "
        "q5_1, iq4_nl, bf16, f32.",
    ),
    cache_type_v: str | None = typer.Option(
        None, "--cache-type-v", "-ctv", help="V cache type, if different from K."
    ),
    flash_attn: str = typer.Option(
        _SERVE.flash_attn,
        "--flash-attn",
        help="Flash attention: on, off or auto (as serve: on unless llama.cpp lacks it).",
    ),
    parallel: int = typer.Option(
        _SERVE.parallel, "--parallel", "-np", help="Parallel sequences (slots), as serve's."
    ),
    gpu_layers: int | None = typer.Option(
        None, "--gpu-layers", "-ngl", help="Layers on the GPU (default: as many as fit)."
    ),
    vram: str | None = typer.Option(
        None, "--vram", help="Pretend GPU memory, e.g. 12GiB (several: 24GiB,12GiB; 0 = no GPU)."
    ),
    ram: str | None = typer.Option(None, "--ram", help="Pretend RAM, e.g. 32GiB."),
    ubatch: int = typer.Option(
        _SERVE.ubatch_size, "--ubatch-size", help="Physical batch size (llama.cpp n_ubatch)."
    ),
    swa_full: bool = typer.Option(
        _SERVE.swa_full,
        "--swa-full/--no-swa-full",
        help="Full-size sliding-window cache, as serve --swa-full (default: window-sized, "
        "as serve and llama-server allocate).",
    ),
    main_gpu: int = typer.Option(0, *_GPU["main_gpu"].flags, help=_GPU["main_gpu"].help),
    split_mode: str = typer.Option(
        "layer", *_GPU["split_mode"].flags, help=_GPU["split_mode"].help
    ),
    tensor_split: str | None = typer.Option(
        None, *_GPU["tensor_split"].flags, help="share of the model per GPU, e.g. 3,1"
    ),
    kv_offload: bool = typer.Option(True, *_GPU["kv_offload"].flags, help=_GPU["kv_offload"].help),
    cpu_moe: bool = typer.Option(False, *_GPU["cpu_moe"].flags, help=_GPU["cpu_moe"].help),
    n_cpu_moe: int = typer.Option(0, *_GPU["n_cpu_moe"].flags, help=_GPU["n_cpu_moe"].help),
    measure: bool = typer.Option(
        False,
        "--measure",
        help="Also dry-run the load in llama.cpp and show what it allocates (local GGUF only).",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """Will this model fit? Weights, KV cache, compute buffers and overhead per device.

    Exit status: 0 fits (VRAM, part-offloaded or RAM), 2 does not fit (would swap), 1 error.
    """

    def settings(ctx: int) -> MemorySettings:
        # serve's own mapping from its settings, so the plan is what serve would allocate
        return replace(memory_settings(replace(cfg, ctx_size=ctx)), flash_attn=fa_on)

    try:
        cfg = EngineConfig(  # serve's settings: parsed and checked by their declarations
            model_path=Path(),
            cache_type_k=cache_type,
            cache_type_v=cache_type_v,
            flash_attn=flash_attn,
            parallel=parallel,
            batch_size=max(_SERVE.batch_size, ubatch),
            ubatch_size=ubatch,
            swa_full=swa_full,
            main_gpu=main_gpu,
            split_mode=parse_text(_GPU["split_mode"], split_mode),
            tensor_split=parse_text(_GPU["tensor_split"], tensor_split),
            kv_offload=kv_offload,
            cpu_moe=cpu_moe,
            n_cpu_moe=n_cpu_moe,
        ).validate()
        fa_on = flash_attn_enabled(flash_attn)
        hw = hardware_with_overrides(vram=vram, ram=ram)
        settings(DEFAULT_CTX).validate()
        # hub repos and folders of variants: the file `pull` would pick, planned with these flags
        machine = hub.Machine(hw, settings(ctx_size or DEFAULT_CTX), ctx_size, gpu_layers)
        ident = identify(target, machine)
    except (ModelFormatError, ValueError, OSError) as exc:
        fail(str(exc))
    spec = ident.spec
    if spec is None:
        fail(f"cannot plan memory for {target}: {ident.format} model without readable metadata")
    if not spec.n_vocab or not spec.n_layer:
        fail(f"{target}: the metadata lacks the vocabulary size or layer count needed to plan")
    fa_on = flash_attn_enabled(flash_attn, spec.architecture)

    header = int(spec.extra.get("header_bytes") or 0)
    variants = ident.variants if ident.kind == "hub" or len(ident.variants) > 1 else []

    def make(ctx: int, weights: int | None = None) -> MemoryPlan:
        return plan_memory(spec, settings(ctx), hw, gpu_layers=gpu_layers, weights_bytes=weights)

    try:
        if ctx_size is None:
            ctx, plan = _choose_ctx(spec, make)
        else:
            ctx, plan = ctx_size, make(ctx_size)
        rows = []
        for v in variants:
            vp = make(ctx, max(v.size - header, 0)) if v.name != ident.selected else plan
            rows.append((v, vp))
    except ValueError as exc:
        fail(str(exc))
    fitting = [(v, p) for v, p in rows if p.fits]
    best = max(fitting, key=lambda vp: vp[0].size)[0] if fitting else None

    measured = None
    if measure:
        measured = _measure(
            ident, ctx, cache_type, cache_type_v, fa_on, parallel, ubatch, swa_full, plan
        )

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


def _measure(
    ident: Identification,
    ctx: int,
    cache_type: str,
    cache_type_v: str | None,
    fa: bool,
    parallel: int,
    ubatch: int,
    swa_full: bool,
    plan: MemoryPlan,
) -> dict[str, int]:
    if ident.kind == "hub" or ident.format != "gguf":
        fail("--measure needs a local GGUF file (it loads the model in llama.cpp)")
    from innkeeper.models.measure import measure

    path = Path(ident.target)
    if path.is_dir():
        chosen = next(v for v in ident.variants if v.name == ident.selected)
        path = path / chosen.main_file
    try:
        m = measure(
            path,
            ctx,
            cache_type=cache_type,
            cache_type_v=cache_type_v,
            flash_attn=fa,
            gpu_layers=plan.gpu_layers,
            parallel=parallel,
            n_batch=max(512, ubatch),
            n_ubatch=ubatch,
            swa_full=swa_full,
            kv_unified=True,
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
    s = plan.settings
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
        f"[dim]context {ctx:,} ({plan.kv.n_ctx:,} cells), KV {s.cache_type_k}/{s.type_v}, "
        f"flash attention {'on' if s.flash_attn else 'off'}, {s.parallel} parallel; "
        f"{hw.source} hardware: {format_size(hw.ram_available_bytes)} RAM available, {gpus}[/]"
    )
    console.print(_plan_table(plan, measured))
    style = _VERDICT_STYLE[plan.verdict_code]
    layers = f" ({plan.gpu_layers}/{plan.n_layers} layers on GPU)" if hw.gpus else ""
    console.print(
        f"[bold {style}]{plan.verdict}[/]{layers}: {format_size(plan.total_bytes)} needed"
    )
    for note in plan.notes:
        console.print(f"[dim]· {note}[/]")
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
            st = _VERDICT_STYLE[p.verdict_code]
            t.add_row(
                mark,
                v.name,
                v.quantization or "?",
                format_size(v.size),
                format_size(p.total_bytes),
                f"{p.gpu_layers}/{p.n_layers}",
                f"[{st}]{p.verdict}[/]",
            )
        console.print(t)
        if best is not None:
            console.print(f"[green]★ {best.name}[/] is the largest that fits this machine.")
        else:
            console.print("[red]none of these fits this machine at this context.[/]")
