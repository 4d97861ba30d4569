"""One declaration per setting: its default, CLI flags, help text and checks live in one field.

`EngineConfig` (engine/config.py: what the model and its context are loaded with) and
`ServerConfig` (config.py: HTTP knobs, holding an `EngineConfig`) declare each field with
`setting(...)`. From those declarations `innkeeper serve` builds its options (cli/serve.py),
text values are parsed (`parse_text`) and every instance is checked (`check_fields`), so a new
setting is one field: no option, copy or check to add anywhere else.

This module is deliberately light (no llama.cpp, no numpy): the CLI and pure tools import it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A setting that cannot work; the CLI prints it as one error line."""


@dataclass(frozen=True)
class Setting:
    """What the CLI and the checks need to know about one config field."""

    flags: tuple[str, ...]  # CLI names, the long name first ("--mmap/--no-mmap" for on/off)
    help: str
    parse: Callable[[str], Any] | None = None  # text -> value; the CLI option is then text
    min: float | None = None
    max: float | None = None
    choices: tuple[str, ...] = ()
    what: str = ""  # noun for a bad choice ("cache type") instead of "--flag must be one of"

    @property
    def flag(self) -> str:
        """The long flag name, as error messages quote it."""
        return self.flags[0].split("/")[0]


def setting(
    default: Any,
    *flags: str,
    help: str,
    parse: Callable[[str], Any] | None = None,
    min: float | None = None,
    max: float | None = None,
    choices: tuple[str, ...] = (),
    what: str = "",
) -> Any:
    """A dataclass field carrying its `Setting` (repeatable options hold tuples: immutable)."""
    meta = {"setting": Setting(tuple(flags), help, parse, min, max, tuple(choices), what)}
    return dataclasses.field(default=default, metadata=meta)


def settings_of(cls: type) -> list[tuple[dataclasses.Field[Any], Setting]]:
    """The declared settings of a config class, in declaration order."""
    return [(f, f.metadata["setting"]) for f in dataclasses.fields(cls) if "setting" in f.metadata]


def parse_text(spec: Setting, value: Any) -> Any:
    """Apply the setting's text parser to a value given as text (or to each item of a list)."""
    if isinstance(value, list):  # a repeatable option: stored as an immutable tuple
        value = tuple(value)
    if spec.parse is None or value is None:
        return value
    if isinstance(value, tuple):
        return tuple(spec.parse(v) if isinstance(v, str) else v for v in value)
    return spec.parse(value) if isinstance(value, str) else value


def check_fields(obj: Any) -> None:
    """Raise ConfigError for the first field outside its declared range or choices."""
    for f, spec in settings_of(type(obj)):
        value = getattr(obj, f.name)
        if value is None or isinstance(value, bool):
            continue
        if spec.choices and value not in spec.choices:
            options = ", ".join(spec.choices)
            if spec.what:
                raise ConfigError(f"unknown {spec.what} {value!r} for {spec.flag}: use {options}")
            raise ConfigError(f"{spec.flag} must be one of {options} (got {value!r})")
        if not isinstance(value, (int, float)):
            continue
        lo, hi = spec.min, spec.max
        if lo is not None and hi is not None and not lo <= value <= hi:
            raise ConfigError(f"{spec.flag} must be between {lo:g} and {hi:g} (got {value})")
        if lo is not None and value < lo:
            raise ConfigError(f"{spec.flag} must be at least {lo:g} (got {value})")
        if hi is not None and value > hi:
            raise ConfigError(f"{spec.flag} must be at most {hi:g} (got {value})")


# ---- text parsers shared by several settings and by `fit` -------------------------------------


def parse_gpu_layers(text: str) -> int | None:
    """`auto` (None: the memory plan decides), `all`/`max`/negative (999), or a count."""
    value = text.strip().lower()
    if value in ("auto", ""):
        return None
    if value in ("all", "max"):
        return 999
    try:
        n = int(value)
    except ValueError:
        raise ConfigError(
            f"--gpu-layers must be a number, 'all' or 'auto' (got {text!r})"
        ) from None
    return 999 if n < 0 else n


def parse_tensor_split(text: str) -> tuple[float, ...]:
    """`3,1` or `0.75/0.25` -> proportions per GPU, as llama-server's --tensor-split takes them."""
    parts = [p for p in text.replace("/", ",").split(",") if p.strip()]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if not values or any(v < 0 or v != v for v in values) or sum(values) <= 0:
        raise ConfigError(
            "--tensor-split takes a share per GPU, numbers separated by commas such as 3,1 "
            f"(got {text!r})"
        )
    return values


def lower(text: str) -> str:
    return text.strip().lower()
