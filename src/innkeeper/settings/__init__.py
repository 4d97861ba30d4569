"""One declaration per setting: its default, CLI flags, help, checks and where it shows up.

`EngineConfig` (settings/engine.py: what the model and its context are loaded with) and
`ServerConfig` (settings/server.py: HTTP knobs, holding an `EngineConfig`) declare each field
with `setting(...)`. From those declarations `innkeeper serve` and `innkeeper fit` build their
options (cli/options.py), HTTP clients' load settings are parsed and described
(settings/load.py), the memory plan reads the same values (models/memory), text values are
parsed (`parse_text`) and every instance is checked (`check_fields`). A new setting is one
field: no option, copy or check to add anywhere else.

This package is deliberately light (no llama.cpp, no numpy, no pydantic here): the CLI, the
memory plan and pure tools import it, and it imports nothing else of innkeeper.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """A setting that cannot work; the CLI prints it as one error line, HTTP answers 400."""


# The help panels of `serve`, in the order they are shown.
PANEL_MODEL = "Model"
PANEL_MEMORY = "Memory & GPU"
PANEL_PERFORMANCE = "Performance"
PANEL_NETWORK = "Network & security"
PANEL_RUNTIME = "Models at runtime"
PANELS = (PANEL_MODEL, PANEL_MEMORY, PANEL_PERFORMANCE, PANEL_NETWORK, PANEL_RUNTIME)


@dataclass(frozen=True)
class Setting:
    """What the CLI, HTTP loads, the plan and the checks need to know about one config field."""

    flags: tuple[str, ...]  # CLI names, the long name first ("--mmap/--no-mmap" for on/off)
    help: str
    parse: Callable[[str], Any] | None = None  # text -> value; the CLI option is then text
    min: float | None = None
    max: float | None = None
    choices: tuple[str, ...] = ()
    what: str = ""  # noun for a bad choice ("cache type") instead of "--flag must be one of"
    panel: str = ""  # the `serve --help` panel it is listed in (PANELS)
    metavar: str = ""  # the value's name in help (N, SIZE, FILE…; default: from its type)
    words: tuple[str, ...] = ()  # text taken in place of a number (gpu layers: auto, all…)
    memory: bool = False  # changes what the model needs in memory: `fit` takes it too
    loadable: bool = False  # HTTP clients may give it when they load a model
    aliases: tuple[str, ...] = ()  # other servers' names for it in HTTP load settings

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
    panel: str = "",
    metavar: str = "",
    words: tuple[str, ...] = (),
    memory: bool = False,
    loadable: bool = False,
    aliases: tuple[str, ...] = (),
) -> Any:
    """A dataclass field carrying its `Setting` (repeatable options hold tuples: immutable)."""
    if aliases and not loadable:
        raise TypeError(f"{flags[0]}: HTTP aliases for a setting that is not loadable")
    spec = Setting(
        tuple(flags),
        help,
        parse,
        min,
        max,
        tuple(choices),
        what,
        panel,
        metavar,
        tuple(words),
        memory,
        loadable,
        tuple(aliases),
    )
    return dataclasses.field(default=default, metadata={"setting": spec})


@dataclass(frozen=True)
class Shorthand:
    """One option that sets several settings, each unless it is given itself.

    `--cache-type q8_0` (HTTP `cache_type`) sets K and V; `-ctv f16` beside it still wins for V.
    A config class lists its shorthands in a `SHORTHANDS` class attribute.
    """

    name: str
    targets: tuple[str, ...]
    spec: Setting


def settings_of(cls: type) -> list[tuple[dataclasses.Field[Any], Setting]]:
    """The declared settings of a config class, in declaration order."""
    return [(f, f.metadata["setting"]) for f in dataclasses.fields(cls) if "setting" in f.metadata]


def shorthands_of(cls: type) -> tuple[Shorthand, ...]:
    """The shorthand options a config class declares (see `Shorthand`)."""
    return tuple(getattr(cls, "SHORTHANDS", ()))


def expand_shorthands(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """`values` with each given shorthand replaced by its targets (those not given themselves)."""
    out = dict(values)
    for short in shorthands_of(cls):
        value = out.pop(short.name, None)
        if value is None:
            continue
        for target in short.targets:
            if out.get(target) is None:
                out[target] = value
    return out


def parse_text(spec: Setting, value: Any, name: str | None = None) -> Any:
    """Apply the setting's text parser to a value given as text (or to each item of a list).

    A parser's error comes back as a ConfigError that starts with the setting's name (`name`,
    else its flag), so a shared parser such as `parse_size` needs not know who called it.
    """
    if isinstance(value, list):  # a repeatable option: stored as an immutable tuple
        value = tuple(value)
    if spec.parse is None or value is None:
        return value
    try:
        if isinstance(value, tuple):  # a parser may split one item (`--rpc a:1,b:2`)
            items = [spec.parse(v) if isinstance(v, str) else v for v in value]
            return tuple(x for i in items for x in (i if isinstance(i, tuple) else (i,)))
        return spec.parse(value) if isinstance(value, str) else value
    except ValueError as exc:
        raise ConfigError(f"{name or spec.flag}: {exc}") from None


def check_value(spec: Setting, value: Any, name: str | None = None) -> None:
    """Raise ConfigError when `value` is outside the setting's declared choices or range."""
    label = name or spec.flag
    if value is None or isinstance(value, bool):
        return
    if spec.choices and value not in spec.choices:
        options = ", ".join(spec.choices)
        if spec.what:
            raise ConfigError(f"unknown {spec.what} {value!r} for {label}: use {options}")
        raise ConfigError(f"{label} must be one of {options} (got {value!r})")
    if not isinstance(value, (int, float)):
        return
    lo, hi = spec.min, spec.max
    if lo is not None and hi is not None and not lo <= value <= hi:
        raise ConfigError(f"{label} must be between {lo:g} and {hi:g} (got {value})")
    if lo is not None and value < lo:
        raise ConfigError(f"{label} must be at least {lo:g} (got {value})")
    if hi is not None and value > hi:
        raise ConfigError(f"{label} must be at most {hi:g} (got {value})")


def check_fields(obj: Any) -> None:
    """Raise ConfigError for the first field outside its declared range or choices."""
    for f, spec in settings_of(type(obj)):
        check_value(spec, getattr(obj, f.name))


# ---- text parsers shared by several settings -------------------------------------------------
# They raise ValueError without naming the setting: `parse_text` puts its name in front.

GPU_LAYER_WORDS = ("auto", "all", "max")
ALL_LAYERS = 999  # llama.cpp's "every layer" (-ngl 999): more than any model has


def parse_gpu_layers(text: str) -> int | None:
    """`auto` (None: the memory plan decides), `all`/`max`/negative/huge (999), or a count."""
    value = text.strip().lower()
    if value in ("auto", ""):
        return None
    if value in ("all", "max"):
        return ALL_LAYERS
    try:
        n = int(value)
    except ValueError:
        raise ConfigError(f"must be a number, 'all' or 'auto' (got {text!r})") from None
    return ALL_LAYERS if n < 0 or n > ALL_LAYERS else n


def parse_tensor_split(text: str) -> tuple[float, ...]:
    """`3,1` or `0.75/0.25` -> proportions per GPU, as llama-server's --tensor-split takes them."""
    parts = [p for p in text.replace("/", ",").split(",") if p.strip()]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if not values or any(v < 0 or v != v for v in values) or sum(values) <= 0:
        raise ConfigError(
            f"takes a share per GPU, numbers separated by commas such as 3,1 (got {text!r})"
        )
    return values


_HOST_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$")


def parse_endpoint(text: str) -> str:
    """`HOST:PORT` of an RPC worker, as ggml's RPC client parses it: a host name or IPv4
    address (no scheme, no path, no IPv6) and a port from 1 to 65535."""
    value = text.strip()
    host, sep, port = value.rpartition(":")
    if "://" in value or "/" in value:
        raise ConfigError(f"takes HOST:PORT, not a URL (got {text!r}): e.g. 192.168.1.20:50052")
    if not sep or not host:
        raise ConfigError(f"takes HOST:PORT, e.g. 127.0.0.1:50052 (got {text!r})")
    if not _HOST_RE.match(host):
        raise ConfigError(f"{host!r} is not a host name or IPv4 address (in {text!r})")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ConfigError(f"the port must be a number from 1 to 65535 (got {text!r})")
    return f"{host}:{int(port)}"


def parse_endpoints(text: str) -> tuple[str, ...]:
    """`HOST:PORT[,HOST:PORT…]` -> the endpoints, each checked, none twice."""
    parts = [p for p in text.split(",") if p.strip()]
    if not parts:
        raise ConfigError(f"takes HOST:PORT[,HOST:PORT…] (got {text!r})")
    endpoints = tuple(parse_endpoint(p) for p in parts)
    if len(set(endpoints)) != len(endpoints):
        raise ConfigError(f"names a worker twice (got {text!r})")
    return endpoints


def lower(text: str) -> str:
    return text.strip().lower()


# Sizes, the one reading for every option that takes one (--max-body, --ram, --vram, fit's):
# IEC units are binary (KiB, MiB, GiB, TiB), SI units decimal (kB/KB, MB, GB, TB), as disk
# vendors and the standards mean them; a bare K, M, G or T is binary, as `free -h`, `ls -h`
# and most people typing "32M" mean it. Case does not matter; a plain number is bytes.
_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kib": 1024,
    "kb": 1000,
    "m": 1024**2,
    "mib": 1024**2,
    "mb": 1000**2,
    "g": 1024**3,
    "gib": 1024**3,
    "gb": 1000**3,
    "t": 1024**4,
    "tib": 1024**4,
    "tb": 1000**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str | int | float) -> int:
    """`12GiB`, `12GB`, `12G`, `512K`, `1.5 GiB` or a plain byte count -> bytes (see above)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text < 0 or not math.isfinite(text):
            raise ConfigError(f"a size must be a finite number of bytes, not {text}")
        return int(text)
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ConfigError(f"not a size: {text!r} (try 12GiB, 12GB, 12G or 12000MiB)")
    unit = m.group(2).lower()
    if unit not in _SIZE_UNITS:
        raise ConfigError(
            f"unknown size unit {m.group(2)!r} in {text!r} (use B, K, KiB, KB, M, MiB, MB, G…)"
        )
    return int(float(m.group(1)) * _SIZE_UNITS[unit])
