"""The memory plan against llama.cpp's own allocations (no_alloc dry runs of real shapes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from innkeeper.models.gguf_meta import read_gguf_spec
from innkeeper.models.hardware import GPU, Hardware
from innkeeper.models.measure import measure
from innkeeper.models.memory import (
    MemorySettings,
    auto_settings,
    default_ctx_candidates,
    kv_row_bytes,
    plan_for_files,
    plan_kv,
    plan_memory,
)
from innkeeper.models.store import default_model_path
from tests.models import gguf_factory as factory

MIB = 1024**2
GIB = 1024**3
BIG_CPU = Hardware(256 * GIB, 256 * GIB)


@pytest.fixture(scope="module")
def arch(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    files = factory.write_all(tmp_path_factory.mktemp("arch"))
    files["smollm2"] = default_model_path()
    return files


# (model, ctx, cache type, flash attention, parallel, swa_full): each a distinct llama.cpp path.
CASES = [
    ("smollm2", 4096, "f16", True, 1, True),
    ("smollm2", 2048, "f16", False, 1, True),
    ("llama3_8b", 8000, "f16", True, 1, True),  # 8000 -> 8192 cells (256 padding)
    ("llama3_8b", 8192, "q8_0", True, 1, True),
    ("llama3_8b", 4096, "f16", False, 1, True),
    ("mistral_7b", 8192, "q4_0", True, 4, True),  # 4 streams of 2048 cells
    ("gemma2_9b", 8192, "f16", True, 1, False),  # SWA layers: pad256(4096 + 512) = 4608 cells
    ("gemma2_9b", 4096, "f16", True, 1, True),  # library default: full-size SWA cache
    ("gemma3_4b", 16384, "q8_0", True, 1, False),  # 5 local : 1 global, window 1024
    ("gemma3_4b", 8192, "f16", True, 2, False),
    ("mixtral_tiny", 8192, "f16", False, 1, True),
    ("deepseek2_lite", 32768, "f16", True, 1, True),  # MLA: K-only 576-wide latent
    ("deepseek2_lite", 8000, "q8_0", True, 1, True),
]


@pytest.mark.parametrize(("model", "ctx", "cache", "fa", "par", "swa_full"), CASES)
def test_plan_matches_llama_cpp(
    arch: dict[str, Path], model: str, ctx: int, cache: str, fa: bool, par: int, swa_full: bool
) -> None:
    spec = read_gguf_spec(arch[model])
    s = MemorySettings(ctx, cache, None, fa, par, 512, 512, swa_full)
    plan = plan_memory(spec, s, BIG_CPU, gpu_layers=0)
    m = measure(arch[model], ctx, cache, fa, 0, par, 512, 512, swa_full)
    # KV: exact (llama.cpp logs MiB with two decimals, so compare at that resolution)
    assert abs(plan.kv.k_bytes - m.k_bytes) <= 0.005 * MIB + 1
    assert abs(plan.kv.v_bytes - m.v_bytes) <= 0.005 * MIB + 1
    assert plan.kv.cells in m.kv_cells
    if plan.kv.swa_cells is not None:
        assert plan.kv.swa_cells in m.kv_cells
    # weights: exact from the tensor table
    assert plan.weights_bytes == m.model_bytes
    # everything llama.cpp allocates: within 5% (compute is the one closed-form term)
    assert abs(plan.llama_bytes - m.total_bytes) / m.total_bytes < 0.05
    assert abs(plan.compute_bytes - m.compute_bytes) < 64 * MIB


def test_real_load_matches_dry_run() -> None:
    """The dry run reports what a real mmap load of the shipped model allocates."""
    dry = measure(default_model_path(), 2048, dry_run=True)
    real = measure(default_model_path(), 2048, dry_run=False)
    assert dry.kv_cache_bytes == real.kv_cache_bytes
    assert dry.compute_bytes == real.compute_bytes
    assert abs(sum(real.model_by_buffer.values()) - dry.model_bytes) < 2 * MIB


def test_kv_formula_by_hand() -> None:
    spec = read_gguf_spec(default_model_path())  # 30 layers, 3 KV heads x 64
    kv = plan_kv(spec, MemorySettings(1000, "f16"))
    assert kv.cells == 1024
    assert kv.total == 2 * 30 * 1024 * 3 * 64 * 2
    q8 = plan_kv(spec, MemorySettings(1000, "q8_0"))
    assert q8.total == 2 * 30 * 1024 * kv_row_bytes("q8_0", 192)
    assert kv_row_bytes("q8_0", 192) == 192 // 32 * 34
    assert kv_row_bytes("q4_0", 128) == 4 * 18


def test_quantized_v_needs_flash_attention() -> None:
    spec = read_gguf_spec(default_model_path())
    with pytest.raises(ValueError, match="flash attention"):
        plan_memory(spec, MemorySettings(2048, "q8_0", flash_attn=False), BIG_CPU)
    with pytest.raises(ValueError, match="unknown KV cache type"):
        plan_memory(spec, MemorySettings(2048, "q3"), BIG_CPU)


def test_gpu_layers_and_verdicts(arch: dict[str, Path]) -> None:
    spec = read_gguf_spec(arch["llama3_8b"])  # ~8 GiB of Q8_0
    s = MemorySettings(8192, "f16")
    big = Hardware(64 * GIB, 64 * GIB, (GPU(0, "big", 24 * GIB, 24 * GIB),), "override")
    full = plan_memory(spec, s, big)
    assert full.gpu_layers == 33 and full.verdict == "fits in VRAM"
    small = Hardware(64 * GIB, 64 * GIB, (GPU(0, "small", 6 * GIB, 6 * GIB),), "override")
    part = plan_memory(spec, s, small)
    assert 0 < part.gpu_layers < 33
    assert part.verdict == f"fits with {part.gpu_layers} layers offloaded"
    gpu = part.devices[1]
    assert gpu.total_bytes + gpu.margin_bytes <= 6 * GIB
    # one more layer would not fit
    more = plan_memory(spec, s, small, gpu_layers=part.gpu_layers + 1)
    assert more.verdict_code == "vram_oom"
    # the output layer is offloaded first: 1 GPU layer = output only
    one = plan_memory(spec, s, big, gpu_layers=1)
    assert one.devices[1].weights_bytes == spec.byte_groups().output
    cpu = plan_memory(spec, s, Hardware(16 * GIB, 16 * GIB))
    assert cpu.verdict == "fits in RAM" and cpu.gpu_layers == 0
    tiny = plan_memory(spec, s, Hardware(4 * GIB, 4 * GIB))
    assert tiny.verdict == "would swap"
    assert full.to_json()["total_bytes"] == full.total_bytes


def test_tied_output_gets_a_gpu_copy(arch: dict[str, Path]) -> None:
    spec = read_gguf_spec(arch["gemma2_9b"])
    big = Hardware(64 * GIB, 64 * GIB, (GPU(0, "big", 48 * GIB, 48 * GIB),), "override")
    plan = plan_memory(spec, MemorySettings(4096), big)
    groups = spec.byte_groups()
    assert plan.devices[1].weights_bytes == sum(groups.layers) + groups.output + groups.input
    assert plan.devices[0].weights_bytes == groups.input


def test_default_context_candidates() -> None:
    assert default_ctx_candidates(131072)[0] == 8192
    assert min(default_ctx_candidates(131072)) == 2048
    assert default_ctx_candidates(1024) == [1024]
    assert default_ctx_candidates(4096)[0] == 4096


def test_auto_settings(arch: dict[str, Path]) -> None:
    roomy = Hardware(64 * GIB, 64 * GIB, (GPU(0, "g", 24 * GIB, 24 * GIB),), "override")
    a = auto_settings(arch["llama3_8b"], None, "f16", True, None, 1, roomy)
    assert a.ctx_size == 8192 and a.gpu_layers == 33 and a.plan.verdict_code == "vram"
    # a GPU too small for 8k of KV on top of the weights: context shrinks, stays >= 2048
    snug = Hardware(
        64 * GIB, 64 * GIB, (GPU(0, "g", 9 * GIB + 512 * MIB, 9 * GIB + 512 * MIB),), "override"
    )
    b = auto_settings(arch["llama3_8b"], None, "f16", True, None, 1, snug)
    assert 2048 <= b.ctx_size < 8192 and b.plan.verdict_code == "vram"
    given = auto_settings(arch["llama3_8b"], 4000, "q8_0", True, 10, 1, roomy)
    assert given.ctx_size == 4000 and given.gpu_layers == 10
    cpu = auto_settings(
        default_model_path(), None, "f16", True, None, 2, Hardware(8 * GIB, 8 * GIB)
    )
    assert cpu.ctx_size == 8192 and cpu.gpu_layers == 0 and cpu.plan.verdict_code == "ram"


def test_plan_for_files_scales_weights(arch: dict[str, Path]) -> None:
    spec = read_gguf_spec(arch["llama3_8b"])
    hw = Hardware(16 * GIB, 16 * GIB)
    q8 = plan_for_files(spec, spec.file_bytes, 8192, "f16", True, hw)
    q4 = plan_for_files(spec, spec.file_bytes * 4.85 / 8.5, 8192, "f16", True, hw)
    assert q8.kv_cache_bytes == q4.kv_cache_bytes
    assert abs(q8.weights_bytes - spec.weight_bytes) < 64
    assert q4.weights_bytes < q8.weights_bytes
    assert q8.fits and q4.fits
    assert not plan_for_files(spec, 40 * GIB, 8192, "f16", True, hw).fits
    # no spec at all: a stand-in shape, still a sane plan
    blind = plan_for_files(None, 4 * GIB, 4096, "f16", False, hw)
    assert blind.kv_cache_bytes > 0 and blind.fits
    assert any("file size" in n for n in blind.notes)
