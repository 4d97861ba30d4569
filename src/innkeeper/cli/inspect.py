"""`innkeeper inspect PATH|REPO`: what a model file, folder or hub repo is."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from innkeeper.cli.app import app, console, fail
from innkeeper.models.hardware import format_size
from innkeeper.models.identify import Identification, identify
from innkeeper.models.spec import ModelFormatError, format_params


def render_identification(ident: Identification) -> None:
    """Print the identification as a rich table plus the lists that do not fit one."""
    d = ident.to_json()
    s = ident.spec
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold cyan", no_wrap=True)
    table.add_column()
    table.add_row("model", ident.target + (f"  [dim]({s.name})[/]" if s and s.name else ""))
    table.add_row(
        "format", f"{ident.format}  [dim]recognised by: {'; '.join(ident.recognized_by) or '-'}[/]"
    )
    bpw = f"  ({d['bits_per_weight']:.2f} bits/weight)" if d["bits_per_weight"] else ""
    table.add_row("quantization", f"{ident.quantization or '?'}{bpw}")
    if s:
        table.add_row(
            "architecture",
            s.architecture + (f", MoE {s.n_expert_used}/{s.n_expert} experts" if s.is_moe else ""),
        )
        table.add_row("parameters", format_params(s.parameters))
        kv = d["kv_heads"]
        kv_text = f"{min(kv)}-{max(kv)} (per layer)" if isinstance(kv, list) else str(kv)
        attn = f"{s.n_layer} layers, {s.n_head} heads, {kv_text} KV heads, head dim {s.head_dim_k}"
        if s.mla:
            attn += f" (MLA, latent KV rank {s.kv_lora_rank})"
        table.add_row("attention", attn)
        if s.sliding_window:
            table.add_row(
                "sliding window",
                f"{s.sliding_window} tokens on {d['swa_layers']} of {s.n_layer} layers",
            )
        ctx = f"{s.context_length:,} tokens" if s.context_length else "?"
        if s.rope_scaling:
            r = s.rope_scaling
            ctx += f"  (rope scaling {r.kind}" + (f" x{r.factor:g}" if r.factor else "")
            ctx += f" from {r.original_context:,})" if r.original_context else ")"
        table.add_row("trained context", ctx)
        table.add_row("vocabulary", f"{s.n_vocab:,} tokens")
        table.add_row("weights", format_size(s.weight_bytes))
        tpl = s.chat_template_name or (
            "custom (unrecognised)" if s.chat_template else "[yellow]none in the file[/]"
        )
        if not s.chat_template:
            fallback = d["chat_template_fallback"]
            tpl += (
                f", serve uses {fallback} (from the {s.architecture} architecture)"
                if fallback != "alpaca"
                else ", serve uses alpaca"
            ) + " unless --chat-template says otherwise"
        table.add_row("chat template", tpl)
    if ident.vision:
        v = ident.vision
        n = v.image_tokens if v.image_tokens is not None else "varies with the image"
        table.add_row("vision", f"yes (projector {v.path.name}, image tokens per image {n})")
    hints = ident.hints
    hint_bits = [
        f"quant {hints.quantization}" if hints.quantization else "",
        f"context {hints.context:,}" if hints.context else "",
        f"shard {hints.shard[0]} of {hints.shard[1]}" if hints.shard else "",
        f"{hints.bits:g} bits" if hints.bits else "",
    ]
    if any(hint_bits):
        table.add_row("name says", ", ".join(b for b in hint_bits if b))
    table.add_row(
        "complete",
        "[green]yes[/]" if ident.complete else "[red]no[/], missing: " + ", ".join(ident.missing),
    )
    safety = ident.safety
    if safety.safe:
        table.add_row("safety", f"[green]safe[/]  [dim]{safety.scanner}[/]")
    else:
        text = f"[bold red]{safety.verdict.upper()}[/]"
        if safety.dangerous_imports:
            text += " - imports " + ", ".join(safety.dangerous_imports)
        if safety.errors:
            text += "  [dim]" + "; ".join(safety.errors) + "[/]"
        table.add_row("safety", text)
    console.print(table)
    if len(ident.variants) > 1:
        vt = Table(title="variants", title_justify="left")
        vt.add_column("file")
        vt.add_column("quant")
        vt.add_column("size", justify="right")
        for v in ident.variants:
            mark = " [dim](inspected)[/]" if v.name == ident.selected else ""
            parts = f" [dim]({len(v.files)} parts)[/]" if len(v.files) > 1 else ""
            vt.add_row(v.name + parts + mark, v.quantization or "?", format_size(v.size))
        console.print(vt)
        if ident.choice:
            console.print(f"inspected {ident.selected_file}: {ident.choice}", highlight=False)
    for w in ident.warnings:
        console.print(f"[yellow]warning:[/] {w}")


@app.command("inspect")
def inspect_command(
    target: str = typer.Argument(
        ..., help="A model file, a model folder, or a hub repo id (owner/name[:QUANT])."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """What is this model? Format, quantization, architecture, context, template, safety."""
    try:
        ident = identify(target)
    except (ModelFormatError, ValueError, OSError) as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps(ident.to_json(), indent=2))
    else:
        render_identification(ident)
