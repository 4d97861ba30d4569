"""`innkeeper serve`: load a model and serve every API family on one port."""

from __future__ import annotations

import logging
from inspect import Parameter, Signature
from pathlib import Path
from typing import Annotated, Any, get_args, get_type_hints

import typer

from innkeeper.cli.app import app, console, fail
from innkeeper.config import ConfigError, EngineConfig, ServerConfig
from innkeeper.models.store import ModelNotFoundError, resolve_model
from innkeeper.settings import Setting, parse_text, settings_of

# Options of `serve` that are not settings: the model argument and CLI conveniences.
_MODEL = Parameter(
    "model",
    Parameter.POSITIONAL_OR_KEYWORD,
    default=None,
    annotation=Annotated[
        str | None,
        typer.Argument(
            help="a GGUF file, or a store name (innkeeper models); default: the embedded SmolLM2"
        ),
    ],
)
_EXTRA_BEFORE: dict[str, Parameter] = {
    "cache_type_k": Parameter(
        "cache_type",
        Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[
            str | None,
            typer.Option("--cache-type", help="KV cache type for K and V: f16, q8_0, q4_0…"),
        ],
    ),
}
_EXTRA_AFTER: dict[str, Parameter] = {
    "api_keys": Parameter(
        "api_key_file",
        Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[
            Path | None,
            typer.Option("--api-key-file", help="file with one key per line"),
        ],
    ),
    "admin_keys": Parameter(
        "admin_key_file",
        Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[
            Path | None,
            typer.Option("--admin-key-file", help="file with one admin key per line"),
        ],
    ),
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


def _cli_parameter(name: str, hint: Any, default: Any, spec: Setting) -> Parameter:
    """The typer option for one declared setting.

    Options default to None, meaning "the declared default" (shown in the help), so a value
    the user gave can be told from one left alone (-ctk beats --cache-type only when given).
    Settings with a text parser take text; repeatable ones a list.
    """
    help_text = spec.help
    if isinstance(default, bool):
        return Parameter(
            name,
            Parameter.KEYWORD_ONLY,
            default=default,
            annotation=Annotated[bool, typer.Option(*spec.flags, help=help_text)],
        )
    if default not in (None, ()) and "default" not in help_text:
        help_text += f" (default: {default})"
    args = get_args(hint)
    base = next(a for a in args if a is not type(None)) if type(None) in args else hint
    if base == tuple[str, ...]:  # repeatable option
        cli_type: Any = list[str] | None
    elif spec.parse is not None:
        cli_type = str | None
    else:
        cli_type = base | None
    return Parameter(
        name,
        Parameter.KEYWORD_ONLY,
        default=None,
        annotation=Annotated[cli_type, typer.Option(*spec.flags, help=help_text)],
    )


def _parameters(cls: type) -> list[Parameter]:
    hints = get_type_hints(cls)
    out: list[Parameter] = []
    for f, spec in settings_of(cls):
        if f.name in _EXTRA_BEFORE:
            out.append(_EXTRA_BEFORE[f.name])
        out.append(_cli_parameter(f.name, hints[f.name], f.default, spec))
        if f.name in _EXTRA_AFTER:
            out.append(_EXTRA_AFTER[f.name])
    return out


def _from_cli(cls: type, values: dict[str, Any], **fixed: Any) -> Any:
    """An instance of `cls` from CLI values (None: the declared default), text parsed."""
    kwargs = dict(fixed)
    for f, spec in settings_of(cls):
        raw = values.get(f.name)
        if raw is None or (isinstance(raw, list) and not raw and f.default == ()):
            continue
        kwargs[f.name] = parse_text(spec, raw)
    return cls(**kwargs)


def _read_keys(
    keys: list[str] | tuple[str, ...], key_file: Path | None, flag: str = "--api-key-file"
) -> tuple[str, ...]:
    out = [k.strip() for k in keys if k.strip()]
    if key_file is not None:
        try:
            text = key_file.read_text(encoding="utf-8")
        except OSError as exc:
            fail(f"cannot read {flag} {key_file}: {exc.strerror}")
        out += [
            line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")
        ]
    return tuple(out)


def build_config(model_path: Path, values: dict[str, Any]) -> ServerConfig:
    """ServerConfig from `serve`'s option values; ConfigError names the flag at fault."""
    values = dict(values)
    if values.get("cache_type") is not None:
        for key in ("cache_type_k", "cache_type_v"):
            if values.get(key) is None:
                values[key] = values["cache_type"]
    values["api_keys"] = _read_keys(values.get("api_keys") or [], values.get("api_key_file"))
    values["admin_keys"] = _read_keys(
        values.get("admin_keys") or [], values.get("admin_key_file"), "--admin-key-file"
    )
    engine = _from_cli(EngineConfig, values, model_path=model_path)
    return _from_cli(ServerConfig, values, engine=engine).validate()


def serve(**values: Any) -> None:
    """Serve a GGUF model to SillyTavern, OpenAI and KoboldAI clients."""
    from innkeeper.cli.server import run_server

    verbose = bool(values.pop("verbose", False))
    ref = values.pop("model", None)
    try:
        model_path = resolve_model(ref)
    except ModelNotFoundError as exc:
        from innkeeper.serving.catalog import find_in_models_dirs

        found = find_in_models_dirs(ref, values.get("models_dirs") or []) if ref else None
        if found is None:
            fail(str(exc))
        model_path = found
    try:
        config = build_config(model_path, values)
    except ConfigError as exc:
        fail(str(exc))
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    run_server(config, verbose=verbose, console=console)


# typer reads the options from the signature: generated from the settings' declarations.
_params = _parameters(ServerConfig)
_split = next(i for i, p in enumerate(_params) if p.name == "port") + 1
serve.__signature__ = Signature(  # type: ignore[attr-defined]
    [_MODEL, *_params[:_split], *_parameters(EngineConfig), *_params[_split:], _VERBOSE]
)
app.command()(serve)
