"""`innkeeper models`: what is in the local store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
    tuned = _tuned(listed)
    if json_out:
        out = [{**e.to_json(), "tuned": tuned.get(e.path)} for e in listed]
        typer.echo(json.dumps(out, indent=2))
        return
    if listed:
        console.print(_table(listed, root, tuned))
    if not entries:
        # The embedded model is always there, so an empty store is a hint, not "no models".
        console.print(
            f"the store {root} is empty: `innkeeper pull owner/name` downloads a model into it",
            soft_wrap=True,
            highlight=False,
        )


def _tuned(listed: list[store.StoreEntry]) -> dict[Path, dict[str, Any]]:
    """Each model's tuned profile (`innkeeper tune`): used here, or why not; none: absent."""
    from innkeeper.models.profiles import find_profile, profile_path

    found = [e for e in listed if e.path.is_file() and profile_path(e.path).is_file()]
    if not found:
        return {}
    from innkeeper.engine.tune import build_id  # loads llama.cpp: only when there are profiles

    build = build_id()
    out: dict[Path, dict[str, Any]] = {}
    for e in found:
        match = find_profile(e.path, build)
        used = match.profile is not None
        out[e.path] = {
            "used": used,
            "reason": match.reason,
            "path": str(match.path),
            "settings": match.profile.settings if match.profile else None,
        }
    return out


def _tuned_cell(tuned: dict[str, Any] | None) -> str:
    if tuned is None:
        return "-"
    return "yes" if tuned["used"] else "[yellow]not here[/]"


def _table(listed: list[store.StoreEntry], root: Path, tuned: dict[Path, dict[str, Any]]) -> Table:
    """One row per model: the name to use, quantization, size, format, completeness, whether
    `innkeeper tune` made a profile for it on this machine, path."""
    table = Table(title=f"the store {root}, and the embedded default", title_justify="left")
    for column in ("name", "quant", "size", "format", "complete", "tuned", "path"):
        table.add_column(column, overflow="fold")
    for e in listed:
        table.add_row(
            e.name + (" [dim](embedded, the default)[/]" if e.embedded else ""),
            e.quant or "-",
            hub.format_bytes(e.size),
            e.format,
            "yes" if e.complete else f"[red]no[/] ({len(e.missing)} missing)",
            _tuned_cell(tuned.get(e.path)),
            str(e.path),
        )
    return table
