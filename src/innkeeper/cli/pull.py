"""`innkeeper pull`: fetch a model from the hub into the local store."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from innkeeper.cli.app import app, console, err_console, fail
from innkeeper.models import hub, store
from innkeeper.models.hardware import format_size, hardware_with_overrides
from innkeeper.models.spec import ModelSpec


def fit_check(
    listing: hub.RepoListing, ctx_size: int, ram: str | None, vram: str | None
) -> tuple[hub.FitCheck, str]:
    """A predicate `weights bytes -> fits this machine?`, and a line saying what it compared.

    Uses the memory plan: weights + KV cache (f16) + compute buffers for `ctx_size`, placed
    on the GPUs and in RAM. The architecture comes from the largest GGUF's header, read by
    range requests (no weights); it is the same for every quantization, only the weight bytes
    change. An unreadable header leaves the plan to estimate the shape from the file size.
    """
    from innkeeper.models.memory import plan_for_files

    try:
        hw = hardware_with_overrides(vram=vram, ram=ram)
    except ValueError as exc:
        raise hub.HubError(str(exc)) from exc
    spec = _remote_spec(listing)

    def fits(nbytes: int) -> bool:
        return plan_for_files(spec, nbytes, ctx_size, "f16", False, hw).fits

    where = f"{format_size(hw.ram_available_bytes)} RAM"
    if hw.gpus:
        where += f" + {format_size(sum(g.free_bytes for g in hw.gpus))} VRAM"
    how = f"memory plan for --ctx-size {ctx_size} on {where}"
    return fits, how if spec is not None else how + ", model shape estimated from size"


def _remote_spec(listing: hub.RepoListing) -> ModelSpec | None:
    """The spec of the repo's largest complete GGUF, from its header alone; None if unreadable."""
    from innkeeper.models.gguf_meta import read_source_spec
    from innkeeper.models.sources import HubSource

    variants = [v for v in hub.gguf_variants(listing) if not v.missing_shards]
    if not variants:
        return None
    first = variants[0].files[0]
    try:
        src = HubSource(listing.repo_id, first.path, revision=listing.revision, size=first.size)
        return read_source_spec(src)
    except Exception:  # a hostile or odd header must not stop the pull: the plan estimates
        return None


@app.command()
def pull(
    ref: str = typer.Argument(
        ...,
        help="owner/name, owner/name:QUANT (e.g. Q6_K) or owner/name/file.gguf",
        show_default=False,
    ),
    quant: str | None = typer.Option(
        None, "--quant", "-q", help="GGUF quantization to pull (default: largest that fits)"
    ),
    ctx_size: int = typer.Option(
        4096, "--ctx-size", "-c", min=256, help="context the model must fit with, for the choice"
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
        listing = hub.list_repo(parsed.repo_id, parsed.revision)
        fits = None
        if wanted is None and parsed.filename is None and hub.gguf_variants(listing):
            fits, how = fit_check(listing, ctx_size, ram, vram)
            say.print(f"choosing the largest quantization that fits ({how})", highlight=False)
        sel = hub.choose_files(listing, quant=wanted, filename=parsed.filename, fits=fits)
        say.print(
            f"pulling {sel.repo_id} [bold]{sel.variant}[/] ({len(sel.files)} file(s),"
            f" {hub.format_bytes(sel.size)}) into {root}",
            highlight=False,
        )

        def on_file(n: int, total: int, f: hub.HubFile) -> None:
            if not json_out:
                say.print(f"[{n}/{total}] {f.path} ({hub.format_bytes(f.size)})", highlight=False)

        result = hub.pull(sel, root, progress=not json_out, on_file=on_file)
    except (hub.HubError, ValueError) as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"could not write to the store {root}: {exc}")
    except KeyboardInterrupt:
        fail("interrupted: run the same pull again to resume", code=130)
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
