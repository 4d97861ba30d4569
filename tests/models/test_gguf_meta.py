"""GGUF header reading: real files, architecture-shaped sparse files and hostile files."""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest
from gguf import GGUFValueType

from innkeeper.models.gguf_meta import read_gguf_spec
from innkeeper.models.spec import ModelFormatError
from innkeeper.models.store import default_model_path
from tests.models import gguf_factory as factory


@pytest.fixture(scope="module")
def arch(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return factory.write_all(tmp_path_factory.mktemp("arch"))


def test_smollm2_header() -> None:
    spec = read_gguf_spec(default_model_path())
    assert spec.architecture == "llama"
    assert (spec.n_layer, spec.n_embd, spec.n_head, spec.n_head_kv) == (30, 576, 9, 3)
    assert spec.head_dim_k == spec.head_dim_v == 64
    assert spec.n_vocab == 49152
    assert spec.context_length == 8192
    assert spec.quantization == "Q4_1"
    assert spec.chat_template_name == "chatml"
    assert 134_000_000 < spec.parameters < 135_000_000
    # weights = file minus header, to the alignment padding
    assert 0 < spec.file_bytes - spec.weight_bytes < 2_000_000


def test_sparse_files_cost_no_disk(arch: dict[str, Path]) -> None:
    p = arch["llama3_8b"]
    assert p.stat().st_size > 8 * 10**9
    assert p.stat().st_blocks * 512 < 1024 * 1024


@pytest.mark.parametrize(
    ("name", "expect"),
    [
        ("llama3_8b", dict(n_layer=32, n_head_kv=8, head_dim_k=128, n_vocab=128256, mla=False)),
        ("gemma2_9b", dict(n_layer=42, head_dim_k=256, sliding_window=4096, tied_embeddings=True)),
        ("gemma3_4b", dict(n_layer=34, sliding_window=1024, n_vocab=262208)),
        ("mixtral_tiny", dict(n_expert=8, n_expert_used=2)),
        (
            "deepseek2_lite",
            dict(mla=True, n_head_kv=1, head_dim_k=576, head_dim_v=0, kv_lora_rank=512),
        ),
    ],
)
def test_architecture_numbers(arch: dict[str, Path], name: str, expect: dict[str, object]) -> None:
    spec = read_gguf_spec(arch[name])
    for key, value in expect.items():
        assert getattr(spec, key) == value, key


def test_swa_patterns(arch: dict[str, Path]) -> None:
    g2 = read_gguf_spec(arch["gemma2_9b"])
    assert g2.swa_layers is not None
    assert [g2.is_swa(i) for i in range(4)] == [True, False, True, False]
    g3 = read_gguf_spec(arch["gemma3_4b"])
    assert [g3.is_swa(i) for i in range(7)] == [True] * 5 + [False, True]


def test_parameter_counts_match_real_models(arch: dict[str, Path]) -> None:
    assert round(read_gguf_spec(arch["llama3_8b"]).parameters / 1e9, 2) == 8.03
    assert round(read_gguf_spec(arch["gemma2_9b"]).parameters / 1e9, 2) == 9.24
    assert round(read_gguf_spec(arch["deepseek2_lite"]).parameters / 1e9, 1) == 15.7


def test_weight_bytes_exact_from_tensor_table(arch: dict[str, Path]) -> None:
    spec = read_gguf_spec(arch["llama3_8b"])
    groups = spec.byte_groups()
    # Q8_0: 34 bytes per 32 values; embedding and output are 4096 x 128256 each
    assert groups.input == 4096 * 128256 // 32 * 34
    assert groups.output == groups.input + 4096 * 4
    assert groups.total == spec.weight_bytes
    assert len(groups.layers) == 32 and len(set(groups.layers)) == 1


# ---- hostile files ---------------------------------------------------------------------------


def _gguf(kv: bytes = b"", n_kv: int = 0, tensors: bytes = b"", n_tensors: int = 0) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + kv + tensors


def _str(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def test_truncated_header(tmp_path: Path) -> None:
    data = default_model_path().read_bytes()[:300_000]
    p = tmp_path / "cut.gguf"
    p.write_bytes(data)
    with pytest.raises(ModelFormatError, match="truncated"):
        read_gguf_spec(p)


def test_truncated_weights(tmp_path: Path) -> None:
    data = default_model_path().read_bytes()
    p = tmp_path / "cut.gguf"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFormatError, match="truncated or corrupt"):
        read_gguf_spec(p)


def test_not_gguf(tmp_path: Path) -> None:
    p = tmp_path / "x.gguf"
    p.write_bytes(b"hello world, not a model")
    with pytest.raises(ModelFormatError, match="not a GGUF"):
        read_gguf_spec(p)
    p.write_bytes(b"GG")
    with pytest.raises(ModelFormatError, match="not a GGUF"):
        read_gguf_spec(p)


def test_huge_tensor_is_refused_without_allocating(tmp_path: Path) -> None:
    arch = _str("general.architecture") + struct.pack("<I", GGUFValueType.STRING) + _str("llama")
    tensor = _str("blk.0.attn_q.weight") + struct.pack("<I", 2) + struct.pack("<QQ", 2**30, 2**30)
    tensor += struct.pack("<IQ", 0, 0)  # F32, offset 0: 2^60 elements
    p = tmp_path / "huge.gguf"
    p.write_bytes(_gguf(arch, 1, tensor, 1) + bytes(64))
    t0 = time.monotonic()
    with pytest.raises(ModelFormatError, match="1,152,921,504,606,846,976 elements"):
        read_gguf_spec(p)
    assert time.monotonic() - t0 < 2


@pytest.mark.parametrize("count", [1_000_000, 2**62])
def test_absurd_array_count(tmp_path: Path, count: int) -> None:
    kv = _str("tokenizer.ggml.tokens") + struct.pack(
        "<IIQ", GGUFValueType.ARRAY, GGUFValueType.STRING, count
    )
    p = tmp_path / "arr.gguf"
    p.write_bytes(_gguf(kv, 1) + bytes(1000))
    t0 = time.monotonic()
    with pytest.raises(ModelFormatError, match="array entries"):
        read_gguf_spec(p)
    assert time.monotonic() - t0 < 2


def test_absurd_counts_in_header(tmp_path: Path) -> None:
    p = tmp_path / "n.gguf"
    p.write_bytes(_gguf(n_kv=2**40) + bytes(100))
    with pytest.raises(ModelFormatError, match="metadata entries"):
        read_gguf_spec(p)
    p.write_bytes(_gguf(n_tensors=2**40) + bytes(100))
    with pytest.raises(ModelFormatError, match="tensors"):
        read_gguf_spec(p)


def test_huge_string_length(tmp_path: Path) -> None:
    kv = struct.pack("<Q", 2**50) + b"x"
    p = tmp_path / "s.gguf"
    p.write_bytes(_gguf(kv, 1))
    with pytest.raises(ModelFormatError, match="string"):
        read_gguf_spec(p)


def test_wrong_metadata_type(tmp_path: Path) -> None:
    kv = _str("general.architecture") + struct.pack("<I", GGUFValueType.STRING) + _str("llama")
    kv += _str("llama.block_count") + struct.pack("<I", GGUFValueType.STRING) + _str("many")
    kv += _str("llama.embedding_length") + struct.pack("<II", GGUFValueType.UINT32, 64)
    p = tmp_path / "t.gguf"
    p.write_bytes(_gguf(kv, 3))
    with pytest.raises(ModelFormatError, match="block_count should be a number"):
        read_gguf_spec(p)


def test_big_real_array_is_fast(tmp_path: Path) -> None:
    """A million real string entries is parsed (skipped) quickly, not refused."""
    n = 1_000_000
    kv = _str("general.architecture") + struct.pack("<I", GGUFValueType.STRING) + _str("llama")
    kv += _str("llama.block_count") + struct.pack("<II", GGUFValueType.UINT32, 1)
    kv += _str("llama.embedding_length") + struct.pack("<II", GGUFValueType.UINT32, 64)
    kv += _str("tokenizer.ggml.tokens") + struct.pack(
        "<IIQ", GGUFValueType.ARRAY, GGUFValueType.STRING, n
    )
    kv += (struct.pack("<Q", 3) + b"tok") * n
    p = tmp_path / "big.gguf"
    p.write_bytes(_gguf(kv, 4))
    t0 = time.monotonic()
    spec = read_gguf_spec(p)
    assert spec.n_vocab == n
    assert time.monotonic() - t0 < 10
