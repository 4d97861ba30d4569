"""HTTP load settings: what a client may give when it loads a model, from the declarations.

The settings declared `loadable=True` in EngineConfig (and its loadable shorthands, such as
`cache_type` for K and V) are the load settings, under their field names and their declared
`aliases` (the spellings of other servers: `n_ctx`, `n_gpu_layers`…). From the same
declarations come `parse_load_settings` (a client's JSON -> EngineConfig field values, checked
like the CLI's) and the fields and JSON schema of the API's `LoadSettings` body
(`load_fields`, `load_schema_rules`), so a new loadable setting is one flag on its declaration.

JSON types are taken strictly, as the schema states them: `true` is not a number, "4096" is
not one either, lists and objects are refused, NaN and infinities too. Two exceptions, each
from the declarations: a setting whose choices include on and off also takes `true`/`false`
(text-generation-webui sends `flash_attn: true`), and one with `words` takes those words in
place of a number (`gpu_layers: "all"`). A list setting (`rpc`) takes its CLI text
("a:1,b:2") or a JSON list of such texts; `[]` is "none" (over the server's own).
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal, get_args, get_origin, get_type_hints

from innkeeper.settings import (
    ConfigError,
    Setting,
    check_value,
    parse_text,
    settings_of,
    shorthands_of,
)
from innkeeper.settings.engine import QUANTIZED_CACHE_TYPES, EngineConfig


def _json_kind(hint: Any) -> type:
    """int, float, str or bool: the JSON scalar a field's type hint (`int | None`…) takes;
    list for a tuple of texts (`tuple[str, ...]`: `rpc`)."""
    if get_origin(hint) is tuple and get_args(hint) == (str, ...):
        return list
    args = [a for a in get_args(hint) if a is not type(None)] or [hint]
    if len(args) == 1 and args[0] in (int, float, str, bool):
        return args[0]  # type: ignore[no-any-return]
    raise TypeError(f"a loadable setting must hold one JSON scalar or texts, not {hint}")


def _loadable() -> dict[str, tuple[Setting, type]]:
    """Name -> (declaration, JSON kind) of each load setting: fields, then shorthands."""
    hints = get_type_hints(EngineConfig)
    out = {
        f.name: (spec, _json_kind(hints[f.name]))
        for f, spec in settings_of(EngineConfig)
        if spec.loadable
    }
    for short in shorthands_of(EngineConfig):
        if short.spec.loadable:
            out[short.name] = (short.spec, str)
    return out


LOADABLE = _loadable()
# The EngineConfig fields a load may set (what the registry reports a model's settings as).
LOAD_SETTINGS = tuple(name for name in LOADABLE if name in EngineConfig.__dataclass_fields__)
# Every key a client may send -> the load setting it names.
LOAD_NAMES: dict[str, str] = {
    **{name: name for name in LOADABLE},
    **{alias: name for name, (spec, _) in LOADABLE.items() for alias in spec.aliases},
}


def _shown(value: Any) -> str:
    """A client's value as JSON, cut short (hostile bodies may send megabytes)."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _on_off(spec: Setting) -> bool:
    return {"on", "off"} <= set(spec.choices)


def _number(label: str, value: Any, kind: type) -> int | float:
    """A JSON number of `kind`; integral floats count as integers (JSON Schema's rule)."""
    whole = "a whole number" if kind is int else "a number"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{label} must be {whole} (got {_shown(value)})")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ConfigError(f"{label} must be a finite number (got {_shown(value)})")
        if kind is int:
            if not value.is_integer():
                raise ConfigError(f"{label} must be {whole} (got {_shown(value)})")
            return int(value)
    return kind(value)  # type: ignore[no-any-return]


def _text(label: str, spec: Setting, value: Any) -> str:
    if isinstance(value, bool) and _on_off(spec):
        return "on" if value else "off"
    if not isinstance(value, str):
        raise ConfigError(f"{label} must be one of {', '.join(spec.choices)} (got {_shown(value)})")
    return str(parse_text(spec, value, label))


def _texts(label: str, spec: Setting, value: Any) -> tuple[str, ...]:
    """A list setting: its CLI text, or a list of such texts (each parsed as the CLI parses
    it, none twice); an empty list is none."""
    meta = spec.metavar or "text"
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
        raise ConfigError(f"{label} must be text ({meta}) or a list of texts (got {_shown(value)})")
    if not items:
        return ()
    out = tuple(parse_text(spec, tuple(items), label))
    if len(set(out)) != len(out):
        raise ConfigError(f"{label} names one twice (got {_shown(value)})")
    return out


def load_value(label: str, spec: Setting, kind: type, value: Any) -> Any:
    """One client value -> the EngineConfig value, checked; ConfigError names `label`."""
    if kind is list:
        return _texts(label, spec, value)
    if kind is str:
        out: Any = _text(label, spec, value)
    elif kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{label} must be true or false (got {_shown(value)})")
        out = value
    elif isinstance(value, str) and spec.words:
        if value.strip().lower() not in spec.words:
            words = ", ".join(spec.words)
            raise ConfigError(f"{label} must be a whole number or {words} (got {_shown(value)})")
        out = parse_text(spec, value, label)
    else:
        out = _number(label, value, kind)
        if spec.parse is not None:  # the declared text parser's meaning (-1 layers: all)
            out = parse_text(spec, str(out), label)
    check_value(spec, out, label)
    return out


def parse_load_settings(raw: dict[str, Any] | None, *, strict: bool) -> dict[str, Any]:
    """A client's load settings -> EngineConfig field values, checked as the CLI checks them.

    Takes the field names, their declared aliases and the shorthands (`cache_type`: K and V,
    each unless given itself). An unknown key is a ConfigError listing what is accepted (a
    typo must not load silently with the defaults), unless not `strict` (text-generation-webui
    clients send their loader's other arguments too: ignored). A null is "not given"; two
    spellings of one setting with different values are refused. Cross-field rules (a quantized
    V cache needs flash attention) are `EngineConfig.validate`'s, once merged with the rest.
    """
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"load settings must be a JSON object (got {_shown(raw)})")
    given: dict[str, tuple[str, Any]] = {}  # load setting -> (key sent, value)
    for key, value in raw.items():
        name = LOAD_NAMES.get(key)
        if name is None:
            if strict:
                raise ConfigError(f"unknown load setting {_shown(key)}: use {', '.join(LOADABLE)}")
            continue
        if value is None:
            continue
        spec, kind = LOADABLE[name]
        parsed = load_value(key, spec, kind, value)
        if name in given and given[name][1] != parsed:
            raise ConfigError(f"{given[name][0]} and {key} give {name} two different values")
        given[name] = (key, parsed)
    values = {name: value for name, (_, value) in given.items()}
    out = {k: v for k, v in values.items() if k in LOAD_SETTINGS}
    for short in shorthands_of(EngineConfig):
        if short.name in values:
            for target in short.targets:
                out.setdefault(target, values[short.name])
    return out


# ---- the API's LoadSettings body, from the same declarations ----------------------------------


def load_fields() -> dict[str, Any]:
    """Pydantic field definitions of the load settings (for `pydantic.create_model`).

    Each is optional (None: the entry's last settings, else the memory plan's), typed as
    `load_value` takes it, with the declared range and help as its schema.
    """
    from pydantic import Field

    fields: dict[str, Any] = {}
    for name, (spec, kind) in LOADABLE.items():
        annotation: Any
        if kind is list:
            annotation = str | list[str]
        elif kind is str:
            annotation = Literal[spec.choices]  # type: ignore[valid-type]
            if _on_off(spec):
                annotation = annotation | bool
        else:
            annotation = kind
            if spec.words:
                annotation = annotation | Literal[spec.words]  # type: ignore[valid-type]
        bounds = {"ge": spec.min, "le": spec.max} if kind in (int, float) and not spec.words else {}
        info = Field(None, description=_describe(spec, kind), **bounds)
        fields[name] = (annotation | None, info)
    return fields


def _describe(spec: Setting, kind: type) -> str:
    text = spec.help
    if kind is list:
        text += f": {spec.metavar or 'text'} as the CLI takes it, or a list; [] for none"
    if not spec.aliases:
        return text
    return f"{text} (text-generation-webui's args may call it {', '.join(spec.aliases)})"


def load_schema_rules() -> dict[str, Any]:
    """JSON Schema rules across fields, for the body's schema: the quantized-V rule
    (settings/engine.py's `check_v_cache`) for each key that sets the V cache."""
    shorthands = [s.name for s in shorthands_of(EngineConfig) if "cache_type_v" in s.targets]
    v_keys = [name for name in LOADABLE if name == "cache_type_v" or name in shorthands]
    return {
        "allOf": [
            {
                "not": {
                    "required": [key, "flash_attn"],
                    "properties": {
                        key: {"enum": list(QUANTIZED_CACHE_TYPES)},
                        "flash_attn": {"enum": ["off", False]},
                    },
                }
            }
            for key in v_keys
        ]
    }
