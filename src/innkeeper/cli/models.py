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
    if listed:
        console.print(_table(listed, root))
    if not entries:
        # The embedded model is always there, so an empty store is a hint, not "no models".
        console.print(
            f"the store {root} is empty: `innkeeper pull owner/name` downloads a model into it",
            soft_wrap=True,
            highlight=False,
        )


def _table(listed: list[store.StoreEntry], root: Path) -> Table:
    """One row per model: the name to use, quantization, size, format, completeness, path."""
    table = Table(title=f"the store {root}, and the embedded default", title_justify="left")
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
    return table
