"""The declarations' machinery: sizes read one way, one cache-type table, one quantized-V rule."""

from __future__ import annotations

from pathlib import Path

import pytest

from innkeeper.settings import ConfigError, parse_size
from innkeeper.settings.engine import (
    CACHE_TYPES,
    QUANTIZED_CACHE_TYPES,
    EngineConfig,
    check_v_cache,
)
from innkeeper.settings.server import ServerConfig

KIB, MIB, GIB, TIB = 1024, 1024**2, 1024**3, 1024**4


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("512", 512),
        ("512B", 512),
        ("512K", 512 * KIB),
        ("512k", 512 * KIB),
        ("512KiB", 512 * KIB),
        ("512KB", 512_000),
        ("32M", 32 * MIB),
        ("32m", 32 * MIB),
        ("32MiB", 32 * MIB),
        ("32mib", 32 * MIB),
        ("32MB", 32_000_000),
        ("32mb", 32_000_000),
        ("12G", 12 * GIB),
        ("12GiB", 12 * GIB),
        ("12GB", 12_000_000_000),
        ("1.5 GiB", int(1.5 * GIB)),
        ("1T", TIB),
        ("1TB", 10**12),
        (" 2g ", 2 * GIB),
        (2048, 2048),
    ],
)
def test_one_reading_of_sizes(text: str | int, expect: int) -> None:
    """IEC units and bare letters are binary, SI units decimal: for every option."""
    assert parse_size(text) == expect


@pytest.mark.parametrize("bad", ["", "lots", "12XB", "-3GiB", "1.2.3G", "12 G B", float("nan")])
def test_not_sizes(bad: str | float) -> None:
    with pytest.raises(ConfigError):
        parse_size(bad)


def test_max_body_ram_and_vram_read_sizes_alike() -> None:
    from innkeeper.cli.options import build_config

    cfg = build_config(Path(), {"max_body": "32MB", "plan_ram": "8GB", "plan_vram": "1MB,2G"})
    assert cfg.max_body == 32_000_000
    assert cfg.plan_ram == "8GB" and cfg.plan_vram == "1MB,2G"
    from innkeeper.models.hardware import hardware_with_overrides

    hw = hardware_with_overrides(vram=cfg.plan_vram, ram=cfg.plan_ram)
    assert hw.ram_total_bytes == 8_000_000_000
    assert [g.total_bytes for g in hw.gpus] == [1_000_000, 2 * GIB]
    with pytest.raises(ConfigError, match="--max-body: not a size"):
        build_config(Path(), {"max_body": "lots"})
    with pytest.raises(ConfigError, match="--vram: unknown size unit"):
        build_config(Path(), {"plan_vram": "12GiB,3XB"})
    assert ServerConfig(engine=EngineConfig(model_path=Path())).max_body == 32 * MIB


def test_cache_type_table_matches_ggml() -> None:
    """The one table's ggml type ids are llama.cpp's (the engine hands them to it)."""
    import llama_cpp

    for name, t in CACHE_TYPES.items():
        const = getattr(llama_cpp, f"GGML_TYPE_{name.upper()}", None)
        if const is not None:  # the binding has no BF16 constant: 30 in ggml.h
            assert t.ggml_type == const, name
    assert CACHE_TYPES["bf16"].ggml_type == 30
    assert QUANTIZED_CACHE_TYPES == ("q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")


@pytest.mark.parametrize("cache_v", ["f32", "f16", "bf16", *QUANTIZED_CACHE_TYPES])
@pytest.mark.parametrize("flash_attn", ["auto", "on", "off"])
def test_quantized_v_rule(cache_v: str, flash_attn: str) -> None:
    cfg = EngineConfig(model_path=Path(), cache_type_v=cache_v, flash_attn=flash_attn)
    if cache_v in QUANTIZED_CACHE_TYPES and flash_attn == "off":
        with pytest.raises(ConfigError, match="needs flash attention"):
            cfg.validate()
        with pytest.raises(ConfigError, match="needs flash attention"):
            check_v_cache(cache_v, False)
    else:
        assert cfg.validate() is cfg
