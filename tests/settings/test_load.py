"""HTTP load settings from the declarations: strict JSON types, ranges, names and aliases."""

from __future__ import annotations

from typing import Any

import pytest

from innkeeper.settings import ConfigError
from innkeeper.settings.engine import CACHE_TYPE_NAMES, QUANTIZED_CACHE_TYPES, EngineConfig
from innkeeper.settings.load import LOAD_NAMES, LOAD_SETTINGS, parse_load_settings


def test_names_and_aliases_as_the_registry_took_them() -> None:
    assert set(LOAD_SETTINGS) == {
        "ctx_size",
        "gpu_layers",
        "cache_type_k",
        "cache_type_v",
        "flash_attn",
        "parallel",
        "rpc",
    }
    for alias, name in {
        "n_ctx": "ctx_size",
        "max_seq_len": "ctx_size",
        "ctx-size": "ctx_size",
        "n_gpu_layers": "gpu_layers",
        "ngl": "gpu_layers",
        "gpu-layers": "gpu_layers",
        "flash-attn": "flash_attn",
        "n_parallel": "parallel",
        "np": "parallel",
        "cache_type": "cache_type",
    }.items():
        assert LOAD_NAMES[alias] == name


def test_values_parse_as_the_cli_parses_them() -> None:
    assert parse_load_settings(
        {"n_ctx": 2048, "n_gpu_layers": -1, "cache_type": "q8_0"}, strict=True
    ) == {"ctx_size": 2048, "gpu_layers": 999, "cache_type_k": "q8_0", "cache_type_v": "q8_0"}
    assert parse_load_settings({"flash_attn": True, "gpu_layers": "all"}, strict=True) == {
        "flash_attn": "on",
        "gpu_layers": 999,
    }
    assert parse_load_settings({"flash_attn": False, "ngl": "AUTO"}, strict=True) == {
        "flash_attn": "off",
        "gpu_layers": None,  # auto: the plan decides, even over serve's -ngl
    }
    # cache_type sets K and V unless each is given itself, in any order
    assert parse_load_settings({"cache_type_v": "f16", "cache_type": "Q4_0"}, strict=True) == {
        "cache_type_k": "q4_0",
        "cache_type_v": "f16",
    }
    # more layers than any model has: all (llama.cpp's int32 must not wrap)
    assert parse_load_settings({"gpu_layers": 1e300}, strict=True) == {"gpu_layers": 999}
    # JSON Schema's integers: 4096.0 is 4096; null is "not given"
    assert parse_load_settings({"ctx_size": 4096.0, "parallel": None}, strict=True) == {
        "ctx_size": 4096
    }
    assert parse_load_settings(None, strict=True) == {}


def test_rpc_takes_the_cli_text_or_a_list() -> None:
    assert parse_load_settings({"rpc": " 127.0.0.1:50052 , h:7"}, strict=True) == {
        "rpc": ("127.0.0.1:50052", "h:7")
    }
    assert parse_load_settings({"rpc": ["a:1", "b:2,c:3"]}, strict=True) == {
        "rpc": ("a:1", "b:2", "c:3")
    }
    assert parse_load_settings({"rpc": []}, strict=True) == {"rpc": ()}  # none
    assert parse_load_settings({"rpc": ("a:1",)}, strict=True) == {"rpc": ("a:1",)}  # a reload


def test_unknown_keys_refused_when_strict_ignored_otherwise() -> None:
    with pytest.raises(ConfigError, match='unknown load setting "ctx"') as err:
        parse_load_settings({"ctx": 1}, strict=True)
    assert "ctx_size" in str(err.value)  # says what is accepted
    assert parse_load_settings({"loader": "llama.cpp", "n_ctx": 512}, strict=False) == {
        "ctx_size": 512
    }


NAN = float("nan")
INF = float("inf")


@pytest.mark.parametrize(
    "raw",
    [
        {"n_ctx": True},
        {"ctx_size": False},
        {"parallel": False},
        {"parallel": True},
        {"n_ctx": [1]},
        {"n_ctx": {"a": 1}},
        {"parallel": [1, 2]},
        {"n_gpu_layers": {"x": 1}},
        {"gpu_layers": [10]},
        {"gpu_layers": True},
        {"n_ctx": NAN},
        {"n_ctx": INF},
        {"parallel": -INF},
        {"gpu_layers": NAN},
        {"n_ctx": 4096.5},
        {"n_ctx": "4096"},
        {"parallel": "2"},
        {"gpu_layers": "lots"},
        {"gpu_layers": "12"},
        {"flash_attn": 1},
        {"flash_attn": "maybe"},
        {"flash_attn": ["on"]},
        {"cache_type_k": 8},
        {"cache_type_v": "q3"},
        {"cache_type": True},
        {"cache_type": {"k": "q8_0"}},
        {"n_ctx": 8},
        {"ctx_size": 2**40},
        {"parallel": 0},
        {"np": 65},
        {"rpc": True},
        {"rpc": [1, 2]},
        {"rpc": {"host": "a", "port": 1}},
        {"rpc": 50052},
        {"rpc": "http://x:1"},
        {"rpc": "h:0"},
        {"rpc": "h:65536"},
        {"rpc": ":5"},
        {"rpc": ""},
        {"rpc": "a:1,a:1"},
        {"rpc": ["a:1", "a:1"]},
        {"rpc": ["a:1", None]},
        {"rpc": "[::1]:5"},
    ],
)
def test_wrong_values_name_the_setting(raw: dict[str, Any]) -> None:
    """Each is a ConfigError (HTTP 400) that names what the client sent, never a 500."""
    [key] = raw
    with pytest.raises(ConfigError) as err:
        parse_load_settings(raw, strict=True)
    assert key in str(err.value), str(err.value)
    with pytest.raises(ConfigError):  # not strict ignores unknown keys, not wrong values
        parse_load_settings(raw, strict=False)


def test_ranges_come_from_the_declarations() -> None:
    from innkeeper.settings import settings_of

    specs = {f.name: spec for f, spec in settings_of(EngineConfig)}
    low, high = int(specs["parallel"].min or 0), int(specs["parallel"].max or 0)
    assert parse_load_settings({"parallel": low}, strict=True) == {"parallel": low}
    assert parse_load_settings({"parallel": high}, strict=True) == {"parallel": high}
    with pytest.raises(ConfigError, match="parallel must be between 1 and 64"):
        parse_load_settings({"parallel": high + 1}, strict=True)
    with pytest.raises(ConfigError, match="n_ctx must be between 64"):
        parse_load_settings({"n_ctx": 63}, strict=True)


def test_two_spellings_must_agree() -> None:
    assert parse_load_settings({"n_ctx": 1024, "ctx_size": 1024}, strict=True) == {"ctx_size": 1024}
    with pytest.raises(ConfigError, match="n_ctx and ctx_size"):
        parse_load_settings({"n_ctx": 1024, "ctx_size": 2048}, strict=True)


def test_not_an_object() -> None:
    with pytest.raises(ConfigError, match="JSON object"):
        parse_load_settings([("n_ctx", 1)], strict=True)  # type: ignore[arg-type]


def test_hostile_values_are_shown_short() -> None:
    with pytest.raises(ConfigError) as err:
        parse_load_settings({"n_ctx": "x" * 100_000}, strict=True)
    assert len(str(err.value)) < 200


# ---- the API body: the same declarations as pydantic fields and JSON schema -------------------


def test_load_settings_body_is_generated() -> None:
    from innkeeper.api.model_routes import LlamaLoadBody, LoadSettings
    from innkeeper.settings.load import LOADABLE

    schema = LoadSettings.model_json_schema()
    assert set(schema["properties"]) == set(LOADABLE)
    assert schema["additionalProperties"] is False
    ctx = next(s for s in schema["properties"]["ctx_size"]["anyOf"] if s.get("type") == "integer")
    assert (ctx["minimum"], ctx["maximum"]) == (64, 2**20)
    par = next(s for s in schema["properties"]["parallel"]["anyOf"] if s.get("type") == "integer")
    assert (par["minimum"], par["maximum"]) == (1, 64)
    cache = next(s for s in schema["properties"]["cache_type"]["anyOf"] if "enum" in s)
    assert cache["enum"] == list(CACHE_TYPE_NAMES)
    # llama.cpp's rule, in the schema: no quantized V (V itself, or both) with flash attention off
    rules = [r["not"] for r in schema["allOf"]]
    assert {r["required"][0] for r in rules} == {"cache_type_v", "cache_type"}
    for r in rules:
        assert r["properties"][r["required"][0]]["enum"] == list(QUANTIZED_CACHE_TYPES)
        assert r["properties"]["flash_attn"]["enum"] == ["off", False]
    # the body validates JSON types strictly, and gives what parse_load_settings takes
    body = LoadSettings.model_validate({"ctx_size": 1024, "flash_attn": True, "gpu_layers": "all"})
    assert parse_load_settings(body.given(), strict=True) == {
        "ctx_size": 1024,
        "flash_attn": "on",
        "gpu_layers": 999,
    }
    for bad in ({"ctx_size": True}, {"parallel": 65}, {"n_ctx": 1}, {"cache_type": "q3"}):
        with pytest.raises(ValueError):
            LoadSettings.model_validate(bad)
    assert LlamaLoadBody.model_validate({"model": "m", "parallel": 2}).parallel == 2
