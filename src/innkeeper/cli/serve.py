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
from innkeeper.models.store import ModelNotFoundError, resolve_model
from innkeeper.settings import PANEL_NETWORK, ConfigError
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
            help="a GGUF file, or a store name (innkeeper models); default: the embedded SmolLM2",
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
    ctx = values.pop("ctx", None)
    ref = values.pop("model", None)
    try:
        model_path = resolve_model(ref)
    except ModelNotFoundError as exc:
        from innkeeper.serving.catalog import find_in_models_dirs

        found = find_in_models_dirs(ref, values.get("models_dirs") or []) if ref else None
        if found is None:
            fail(str(exc))
        model_path = found
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


# typer reads the options from the signature: generated from the settings' declarations.
serve.__signature__ = Signature(  # type: ignore[attr-defined]
    [_MODEL, *options(EngineConfig, ServerConfig, after=_AFTER), _VERBOSE, _CONTEXT]
)
app.command(cls=PanelHelp)(serve)
