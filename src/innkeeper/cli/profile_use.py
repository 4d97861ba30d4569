"""How `serve` uses a tuned profile: it fills the engine settings the user did not give.

`innkeeper tune` saves the fastest settings it measured for a model on this machine
(models/profiles.py). `serve` looks for that profile, checks it was made for this model file
and this hardware, and uses its values for every setting not given on the command line, so
explicit flags always win. The banner then says which settings came from the profile, or why
a stored profile was not used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from innkeeper.settings import ConfigError, shorthands_of
from innkeeper.settings.engine import EngineConfig


def given_on_command_line(ctx: typer.Context | None) -> set[str]:
    """The options the user typed (or set through the environment), by parameter name.

    Options' values cannot tell this alone: a flag such as `--kv-offload` has a value even
    when not given. A shorthand given (`--cache-type`) counts for each setting it sets.
    """
    if ctx is None:
        return set()
    given: set[str] = set()
    for p in ctx.command.params:
        source = ctx.get_parameter_source(p.name) if p.name else None
        if source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT"):
            given.add(str(p.name))
    for short in shorthands_of(EngineConfig):
        if short.name in given:
            given.update(short.targets)
    return given


def with_profile(
    model_path: Path, values: dict[str, Any], build: Any, ctx: typer.Context | None = None
) -> tuple[dict[str, Any], str | None]:
    """`values` with the matching profile's settings where not given, and the banner's note.

    `build` (called only when a profile file exists) describes the llama.cpp in use, for the
    hardware fingerprint. The note is None when there is no profile to speak of.
    """
    from innkeeper.engine.planning import ModelFileError, checked_model_file
    from innkeeper.engine.tune import flag_text
    from innkeeper.models.profiles import find_profile, profile_path

    try:  # profiles are per GGUF file (`tune` measures the file a folder holds)
        model_path = checked_model_file(model_path, allow_pickle=False)
    except ModelFileError:  # not a loadable GGUF: `serve` reports that itself
        return values, None
    if not profile_path(model_path).is_file():
        return values, None
    if not values.get("use_profile", True):
        return values, "not used (--no-profile)"
    match = find_profile(model_path, build())
    if match.profile is None:
        return values, f"not used: {match.reason}"
    given = given_on_command_line(ctx)
    used = {k: v for k, v in match.profile.settings.items() if k not in given}
    if not used:
        why = "serve's defaults are the fastest" if not match.profile.settings else "all overridden"
        return values, f"{why} ({match.path.name})"
    note = f"{flag_text(used)} ({match.path.name})"
    p = match.profile
    if values.get("ctx_size") not in (None, p.ctx_size) or values.get("parallel") not in (
        None,
        p.parallel,
    ):  # still used: the same machine, but the speeds were measured at other sizes
        note += f"; tuned at context {p.ctx_size}, {p.parallel} parallel"
    return {**values, **used}, note


def build_with_profile(
    model_path: Path, values: dict[str, Any], build: Any, ctx: typer.Context | None = None
) -> tuple[Any, str | None]:
    """The ServerConfig `serve` runs with and the banner's profile note.

    A profile whose values clash with the flags given (a quantized V cache given, flash
    attention off in the profile…) is dropped with the reason, never an error of its own.
    """
    from innkeeper.cli.options import build_config

    tuned, note = with_profile(model_path, values, build, ctx)
    if tuned is values:
        return build_config(model_path, values), note
    try:
        return build_config(model_path, tuned), note
    except ConfigError as exc:
        config = build_config(model_path, values)  # the user's own error, if any, is raised
        return config, f"not used: it conflicts with the flags given ({exc})"
