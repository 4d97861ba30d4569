"""`innkeeper models`: what is in the local store."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from innkeeper.cli.app import app, console
from innkeeper.models import hub, store


@app.command("models")
def models_command(
    json_out: bool = typer.Option(False, "--json", help="print the list as JSON"),
    models_dir: Path | None = typer.Option(
        None, "--models-dir", help="the store (default: $INNKEEPER_MODELS or ~/.local/share/…)"
    ),
) -> None:
    """List the store's models and the embedded default, by the name serve, inspect, fit take."""
    root = models_dir.expanduser() if models_dir is not None else store.models_dir()
    entries = store.list_models(root)
    embedded = store.embedded_entry()
    listed = [*entries, embedded] if embedded is not None else entries
    if json_out:
        typer.echo(json.dumps([e.to_json() for e in listed], indent=2))
        return
    if not entries:
        console.print(f"no models in {root}: fetch one with `innkeeper pull owner/name`")
    if not listed:
        return
    table = Table(title=str(root), title_justify="left")
    for column in ("name", "quant", "size", "format", "complete", "path"):
        table.add_column(column, overflow="fold")
    for e in listed:
        table.add_row(
            e.name + (" [dim](embedded, the default)[/]" if e.embedded else ""),
            e.quant or "-",
            hub.format_bytes(e.size),
            e.format,
            "yes" if e.complete else f"[red]no[/] ({len(e.missing)} missing)",
            str(e.path),
        )
    console.print(table)
