"""`innkeeper serve`: load a model and serve every API family on one port."""

from __future__ import annotations

import logging
from inspect import Parameter, Signature
from pathlib import Path
from typing import Annotated, Any

import typer

from innkeeper.cli.app import app, console, fail
from innkeeper.cli.help import PanelHelp
from innkeeper.cli.options import build_config, options
from innkeeper.models import hub, store
from innkeeper.models.hardware import hardware_with_overrides
from innkeeper.models.store import ModelNotFoundError, resolve_model
from innkeeper.settings import PANEL_MODEL, PANEL_NETWORK, ConfigError
from innkeeper.settings.engine import EngineConfig
from innkeeper.settings.server import ServerConfig

__all__ = ["build_config", "serve"]

# Options of `serve` that are not settings: the model argument and CLI conveniences.
_MODEL = Parameter(
    "model",
    Parameter.POSITIONAL_OR_KEYWORD,
    default=None,
    annotation=Annotated[
        str | None,
        typer.Argument(
            metavar="MODEL",
            help="a GGUF file, a store name (innkeeper models), or a hub model to pull first:"
            " owner/repo[:QUANT], owner/repo/file.gguf or its huggingface.co URL;"
            " default: the embedded SmolLM2",
            show_default=False,
        ),
    ],
)


def _key_file(name: str, flag: str, what: str) -> Parameter:
    option = typer.Option(
        flag, metavar="FILE", help=f"file with one {what} per line", rich_help_panel=PANEL_NETWORK
    )
    return Parameter(
        name, Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[Path | None, option]
    )


_AFTER = {
    "api_keys": _key_file("api_key_file", "--api-key-file", "key"),
    "admin_keys": _key_file("admin_key_file", "--admin-key-file", "admin key"),
}
_NO_PULL = Parameter(
    "no_pull",
    Parameter.KEYWORD_ONLY,
    default=False,
    annotation=Annotated[
        bool,
        typer.Option(
            "--no-pull",
            help="serve a hub model only if it is already in the store: never download",
            rich_help_panel=PANEL_MODEL,
        ),
    ],
)
_VERBOSE = Parameter(
    "verbose",
    Parameter.KEYWORD_ONLY,
    default=False,
    annotation=Annotated[
        bool,
        typer.Option("--verbose", "-v", help="show llama.cpp's log and each HTTP request"),
    ],
)

# typer's context, to tell flags given from defaults (a tuned profile fills only the latter)
_CONTEXT = Parameter("ctx", Parameter.KEYWORD_ONLY, default=None, annotation=typer.Context)


def serve(**values: Any) -> None:
    """Serve a GGUF model to SillyTavern, OpenAI and KoboldAI clients."""
    from innkeeper.cli.server import run_server

    verbose = bool(values.pop("verbose", False))
    no_pull = bool(values.pop("no_pull", False))
    ctx = values.pop("ctx", None)
    ref = values.pop("model", None)
    try:
        config = build_config(Path(), values)  # every flag checked before any download
    except ConfigError as exc:
        fail(str(exc))
    model_path = _model_path(ref, config, no_pull)
    from innkeeper.cli.profile_use import build_with_profile
    from innkeeper.engine.tune import build_id

    try:  # a tuned profile (`innkeeper tune`) fills the settings not given
        config, profile = build_with_profile(model_path, values, build_id, ctx)
    except ConfigError as exc:
        fail(str(exc))
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    run_server(config, verbose=verbose, console=console, profile=profile)


def _model_path(ref: str | None, config: ServerConfig, no_pull: bool) -> Path:
    """The file to serve: an existing path, a hub ref (from the store, else pulled), or a
    store or --models-dir name."""
    if ref and not Path(ref).expanduser().exists():
        parsed = hub_ref(ref)
        if parsed is not None:
            return _from_hub(parsed, config, no_pull)
    try:
        return resolve_model(ref)
    except ModelNotFoundError as exc:
        from innkeeper.serving.catalog import find_in_models_dirs

        found = find_in_models_dirs(ref, config.models_dirs) if ref else None
        if found is None:
            fail(str(exc))
        return found


def hub_ref(text: str) -> hub.HubRef | None:
    """The hub model `text` names (owner/repo[:QUANT], owner/repo/file.gguf, a hub URL);
    None for anything else. A missing file is not a repo: `dir/model.gguf`, or a file path
    whose folder exists here (`models/llama/typo.gguf`), fails as a file, not on the hub; a
    local folder named like the owner does not stop `owner/repo`."""
    try:
        parsed = hub.parse_ref(text)
    except hub.HubRefError:
        return None
    plain = parsed.quant is None and parsed.filename is None
    if plain and parsed.repo_id.lower().endswith(".gguf"):
        return None
    if parsed.filename and "://" not in text and Path(text).expanduser().parent.is_dir():
        return None
    return parsed


def _from_hub(ref: hub.HubRef, config: ServerConfig, no_pull: bool) -> Path:
    """`pull`'s own path (hub.resolve): the store's copy at once, with no network; else the
    same choice, progress bar, resume and hash check as `innkeeper pull`, said first."""
    root = store.models_dir()
    try:
        hardware = hardware_with_overrides(vram=config.plan_vram, ram=config.plan_ram)
        machine = hub.Machine.for_serve(hardware, config.engine.ctx_size or None)
        resolved = hub.resolve(
            ref,
            root,
            machine=machine,
            use_store=True,
            download=not no_pull,
            gguf_only=True,
            on_selected=lambda sel: console.print(
                f"pulling {hub.describe(sel)}", highlight=False, soft_wrap=True
            ),
        )
    except (hub.HubError, ModelNotFoundError, ValueError) as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"could not write to the store {root}: {exc}")
    except KeyboardInterrupt:
        fail("interrupted: run the same command again to resume the download", code=130)
    entry = resolved.entry
    if entry.format != "gguf":
        fail(f"{entry.name} is {entry.format} weights: innkeeper serves GGUF models")
    verb = "pulled, sha256 verified" if resolved.result is not None else "from the store"
    console.print(f"[green]✓[/] {entry.name} {verb}: {entry.path}", highlight=False, soft_wrap=True)
    return entry.path


# typer reads the options from the signature: generated from the settings' declarations.
serve.__signature__ = Signature(  # type: ignore[attr-defined]
    [_MODEL, _NO_PULL, *options(EngineConfig, ServerConfig, after=_AFTER), _VERBOSE, _CONTEXT]
)
app.command(cls=PanelHelp)(serve)
