"""`innkeeper pull`: fetch a model from the hub into the local store."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import typer

from innkeeper.cli.app import app, console, err_console, fail
from innkeeper.models import hub, store
from innkeeper.models.hardware import hardware_with_overrides


@app.command()
def pull(
    ref: str = typer.Argument(
        ...,
        help="owner/name, owner/name:QUANT (e.g. Q6_K) or owner/name/file.gguf",
        show_default=False,
    ),
    quant: str | None = typer.Option(
        None,
        "--quant",
        "-q",
        help=f"GGUF quantization to pull (default: the largest that fits, else {hub.DEFAULT_QUANT})",
    ),
    ctx_size: int | None = typer.Option(
        None,
        "--ctx-size",
        "-c",
        min=256,
        help="context the model must fit with, for the choice (default: serve's smallest, 2048)",
    ),
    ram: str | None = typer.Option(None, "--ram", help="pretend this much RAM (e.g. 32GiB)"),
    vram: str | None = typer.Option(None, "--vram", help="pretend this much VRAM (e.g. 12GiB)"),
    json_out: bool = typer.Option(False, "--json", help="print the result as JSON"),
    models_dir: Path | None = typer.Option(
        None, "--models-dir", help="the store (default: $INNKEEPER_MODELS or ~/.local/share/…)"
    ),
) -> None:
    """Download a model from the Hugging Face hub into the local store (resumable, verified).

    Gated repos need HF_TOKEN; HF_ENDPOINT points at a mirror.
    """
    try:
        parsed = hub.parse_ref(ref)
    except hub.HubRefError as exc:
        fail(str(exc))
    if quant and parsed.quant and quant.lower() != parsed.quant.lower():
        fail(f"two quantizations asked for: {parsed.quant} in the name and {quant} in --quant")
    wanted = quant or parsed.quant
    root = models_dir.expanduser() if models_dir is not None else store.models_dir()
    say = err_console if json_out else console
    try:
        hardware = hardware_with_overrides(vram=vram, ram=ram)
    except ValueError as exc:
        fail(str(exc))

    def on_selected(sel: hub.Selection) -> None:
        if wanted is None and parsed.filename is None and sel.format == "gguf":
            say.print(f"chose {sel.variant}: {sel.reason}", highlight=False)
        say.print(
            f"pulling {sel.repo_id} [bold]{sel.variant}[/] ({len(sel.files)} file(s),"
            f" {hub.format_bytes(sel.size)}) into {root}",
            highlight=False,
        )

    def on_file(n: int, total: int, f: hub.RepoFile) -> None:
        if not json_out:
            say.print(f"[{n}/{total}] {f.path} ({hub.format_bytes(f.size)})", highlight=False)

    try:
        machine = hub.Machine.for_serve(hardware, ctx_size)
        resolved = hub.resolve(
            dataclasses.replace(parsed, quant=wanted),
            root,
            machine=machine,
            on_selected=on_selected,
            progress=not json_out,
            on_file=on_file,
        )
    except (hub.HubError, ValueError) as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"could not write to the store {root}: {exc}")
    except KeyboardInterrupt:
        fail("interrupted: run the same pull again to resume", code=130)
    result = resolved.result
    assert result is not None  # pull always asks the hub
    entry = result.entry
    if json_out:
        out = {
            **entry.to_json(),
            "downloaded_bytes": result.downloaded_bytes,
            "resumed_from_bytes": result.resumed_from_bytes,
            "reused_files": result.reused_files,
        }
        typer.echo(json.dumps(out, indent=2))
        return
    verb = "already in the store" if result.downloaded_bytes == 0 else "pulled, sha256 verified"
    console.print(
        f"[green]✓[/] {entry.name} ({hub.format_bytes(entry.size)}) {verb}: {entry.path}",
        highlight=False,
    )
    if entry.format == "gguf":
        hint = f"INNKEEPER_MODELS={root} " if models_dir is not None else ""
        console.print(f"  serve it with: {hint}innkeeper serve {entry.name}", highlight=False)
    else:
        console.print(
            f"  {entry.format} weights are not served directly (innkeeper serves GGUF);"
            f" inspect them with: innkeeper inspect {entry.path}",
            highlight=False,
        )
