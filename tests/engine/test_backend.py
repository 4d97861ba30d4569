"""The llama.cpp wrapper: tokenising, batches, and exact KV-cache position shifts."""

from __future__ import annotations

import ctypes
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import llama_cpp as C
import numpy as np
import pytest

from innkeeper.engine.backend import Batch, Context, Model
from innkeeper.engine.llama_params import (
    BackendError,
    ContextParams,
    ModelParams,
    TensorBuftOverride,
    cpu_buffer_type,
    model_params_struct,
    set_fields,
)
from innkeeper.models.store import default_model_path


@pytest.fixture(scope="module")
def model() -> Model:
    m = Model(default_model_path())
    yield m
    m.close()


def test_tokenize_round_trip(model: Model) -> None:
    text = "Héllo wörld — 日本語 🙂 <|im_start|>"
    ids = model.tokenize(text, add_special=False)
    assert model.detokenize(ids, special=True) == text
    assert model.n_vocab == 49152
    assert model.eog_tokens  # <|im_end|> and friends


def _next_logits(ctx: Context, batch: Batch, token: int, pos: int, seq: int) -> np.ndarray:
    batch.clear()
    batch.add(token, pos, seq, True)
    assert ctx.decode(batch) == 0
    return np.ctypeslib.as_array(ctx.logits(0)).copy()


def test_shifted_cache_predicts_like_a_cold_evaluation(model: Model) -> None:
    """A chunk evaluated at positions 300.. and moved to 0.. by seq_add predicts like the same
    chunk evaluated at 0.. directly, within the noise that evaluating at another position
    causes anyway (quantized kernels round differently at different RoPE angles)."""
    ctx = Context(model, ContextParams(n_ctx=1024, n_seq=3, threads=2))
    batch = Batch(512)
    try:
        tokens = model.tokenize(
            "The old lighthouse keeper climbed the stairs every night to", add_special=False
        )
        n = len(tokens)
        batch.clear()
        batch.add_span(tokens, 0, 0, False)  # cold, at its own positions
        batch.add_span(tokens, 300, 1, False)  # to be moved left by 300
        batch.add_span(tokens, 1, 2, False)  # the same, one position later (noise floor)
        assert ctx.decode(batch) == 0
        nxt = model.tokenize(" light", add_special=False)[0]
        cold = _next_logits(ctx, batch, nxt, n, 0)
        noise = float(np.max(np.abs(cold - _next_logits(ctx, batch, nxt, n + 1, 2))))
        ctx.seq_add(1, 300, 300 + n, -300)
        shifted = _next_logits(ctx, batch, nxt, n, 1)
        diff = float(np.max(np.abs(cold - shifted)))
        assert int(np.argmax(cold)) == int(np.argmax(shifted))
        assert diff <= 2 * noise + 0.05, f"shift error {diff:.3f}, position noise {noise:.3f}"
        assert math.isfinite(diff)
    finally:
        batch.free()
        ctx.close()


# ---- every write to a llama.cpp struct goes through set_fields -------------------------------


def test_set_fields_refuses_names_the_binding_does_not_have() -> None:
    """0.3.36 dropped use_mmap/use_mlock: ctypes would take them as plain attributes."""
    mp = C.llama_model_default_params()
    with pytest.raises(BackendError, match="use_mmap"):
        set_fields(mp, use_mmap=False)
    with pytest.raises(BackendError, match="no_such_field"):
        set_fields(C.llama_context_default_params(), no_such_field=1)
    set_fields(mp, n_gpu_layers=7)
    assert mp.n_gpu_layers == 7


def test_model_params_reach_the_struct() -> None:
    """Every model setting innkeeper has lands in a real llama_model_params field."""
    params = ModelParams(
        gpu_layers=12,
        use_mmap=False,
        use_mlock=True,
        main_gpu=1,
        split_mode="row",
        tensor_split=(3.0, 1.0),
        cpu_tensor_patterns=(r"blk\.0\.ffn_up_exps", r"blk\.1\.ffn_up_exps"),
    )
    mp, keep = model_params_struct(params)
    assert keep  # the buffers the struct points into
    assert mp.n_gpu_layers == 12
    assert mp.load_mode == C.LLAMA_LOAD_MODE_MLOCK
    assert mp.main_gpu == 1
    assert mp.split_mode == C.LLAMA_SPLIT_MODE_ROW
    assert list(mp.tensor_split[:3]) == [3.0, 1.0, 0.0]
    overrides = ctypes.cast(mp.tensor_buft_overrides, ctypes.POINTER(TensorBuftOverride))
    assert [overrides[i].pattern for i in range(3)] == [
        rb"blk\.0\.ffn_up_exps",
        rb"blk\.1\.ffn_up_exps",
        None,  # NULL-terminated
    ]
    assert overrides[0].buft == overrides[1].buft == cpu_buffer_type() != 0
    # the defaults keep llama.cpp's own choice (AUTO: map unless a device cannot)
    default, _ = model_params_struct(ModelParams())
    assert default.load_mode == C.LLAMA_LOAD_MODE_AUTO
    assert not default.tensor_buft_overrides and not default.tensor_split
    assert model_params_struct(ModelParams(use_mmap=False))[0].load_mode == C.LLAMA_LOAD_MODE_NONE
    assert model_params_struct(ModelParams(use_mlock=True))[0].load_mode == (
        C.LLAMA_LOAD_MODE_MMAP_MLOCK
    )


def test_context_and_batch_fields(model: Model) -> None:
    ctx = Context(model, ContextParams(n_ctx=512, n_seq=2, threads=1, offload_kqv=False))
    try:
        batch = Batch(4)
        batch.add(model.bos, 0, 0, True)
        assert ctx.decode(batch) == 0
        assert batch.raw.n_tokens == 1
    finally:
        ctx.close()


def test_cpu_moe_overrides_load_and_generate(tmp_path: Path) -> None:
    """A tiny Mixtral-style model loads with llama-server's --n-cpu-moe overrides and decodes;
    llama.cpp reports each expert tensor of the chosen layers moved to the CPU buffer."""
    from tests.models.gguf_factory import Shape, write_shape

    path = write_shape(
        tmp_path / "moe.gguf",
        Shape("llama", 2, 64, 2, 1, 32, 128, 256, 512, n_expert=4, n_expert_used=2),
    )
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from innkeeper.settings.engine import EngineConfig\n"
        "from innkeeper.engine.engine import model_params\n"
        "from innkeeper.engine.backend import Batch, Context, ContextParams, Model\n"
        "cfg = EngineConfig(model_path=Path(sys.argv[1]), n_cpu_moe=1)\n"
        "m = Model(cfg.model_path, model_params(cfg))\n"
        "c = Context(m, ContextParams(n_ctx=256, threads=1))\n"
        "b = Batch(4)\n"
        "for i, t in enumerate([1, 2, 3]):\n"
        "    b.add(t, i, 0, i == 2)\n"
        "print('decode', c.decode(b))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "INNKEEPER_LLAMA_LOG": "1"},
    )
    assert "decode 0" in proc.stdout, proc.stderr[-2000:]
    moved = re.findall(r"tensor (\S+) .*buffer type overridden to CPU", proc.stderr)
    assert sorted(moved) == [
        "blk.0.ffn_down_exps.weight",
        "blk.0.ffn_gate_exps.weight",
        "blk.0.ffn_up_exps.weight",
    ]


def test_load_error_names_llama_cpps_cause(tmp_path: Path) -> None:
    """llama.cpp's ERROR lines (ggml level 4) reach the message, the cause before the generic
    "failed to load model" lines."""
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(default_model_path().read_bytes()[:5000])
    with pytest.raises(BackendError, match="failed to read key-value pairs"):
        Model(cut)


def test_cpu_buffer_type_comes_from_the_ggml_libllama_uses() -> None:
    """--cpu-moe's buffer type must be libllama's own: wheels ship libggml-base.so and .so.0
    as two copies, and opening the wrong one loaded a second ggml beside libllama's."""
    from innkeeper.engine.backend import init_backend
    from innkeeper.engine.llama_params import cpu_buffer_type

    init_backend()
    assert cpu_buffer_type()

    def ggml_base_files() -> set[str]:
        maps = Path("/proc/self/maps").read_text().splitlines()
        return {line.split()[-1] for line in maps if "libggml-base" in line}

    assert len(ggml_base_files()) == 1, ggml_base_files()
