"""The memory plan against llama.cpp's own allocations (no_alloc dry runs of real shapes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from innkeeper.engine.measure import measure
from innkeeper.models.gguf_meta import read_gguf_spec
from innkeeper.models.hardware import GPU, Hardware
from innkeeper.models.memory import (
    MemorySettings,
    Verdict,
    auto_settings,
    default_ctx_candidates,
    kv_row_bytes,
    plan_for_files,
    plan_kv,
    plan_memory,
)
from innkeeper.models.store import default_model_path
from innkeeper.settings import ConfigError
from innkeeper.settings.engine import EngineConfig
from tests.models import gguf_factory as factory

MIB = 1024**2
GIB = 1024**3
BIG_CPU = Hardware(256 * GIB, 256 * GIB)


def ms(
    ctx: int,
    cache: str = "f16",
    *,
    cache_type_v: str | None = None,
    fa: bool = True,
    parallel: int = 1,
    unified: bool = False,
    **engine: object,
) -> MemorySettings:
    """Settings as llama.cpp's library runs by default (one sequence, a cache per sequence,
    batches of 512), which its dry runs measure; `cache` is K's type and V's unless given."""
    cfg = EngineConfig(
        model_path=Path(),
        cache_type_k=cache,
        cache_type_v=cache_type_v or cache,
        flash_attn="on" if fa else "off",
        parallel=parallel,
        batch_size=512,
        **engine,  # type: ignore[arg-type]
    )
    return MemorySettings(cfg, ctx, kv_unified=unified)


def engine(path: Path, **settings: object) -> EngineConfig:
    """serve's settings for `path`, with one slot unless given."""
    return EngineConfig(model_path=path, **{"parallel": 1, **settings})  # type: ignore[arg-type]


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
    s = ms(ctx, cache, fa=fa, parallel=par, swa_full=swa_full)
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
    kv = plan_kv(spec, ms(1000, "f16"))
    assert kv.cells == 1024
    assert kv.total == 2 * 30 * 1024 * 3 * 64 * 2
    q8 = plan_kv(spec, ms(1000, "q8_0"))
    assert q8.total == 2 * 30 * 1024 * kv_row_bytes("q8_0", 192)
    assert kv_row_bytes("q8_0", 192) == 192 // 32 * 34
    assert kv_row_bytes("q4_0", 128) == 4 * 18


def test_quantized_v_needs_flash_attention() -> None:
    spec = read_gguf_spec(default_model_path())
    with pytest.raises(ConfigError, match="flash attention"):
        plan_memory(spec, ms(2048, "q8_0", fa=False), BIG_CPU)
    with pytest.raises(ConfigError, match="unknown cache type 'q3'"):
        plan_memory(spec, ms(2048, "q3"), BIG_CPU)
    # an f16 V is fine without flash attention, whatever K is
    assert plan_memory(spec, ms(2048, "q8_0", cache_type_v="f16", fa=False), BIG_CPU).fits
    # Grok: llama.cpp turns flash attention off, so `auto` with a quantized V cannot run
    grok = spec.with_updates(architecture="grok")
    auto = MemorySettings(EngineConfig(model_path=Path(), cache_type_v="q8_0"), 2048)
    with pytest.raises(ConfigError, match="flash attention"):
        plan_memory(grok, auto, BIG_CPU)
    assert plan_memory(spec, auto, BIG_CPU).kv.flash_attn  # elsewhere `auto` plans as on


def test_gpu_layers_and_verdicts(arch: dict[str, Path]) -> None:
    spec = read_gguf_spec(arch["llama3_8b"])  # ~8 GiB of Q8_0
    s = ms(8192, "f16")
    big = Hardware(64 * GIB, 64 * GIB, (GPU(0, "big", 24 * GIB, 24 * GIB),), "override")
    full = plan_memory(spec, s, big)
    assert full.gpu_layers == 33 and full.verdict is Verdict.VRAM
    assert full.verdict_text == "fits in VRAM"
    small = Hardware(64 * GIB, 64 * GIB, (GPU(0, "small", 6 * GIB, 6 * GIB),), "override")
    part = plan_memory(spec, s, small)
    assert 0 < part.gpu_layers < 33
    assert part.verdict_text == f"fits with {part.gpu_layers} layers offloaded"
    gpu = part.devices[1]
    assert gpu.total_bytes + gpu.margin_bytes <= 6 * GIB
    # one more layer would not fit
    more = plan_memory(spec, s, small, gpu_layers=part.gpu_layers + 1)
    assert more.verdict is Verdict.VRAM_OOM
    # the output layer is offloaded first: 1 GPU layer = output only
    one = plan_memory(spec, s, big, gpu_layers=1)
    assert one.devices[1].weights_bytes == spec.byte_groups().output
    cpu = plan_memory(spec, s, Hardware(16 * GIB, 16 * GIB))
    assert cpu.verdict is Verdict.RAM and cpu.gpu_layers == 0
    tiny = plan_memory(spec, s, Hardware(4 * GIB, 4 * GIB))
    assert tiny.verdict is Verdict.SWAP and tiny.verdict_text == "would swap"
    assert full.to_json()["total_bytes"] == full.total_bytes


def test_tied_output_gets_a_gpu_copy(arch: dict[str, Path]) -> None:
    spec = read_gguf_spec(arch["gemma2_9b"])
    big = Hardware(64 * GIB, 64 * GIB, (GPU(0, "big", 48 * GIB, 48 * GIB),), "override")
    plan = plan_memory(spec, ms(4096), big)
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
    a = auto_settings(engine(arch["llama3_8b"]), roomy)
    assert a.ctx_size == 8192 and a.gpu_layers == 33 and a.plan.verdict is Verdict.VRAM
    # a GPU too small for 8k of KV on top of the weights: context shrinks, stays >= 2048
    snug = Hardware(
        64 * GIB, 64 * GIB, (GPU(0, "g", 9 * GIB + 512 * MIB, 9 * GIB + 512 * MIB),), "override"
    )
    b = auto_settings(engine(arch["llama3_8b"]), snug)
    assert 2048 <= b.ctx_size < 8192 and b.plan.verdict is Verdict.VRAM
    q8 = {"cache_type_k": "q8_0", "cache_type_v": "q8_0"}
    given = auto_settings(engine(arch["llama3_8b"], ctx_size=4000, gpu_layers=10, **q8), roomy)
    assert given.ctx_size == 4000 and given.gpu_layers == 10
    cpu = auto_settings(engine(default_model_path(), parallel=2), Hardware(8 * GIB, 8 * GIB))
    assert cpu.ctx_size == 8192 and cpu.gpu_layers == 0 and cpu.plan.verdict is Verdict.RAM


def test_plan_for_files_scales_weights(arch: dict[str, Path]) -> None:
    spec = read_gguf_spec(arch["llama3_8b"])
    hw = Hardware(16 * GIB, 16 * GIB)
    q8 = plan_for_files(spec, spec.file_bytes, ms(8192), hw)
    q4 = plan_for_files(spec, int(spec.file_bytes * 4.85 / 8.5), ms(8192), hw)
    assert q8.kv_cache_bytes == q4.kv_cache_bytes
    assert abs(q8.weights_bytes - spec.weight_bytes) < 64
    assert q4.weights_bytes < q8.weights_bytes
    assert q8.fits and q4.fits
    assert not plan_for_files(spec, 40 * GIB, ms(8192), hw).fits
    # no spec at all: a stand-in shape, still a sane plan
    blind = plan_for_files(None, 4 * GIB, ms(4096, fa=False), hw)
    assert blind.kv_cache_bytes > 0 and blind.fits
    assert any("file size" in n for n in blind.notes)


# ---- serve's GPU flags in the plan -----------------------------------------------------------

TWO_GPUS = Hardware(
    128 * GIB, 128 * GIB, (GPU(0, "a", 24 * GIB, 24 * GIB), GPU(1, "b", 12 * GIB, 12 * GIB))
)


def test_cpu_moe_moves_expert_bytes_to_ram(arch: dict[str, Path]) -> None:
    spec = read_gguf_spec(arch["mixtral_tiny"])
    hw = Hardware(64 * GIB, 64 * GIB, (GPU(0, "g", 24 * GIB, 24 * GIB),), "override")
    base = plan_memory(spec, ms(4096), hw, gpu_layers=99)
    moe = plan_memory(spec, ms(4096, cpu_moe=True), hw, gpu_layers=99)
    experts = sum(
        t.n_bytes for t in spec.tensors if "_exps." in t.name and t.name.startswith("blk.")
    )
    assert experts > 0.5 * spec.weight_bytes  # Mixtral-style: experts are most of the model
    assert base.devices[1].weights_bytes - moe.devices[1].weights_bytes == experts
    assert moe.devices[0].weights_bytes - base.devices[0].weights_bytes == experts
    assert moe.weights_bytes == base.weights_bytes  # moved, not added
    assert moe.devices[0].compute_bytes > base.devices[0].compute_bytes  # experts run on CPU
    assert any("MoE experts kept in RAM" in n for n in moe.notes)
    # --n-cpu-moe 3: only the first three layers' experts
    three = plan_memory(spec, ms(4096, n_cpu_moe=3), hw, gpu_layers=99)
    per_layer = experts // spec.n_layer
    assert three.devices[0].weights_bytes - base.devices[0].weights_bytes == 3 * per_layer
    # a card too small for the whole model fits every layer once the experts stay in RAM
    small = Hardware(64 * GIB, 64 * GIB, (GPU(0, "g", 1200 * MIB, 1200 * MIB),), "override")
    assert plan_memory(spec, ms(4096), small).gpu_layers < 9
    assert plan_memory(spec, ms(4096, cpu_moe=True), small).gpu_layers == 9


def test_no_kv_offload_keeps_kv_in_ram(arch: dict[str, Path]) -> None:
    spec = read_gguf_spec(arch["llama3_8b"])
    hw = Hardware(64 * GIB, 64 * GIB, (GPU(0, "g", 24 * GIB, 24 * GIB),), "override")
    on = plan_memory(spec, ms(8192), hw, gpu_layers=33)
    off = plan_memory(spec, ms(8192, kv_offload=False), hw, gpu_layers=33)
    assert on.devices[1].kv_cache_bytes == on.kv_cache_bytes
    assert off.devices[1].kv_cache_bytes == 0
    assert off.devices[0].kv_cache_bytes == on.kv_cache_bytes
    assert off.devices[1].weights_bytes == on.devices[1].weights_bytes


def test_tensor_split_and_split_mode(arch: dict[str, Path]) -> None:
    spec = read_gguf_spec(arch["llama3_8b"])  # 32 layers + output = 33 offloadable
    free = plan_memory(spec, ms(4096), TWO_GPUS, gpu_layers=33)
    assert [d.layers for d in free.devices[1:]] == [22, 11]  # 24:12 GiB free, as llama.cpp
    even = plan_memory(spec, ms(4096, tensor_split=(1, 1)), TWO_GPUS, gpu_layers=33)
    assert [d.layers for d in even.devices[1:]] == [17, 16]
    three_one = ms(4096, tensor_split=(3, 1))
    assert [d.layers for d in plan_memory(spec, three_one, TWO_GPUS, 33).devices[1:]] == [25, 8]
    # the output layer (and the compute buffer) sit on the last GPU used
    assert even.devices[2].compute_bytes > 0 and even.devices[1].compute_bytes == 0
    only_b = plan_memory(spec, ms(4096, split_mode="none", main_gpu=1), TWO_GPUS, gpu_layers=33)
    assert [d.layers for d in only_b.devices[1:]] == [0, 33]
    assert only_b.devices[1].total_bytes == 0
    with pytest.raises(ConfigError, match="main-gpu"):
        plan_memory(spec, ms(4096, split_mode="none", main_gpu=2), TWO_GPUS, 33)


def test_auto_settings_takes_every_memory_setting(arch: dict[str, Path]) -> None:
    """serve feeds the plan from its config: the V cache type and GPU flags count too."""
    roomy = Hardware(64 * GIB, 64 * GIB, (GPU(0, "g", 24 * GIB, 24 * GIB),), "override")
    f16 = auto_settings(engine(arch["llama3_8b"], ctx_size=8192), roomy)
    q8v = auto_settings(engine(arch["llama3_8b"], ctx_size=8192, cache_type_v="q8_0"), roomy)
    assert q8v.plan.kv.v_bytes < f16.plan.kv.v_bytes
    assert q8v.plan.kv.k_bytes == f16.plan.kv.k_bytes
    ram_kv = auto_settings(engine(arch["llama3_8b"], ctx_size=8192, kv_offload=False), roomy)
    assert ram_kv.plan.devices[1].kv_cache_bytes == 0


# ---- sliding-window default, recurrent state, checkpoints -------------------------------------


def test_default_plan_is_llama_servers_window_sized_cache(tmp_path: Path) -> None:
    """serve and llama-server allocate the window-sized SWA cache (issue #12's numbers)."""
    g27 = read_gguf_spec(factory.write_shape(tmp_path / "g27.gguf", factory.GEMMA3_27B))
    assert plan_kv(g27, ms(32768)).total == 3184 * MIB
    g9 = read_gguf_spec(factory.write_shape(tmp_path / "g9.gguf", factory.GEMMA2_9B))
    assert plan_kv(g9, ms(8192)).total == 2100 * MIB
    # --swa-full: the full-size cache innkeeper allocated before
    assert plan_kv(g27, ms(32768, swa_full=True)).total == 15872 * MIB
    assert plan_kv(g9, ms(8192, swa_full=True)).total == 2688 * MIB
    plan = plan_memory(g27, ms(32768), BIG_CPU, gpu_layers=0)
    assert plan.to_json()["checkpoints_ram_bytes"] > 0
    assert any("context checkpoints" in n for n in plan.notes)
    full = plan_memory(g27, ms(32768, swa_full=True), BIG_CPU, gpu_layers=0)
    assert full.kv.checkpoint_bytes == 0  # the full cache needs no checkpoints


def test_mamba2_recurrent_state_is_counted(tmp_path: Path) -> None:
    """Mamba-Codestral-7B's shape: llama.cpp allocates R 7.50 MiB + S 256.00 MiB per sequence
    (n_embd_r = (d_conv-1)(d_inner + 2·n_group·d_state), n_embd_s = d_state·d_inner, f32)."""
    ssm = {
        "ssm.conv_kernel": 4,
        "ssm.inner_size": 8192,
        "ssm.state_size": 128,
        "ssm.group_count": 8,
        "ssm.time_step_rank": 128,
    }
    path = factory.write_recurrent(tmp_path / "mamba2.gguf", "mamba2", 64, 4096, 0, ssm)
    spec = read_gguf_spec(path)
    assert (spec.n_embd_r, spec.n_embd_s) == (30720, 1048576)
    one = plan_kv(spec, ms(4096))
    assert one.state_bytes == int(263.5 * MIB) and one.k_bytes == 0
    assert plan_kv(spec, ms(65536)).total == one.total  # no growth with context
    four = plan_kv(spec, ms(4096, parallel=4, unified=True))
    assert four.state_bytes == 4 * one.state_bytes
    assert one.checkpoint_bytes == one.state_bytes  # a checkpoint is the whole state


def test_hybrid_counts_state_on_recurrent_layers_and_kv_on_attention_layers(
    tmp_path: Path,
) -> None:
    kv_heads = [0, 0, 0, 8] * 8  # 32 layers, every 4th one attention
    ssm = {"ssm.conv_kernel": 4, "ssm.inner_size": 4096, "ssm.state_size": 128}
    ssm["ssm.group_count"] = 1
    path = factory.write_recurrent(
        tmp_path / "hybrid.gguf", "granitehybrid", 32, 2048, kv_heads, ssm
    )
    spec = read_gguf_spec(path)
    kv = plan_kv(spec, ms(8192))
    row = (3 * (4096 + 2 * 128) + 128 * 4096) * 4
    assert kv.state_bytes == 24 * row
    assert kv.k_bytes == kv.v_bytes == 8 * 8 * 128 * 2 * 8192  # 8 attention layers, f16
    assert kv.layer_bytes[0] == row and kv.layer_bytes[3] == 2 * 8 * 128 * 2 * 8192


def test_the_plan_counts_a_vision_projector_where_llama_cpp_puts_it(tmp_path: Path) -> None:
    from dataclasses import replace

    from innkeeper.models.projector import read_projector
    from tests.models.vision_factory import write_pair

    model, proj = write_pair(tmp_path)
    info = read_projector(proj)
    assert info.tensor_bytes > 0 and info.compute_bytes > 0
    spec = read_gguf_spec(model)
    text_only = engine(model, gpu_layers=0)
    seeing = replace(text_only, mmproj=proj)
    cpu = Hardware(16 * GIB, 16 * GIB)
    a = plan_memory(spec, MemorySettings(text_only, 2048), cpu)
    b = plan_memory(spec, MemorySettings(seeing, 2048), cpu)
    assert b.weights_bytes - a.weights_bytes == info.tensor_bytes
    assert b.total_bytes - a.total_bytes >= info.tensor_bytes + info.compute_bytes
    assert b.devices[0].total_bytes - a.devices[0].total_bytes >= info.tensor_bytes
    assert any(proj.name in n for n in b.notes) and not any(proj.name in n for n in a.notes)
    gpu = Hardware(16 * GIB, 16 * GIB, (GPU(0, "g", 8 * GIB, 8 * GIB),), "override")
    a = plan_memory(spec, MemorySettings(replace(text_only, gpu_layers=99), 2048), gpu)
    b = plan_memory(spec, MemorySettings(replace(seeing, gpu_layers=99), 2048), gpu)
    assert b.devices[1].weights_bytes - a.devices[1].weights_bytes == info.tensor_bytes
    assert b.devices[0].total_bytes == a.devices[0].total_bytes  # nothing more in RAM
