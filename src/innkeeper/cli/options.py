"""CLI options generated from the settings' declarations: one generator for `serve` and `fit`.

Each declared setting (innkeeper/settings) becomes a typer option with its flags, help, panel
and metavar; `build_config` turns the options' values back into a checked ServerConfig. `serve`
takes every setting, `fit` those that change memory (`memory=True`), so the two cannot drift.
"""

from __future__ import annotations

from collections.abc import Callable
from inspect import Parameter
from pathlib import Path
from typing import Annotated, Any, get_args, get_type_hints

import typer

from innkeeper.cli.app import fail
from innkeeper.settings import (
    PANELS,
    Setting,
    expand_shorthands,
    parse_text,
    settings_of,
    shorthands_of,
)
from innkeeper.settings.engine import EngineConfig
from innkeeper.settings.server import ServerConfig


def _metavar(base: Any, spec: Setting) -> str:
    """The value's name in help: declared, else a few choices, else N or TEXT by type."""
    if spec.metavar:
        return spec.metavar
    if spec.choices and len(spec.choices) <= 3:
        return "|".join(spec.choices)
    return "N" if base in (int, float) else "TEXT"


def _help(spec: Setting, default: Any) -> str:
    """The declared help, with the default written one way: `(default: X)`."""
    if default in (None, ()) or isinstance(default, bool) or "default" in spec.help:
        return spec.help
    return f"{spec.help} (default: {default})"


def option(name: str, hint: Any, default: Any, spec: Setting) -> Parameter:
    """The typer option for one declared setting.

    Options default to None, meaning "the declared default" (written in the help), so a value
    the user gave can be told from one left alone (-ctk beats --cache-type only when given).
    Settings with a text parser take text; repeatable ones a list.
    """
    common: dict[str, Any] = {
        "help": _help(spec, default),
        "show_default": False,
        "rich_help_panel": spec.panel or None,
    }
    if isinstance(default, bool):
        flag = typer.Option(*spec.flags, metavar="", **common)
        annotation: Any = Annotated[bool, flag]
        return Parameter(name, Parameter.KEYWORD_ONLY, default=default, annotation=annotation)
    args = get_args(hint)
    base = next(a for a in args if a is not type(None)) if type(None) in args else hint
    if base == tuple[str, ...]:  # repeatable option
        cli_type: Any = list[str] | None
        base = str
    elif spec.parse is not None:
        cli_type = str | None
    else:
        cli_type = base | None
    opt = typer.Option(*spec.flags, metavar=_metavar(base, spec), **common)
    return Parameter(
        name, Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[cli_type, opt]
    )


def options(
    *classes: type,
    keep: Callable[[Setting], bool] = lambda spec: True,
    after: dict[str, Parameter] | None = None,
) -> list[Parameter]:
    """The options of every setting of `classes` that `keep` accepts, by help panel.

    A class's shorthands (`--cache-type`) come just before their first target; `after` puts
    a command's own option (`--api-key-file`) right after the setting named by its key.
    """
    out: list[tuple[int, Parameter]] = []

    def add(spec: Setting, param: Parameter) -> None:
        panel = PANELS.index(spec.panel) if spec.panel in PANELS else len(PANELS)
        out.append((panel, param))

    for cls in classes:
        hints = get_type_hints(cls)
        shorthands = {s.targets[0]: s for s in shorthands_of(cls) if keep(s.spec)}
        for f, spec in settings_of(cls):
            if not keep(spec):
                continue
            if f.name in shorthands:
                short = shorthands[f.name]
                add(short.spec, option(short.name, str | None, None, short.spec))
            add(spec, option(f.name, hints[f.name], f.default, spec))
            if after and f.name in after:
                add(spec, after[f.name])
    return [param for _, param in sorted(out, key=lambda item: item[0])]


def from_cli(cls: type, values: dict[str, Any], **fixed: Any) -> Any:
    """An instance of `cls` from CLI values (None: the declared default), text parsed."""
    kwargs = dict(fixed)
    values = expand_shorthands(cls, values)
    for f, spec in settings_of(cls):
        raw = values.get(f.name)
        if raw is None or (isinstance(raw, list) and not raw and f.default == ()):
            continue
        kwargs[f.name] = parse_text(spec, raw)
    return cls(**kwargs)


def read_keys(
    keys: list[str] | tuple[str, ...], key_file: Path | None, flag: str = "--api-key-file"
) -> tuple[str, ...]:
    """The keys given on the command line plus those of a key file (one a line, # comments)."""
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
    """ServerConfig from the options' values (any subset); ConfigError names the flag at fault."""
    values = dict(values)
    values["api_keys"] = read_keys(values.get("api_keys") or [], values.get("api_key_file"))
    values["admin_keys"] = read_keys(
        values.get("admin_keys") or [], values.get("admin_key_file"), "--admin-key-file"
    )
    engine = from_cli(EngineConfig, values, model_path=model_path)
    return from_cli(ServerConfig, values, engine=engine).validate()
