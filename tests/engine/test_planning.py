"""plan_settings: the plan is advice for settings it cannot place, but its bugs must surface."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from innkeeper.engine.planning import plan_settings
from innkeeper.models.hardware import GPU, Hardware
from innkeeper.models.spec import ModelFormatError
from innkeeper.models.store import default_model_path
from innkeeper.settings.engine import EngineConfig

GIB = 1024**3
ONE_GPU = Hardware(8 * GIB, 8 * GIB, (GPU(0, "g", 4 * GIB, 4 * GIB),), "override")


def test_plans_serves_defaults() -> None:
    auto = plan_settings(EngineConfig(model_path=default_model_path()), ONE_GPU)
    assert auto is not None and auto.ctx_size == 8192 and auto.plan.fits


def test_settings_the_plan_cannot_place_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    """--main-gpu 1 on a one-GPU machine: llama.cpp has the last word, the load goes on."""
    cfg = EngineConfig(model_path=default_model_path(), split_mode="none", main_gpu=1)
    with caplog.at_level(logging.WARNING, logger="innkeeper"):
        assert plan_settings(cfg, ONE_GPU) is None
    assert "memory plan unavailable" in caplog.text and "--main-gpu 1" in caplog.text


def test_a_file_that_is_no_model_raises(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model at all" * 10)
    with pytest.raises(ModelFormatError):
        plan_settings(EngineConfig(model_path=bad), ONE_GPU)


def test_a_bug_in_the_plan_surfaces() -> None:
    """Before, every exception became "no plan" (all layers on the GPU) without a trace."""
    broken = Hardware(8 * GIB, "8 GiB", ())  # type: ignore[arg-type]  # a caller's bug
    with pytest.raises(TypeError):
        plan_settings(EngineConfig(model_path=default_model_path()), broken)
