"""Hardware detection and the pretend-hardware flags."""

from __future__ import annotations

import pytest

from innkeeper.models.hardware import detect_hardware, format_size, hardware_with_overrides
from innkeeper.settings import parse_size


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("12GiB", 12 * 1024**3),
        ("12GB", 12 * 10**9),
        ("12G", 12 * 1024**3),
        ("12000MiB", 12000 * 1024**2),
        ("1.5 GiB", int(1.5 * 1024**3)),
        ("512m", 512 * 1024**2),
        ("4096", 4096),
        (2048, 2048),
    ],
)
def test_parse_size(text: str | int, expect: int) -> None:
    assert parse_size(text) == expect


@pytest.mark.parametrize("bad", ["", "lots", "12XB", "-3GiB", "1.2.3G"])
def test_parse_size_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)


def test_detect_degrades_quietly() -> None:
    hw = detect_hardware()  # this machine: no NVIDIA driver, so no GPU and no error
    assert hw.ram_total_bytes > 0 and 0 < hw.ram_available_bytes <= hw.ram_total_bytes
    assert isinstance(hw.gpus, tuple)


def test_overrides() -> None:
    hw = hardware_with_overrides(vram="24GiB,12GiB", ram="64GiB")
    assert hw.source == "override"
    assert [g.total_bytes for g in hw.gpus] == [24 * 1024**3, 12 * 1024**3]
    assert hw.ram_available_bytes == 64 * 1024**3
    assert hardware_with_overrides(vram="0").gpus == ()
    assert hw.to_json()["gpus"][1]["free_bytes"] == 12 * 1024**3


def test_format_size() -> None:
    assert format_size(512) == "512 B"
    assert format_size(4.58 * 1024**3) == "4.58 GiB"


def test_no_gpu_says_why_in_the_log(caplog: pytest.LogCaptureFixture) -> None:
    """NVML failures are logged, not swallowed: no driver at debug level."""
    import logging

    from innkeeper.models.hardware import detect_gpus

    with caplog.at_level(logging.DEBUG, logger="innkeeper.hardware"):
        gpus = detect_gpus()
    if not gpus:  # this machine has no NVIDIA driver (or no library): the reason is logged
        assert any("NVML" in r.message or "NVIDIA" in r.message for r in caplog.records)
