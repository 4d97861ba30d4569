"""GGUF header -> ModelSpec, reading only the header and never the tensor data.

Why our own header walk instead of `gguf.GGUFReader`: the reader memory-maps the whole file,
builds one numpy object per array element (seconds for a 256k-token vocabulary), trusts every
count it reads (a hostile file with a 2^60-element tensor or a billion-entry array makes it
allocate or loop without bound) and cannot read over HTTP. This walker reads through a
`ByteSource` with bounds checks on every count against the bytes that actually exist, keeps
only small values, and skips the vocabulary by length. It still uses the `gguf` package for what
the format *means*: value types, tensor type block sizes, file-type names and key spellings.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf.constants import (
    GGML_QUANT_SIZES,
    GGUF_MAGIC,
    GGMLQuantizationType,
    GGUFValueType,
    LlamaFileType,
)

from innkeeper.models.sources import ByteSource, FileSource
from innkeeper.models.spec import ModelFormatError, ModelSpec, RopeScaling, TensorInfo

MAX_HEADER_BYTES = 512 * 1024**2  # the largest real headers (256k vocab + merges) are ~30 MiB
MAX_KV_COUNT = 65_536
MAX_TENSOR_COUNT = 1_000_000
MAX_ARRAY_LEN = 16_777_216
MAX_STRING_BYTES = 64 * 1024**2
MAX_DIMS = 4  # GGML_MAX_DIMS
KEEP_ARRAY_LEN = 8192  # longer arrays (tokens, merges, scores) are counted, not kept
INT64_MAX = 2**63 - 1

_SCALARS: dict[int, tuple[str, int]] = {
    GGUFValueType.UINT8: ("<B", 1),
    GGUFValueType.INT8: ("<b", 1),
    GGUFValueType.UINT16: ("<H", 2),
    GGUFValueType.INT16: ("<h", 2),
    GGUFValueType.UINT32: ("<I", 4),
    GGUFValueType.INT32: ("<i", 4),
    GGUFValueType.FLOAT32: ("<f", 4),
    GGUFValueType.BOOL: ("<?", 1),
    GGUFValueType.UINT64: ("<Q", 8),
    GGUFValueType.INT64: ("<q", 8),
    GGUFValueType.FLOAT64: ("<d", 8),
}

# Architectures whose sliding-window layers follow a fixed pattern when the GGUF does not list
# them: (pattern n, dense_first, default window). Mirrors each arch's load_hparams in llama.cpp.
_SWA_PATTERNS: dict[str, tuple[int, bool, int | None]] = {
    "gemma2": (2, False, 4096),
    "gemma3": (6, False, None),
    "gemma3n": (5, False, None),
    "cohere2": (4, False, None),
    "llama4": (4, False, 8192),
    "gpt-oss": (2, False, None),
    "exaone4": (4, False, None),
    "olmo2": (4, False, None),
    "afmoe": (4, False, None),
    "smallthinker": (4, True, 4096),
}
# llama.cpp reads a sliding_window for these but runs them without SWA.
_SWA_DISABLED = {"phi3"}


@dataclass
class GGUFHeader:
    """The parsed header: metadata (small values only), array lengths and the tensor table."""

    version: int
    metadata: dict[str, Any]
    array_lengths: dict[str, int]
    tensors: list[TensorInfo]
    data_offset: int
    file_size: int
    alignment: int


class TruncatedError(ModelFormatError):
    """The data ended before the header did."""


class _Cursor:
    """Sequential reads over a ByteSource, buffered, bounded and with clear truncation errors."""

    def __init__(self, src: ByteSource, limit: int = MAX_HEADER_BYTES) -> None:
        self.src = src
        self.pos = 0
        self.limit = min(limit, src.size) if src.size >= 0 else limit
        self._buf = b""
        self._buf_start = 0
        self._chunk = 1 << 20

    def remaining(self) -> int:
        return self.limit - self.pos

    def _fill(self, need: int) -> None:
        end = self._buf_start + len(self._buf)
        if self.pos >= self._buf_start and self.pos + need <= end:
            return
        if self.pos + need > self.limit:
            if self.limit >= self.src.size >= 0:
                raise TruncatedError(
                    f"{self.src.name}: truncated GGUF header (needs byte {self.pos + need:,}, "
                    f"file has {self.src.size:,})"
                )
            raise ModelFormatError(
                f"{self.src.name}: GGUF header larger than {MAX_HEADER_BYTES // 2**20} MiB"
            )
        size = max(need, self._chunk)
        self._chunk = min(self._chunk * 2, 16 << 20)  # grow for big vocabularies (fewer requests)
        size = min(size, self.limit - self.pos)
        data = self.src.read(self.pos, size)
        if len(data) < need:
            raise TruncatedError(
                f"{self.src.name}: truncated GGUF header (needs byte {self.pos + need:,}, "
                f"file ends at {self.pos + len(data):,})"
            )
        self._buf, self._buf_start = data, self.pos

    def take(self, n: int) -> bytes:
        self._fill(n)
        i = self.pos - self._buf_start
        self.pos += n
        return self._buf[i : i + n]

    def skip(self, n: int) -> None:
        if self.pos + n > self.limit:
            self._fill(n)  # raises the right error
        self.pos += n

    def unpack(self, fmt: str, size: int) -> Any:
        self._fill(size)
        i = self.pos - self._buf_start
        self.pos += size
        return struct.unpack_from(fmt, self._buf, i)[0]

    def u32(self) -> int:
        return int(self.unpack("<I", 4))

    def u64(self) -> int:
        return int(self.unpack("<Q", 8))

    def string(self, what: str) -> str:
        n = self.u64()
        if n > MAX_STRING_BYTES or n > self.remaining():
            raise ModelFormatError(
                f"{self.src.name}: {what} claims a {n:,}-byte string "
                f"(only {self.remaining():,} bytes left)"
            )
        return self.take(n).decode("utf-8", errors="replace")

    def skip_strings(self, count: int, what: str) -> None:
        """Skip `count` length-prefixed strings (a vocabulary) without decoding them."""
        for _ in range(count):
            n = self.u64()
            if n > MAX_STRING_BYTES or n > self.remaining():
                raise ModelFormatError(f"{self.src.name}: {what} has a {n:,}-byte string entry")
            self.skip(n)


def _read_value(cur: _Cursor, vtype: int, key: str, lengths: dict[str, int]) -> Any:
    if vtype in _SCALARS:
        fmt, size = _SCALARS[vtype]
        return cur.unpack(fmt, size)
    if vtype == GGUFValueType.STRING:
        return cur.string(key)
    if vtype == GGUFValueType.ARRAY:
        itype = cur.u32()
        count = cur.u64()
        if itype not in _SCALARS and itype != GGUFValueType.STRING:
            raise ModelFormatError(f"{cur.src.name}: {key} is an array of unknown type {itype}")
        min_size = _SCALARS[itype][1] if itype in _SCALARS else 8
        if count > MAX_ARRAY_LEN or count * min_size > cur.remaining():
            raise ModelFormatError(
                f"{cur.src.name}: {key} claims {count:,} array entries, more than the "
                f"{cur.remaining():,} bytes left can hold (limit {MAX_ARRAY_LEN:,}): "
                "truncated or corrupt file"
            )
        lengths[key] = count
        if itype == GGUFValueType.STRING:
            if count <= KEEP_ARRAY_LEN:
                return [cur.string(key) for _ in range(count)]
            cur.skip_strings(count, key)
            return None
        fmt, size = _SCALARS[itype]
        if count <= KEEP_ARRAY_LEN:
            raw = cur.take(size * count)
            return list(struct.unpack(f"<{count}{fmt[1]}", raw))
        cur.skip(size * count)
        return None
    raise ModelFormatError(f"{cur.src.name}: {key} has unknown value type {vtype}")


def read_header(src: ByteSource) -> GGUFHeader:
    """Walk the GGUF header of `src`, validating every count against the bytes that exist."""
    cur = _Cursor(src)
    try:
        magic = cur.take(4)
    except TruncatedError:
        raise ModelFormatError(f"{src.name}: not a GGUF file (too short)") from None
    if struct.unpack("<I", magic)[0] != GGUF_MAGIC:
        raise ModelFormatError(f"{src.name}: not a GGUF file (bad magic {magic!r})")
    version = cur.u32()
    if version not in (2, 3):
        raise ModelFormatError(f"{src.name}: unsupported GGUF version {version}")
    n_tensors, n_kv = cur.u64(), cur.u64()
    if n_tensors > MAX_TENSOR_COUNT:
        raise ModelFormatError(f"{src.name}: header claims {n_tensors:,} tensors (corrupt)")
    if n_kv > MAX_KV_COUNT:
        raise ModelFormatError(f"{src.name}: header claims {n_kv:,} metadata entries (corrupt)")

    metadata: dict[str, Any] = {}
    lengths: dict[str, int] = {}
    for _ in range(n_kv):
        key = cur.string("metadata key")
        vtype = cur.u32()
        value = _read_value(cur, vtype, key, lengths)
        if value is not None:
            metadata[key] = value

    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ModelFormatError(f"{src.name}: invalid general.alignment {alignment!r}")

    raw_tensors: list[tuple[str, tuple[int, ...], int, int]] = []
    for _ in range(n_tensors):
        name = cur.string("tensor name")
        n_dims = cur.u32()
        if n_dims == 0 or n_dims > MAX_DIMS:
            raise ModelFormatError(f"{src.name}: tensor {name!r} has {n_dims} dimensions")
        dims = tuple(cur.u64() for _ in range(n_dims))
        ttype = cur.u32()
        offset = cur.u64()
        raw_tensors.append((name, dims, ttype, offset))

    data_offset = cur.pos + (-cur.pos % alignment)
    tensors: list[TensorInfo] = []
    seen: set[str] = set()
    for name, dims, ttype, offset in raw_tensors:
        if name in seen:
            raise ModelFormatError(f"{src.name}: duplicate tensor {name!r}")
        seen.add(name)
        try:
            qtype = GGMLQuantizationType(ttype)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise ModelFormatError(
                f"{src.name}: tensor {name!r} has unknown type {ttype}"
            ) from None
        n_elements = 1
        for d in dims:
            n_elements *= d
        if any(d == 0 for d in dims) or n_elements > INT64_MAX:
            raise ModelFormatError(
                f"{src.name}: tensor {name!r} has absurd shape {list(dims)} "
                f"({n_elements:,} elements)"
            )
        if dims[0] % block:
            raise ModelFormatError(
                f"{src.name}: tensor {name!r} row of {dims[0]} is not a multiple of the "
                f"{qtype.name} block size {block}"
            )
        n_bytes = n_elements // block * type_size
        end = data_offset + offset + n_bytes
        if src.size >= 0 and end > src.size:
            raise ModelFormatError(
                f"{src.name}: tensor {name!r} ({n_elements:,} elements, {n_bytes:,} bytes) ends "
                f"at byte {end:,} but the file has {src.size:,}: truncated or corrupt"
            )
        tensors.append(TensorInfo(name, qtype.name, dims, n_elements, n_bytes))
    return GGUFHeader(version, metadata, lengths, tensors, data_offset, src.size, alignment)


# ---- header -> ModelSpec -----------------------------------------------------------------


def _int(meta: dict[str, Any], key: str, default: int | None = None) -> int | None:
    value = meta.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ModelFormatError(f"metadata {key} should be a number, got {value!r}")
    if value < 0:
        raise ModelFormatError(f"metadata {key} is negative ({value})")
    return int(value)


def _int_or_list(meta: dict[str, Any], key: str, n_layer: int) -> int | tuple[int, ...] | None:
    value = meta.get(key)
    if isinstance(value, list):
        if not value or not all(isinstance(v, int) and v >= 0 for v in value):
            raise ModelFormatError(f"metadata {key} should list non-negative integers")
        if len(set(value)) == 1:
            return int(value[0])
        if len(value) < n_layer:
            raise ModelFormatError(f"metadata {key} has {len(value)} entries for {n_layer} layers")
        return tuple(int(v) for v in value)
    return _int(meta, key)


def file_type_name(file_type: int | None) -> str | None:
    """`general.file_type` as llama.cpp's quantization name (`Q4_K_M`)."""
    if file_type is None:
        return None
    try:
        name = LlamaFileType(file_type).name
    except ValueError:
        return f"type {file_type}"
    return name.removeprefix("MOSTLY_").replace("ALL_F32", "F32")


def _dominant_type(tensors: list[TensorInfo]) -> str | None:
    """The type holding most weight bytes, for files without `general.file_type`."""
    totals: dict[str, int] = {}
    for t in tensors:
        if len(t.shape) >= 2:
            totals[t.type_name] = totals.get(t.type_name, 0) + t.n_bytes
    return max(totals, key=lambda k: totals[k]) if totals else None


def _swa_layers(
    arch: str, meta: dict[str, Any], n_layer: int
) -> tuple[int | None, tuple[bool, ...] | None]:
    if arch in _SWA_DISABLED:
        return None, None
    prefix = f"{arch}.attention."
    window = _int(meta, prefix + "sliding_window")
    pattern_default = _SWA_PATTERNS.get(arch)
    if pattern_default and window is None and pattern_default[2] is not None:
        window = pattern_default[2]
    if not window:
        return None, None
    raw = meta.get(prefix + "sliding_window_pattern")
    if isinstance(raw, list):
        if len(raw) < n_layer:
            raise ModelFormatError(f"{prefix}sliding_window_pattern has {len(raw)} entries")
        return window, tuple(bool(v) for v in raw[:n_layer])
    if pattern_default is None and raw is None:
        # A window without a known pattern: llama.cpp runs such archs without SWA.
        return None, None
    n_pattern = (
        int(raw) if isinstance(raw, int) and not isinstance(raw, bool) else pattern_default[0]
    )  # type: ignore[index]
    dense_first = pattern_default[1] if pattern_default else False
    if dense_first:
        layers = tuple(n_pattern == 0 or il % n_pattern != 0 for il in range(n_layer))
    else:
        layers = tuple(n_pattern == 0 or il % n_pattern < n_pattern - 1 for il in range(n_layer))
    return window, layers


def spec_from_header(header: GGUFHeader, name: str = "") -> ModelSpec:
    """Turn header metadata and the tensor table into a ModelSpec."""
    from innkeeper.models.templates_detect import detect_template

    meta = header.metadata
    arch = meta.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise ModelFormatError(f"{name}: GGUF has no general.architecture")
    p = f"{arch}."
    n_layer = _int(meta, p + "block_count")
    n_embd = _int(meta, p + "embedding_length")
    if n_layer is None or n_embd is None:
        raise ModelFormatError(f"{name}: GGUF lacks {p}block_count or {p}embedding_length")
    if n_layer > 100_000 or n_embd > 10_000_000:
        raise ModelFormatError(
            f"{name}: absurd architecture numbers ({n_layer} layers, {n_embd} wide)"
        )
    heads_raw = _int_or_list(meta, p + "attention.head_count", n_layer) or 0
    n_head = max(heads_raw) if isinstance(heads_raw, tuple) else heads_raw
    n_head_kv = _int_or_list(meta, p + "attention.head_count_kv", n_layer)
    if n_head_kv is None:
        n_head_kv = heads_raw
    default_hd = n_embd // n_head if n_head else 0
    head_k = _int(meta, p + "attention.key_length", default_hd) or 0
    head_v = _int(meta, p + "attention.value_length", default_hd) or 0
    mla = (
        _int(meta, p + "attention.key_length_mla") is not None
        and _int(meta, p + "attention.value_length_mla") is not None
    )
    window, swa = _swa_layers(arch, meta, n_layer)

    n_layer_kv = n_layer - (_int(meta, p + "nextn_predict_layers", 0) or 0)
    shared = _int(meta, p + "attention.shared_kv_layers")
    if shared:
        n_layer_kv = max(n_layer - shared, 0)

    n_vocab = _int(meta, p + "vocab_size") or header.array_lengths.get("tokenizer.ggml.tokens", 0)
    if not n_vocab:
        tokens = meta.get("tokenizer.ggml.tokens")
        n_vocab = len(tokens) if isinstance(tokens, list) else 0

    rope = None
    rope_type = meta.get(p + "rope.scaling.type")
    if isinstance(rope_type, str) and rope_type != "none":
        factor = meta.get(p + "rope.scaling.factor")
        rope = RopeScaling(
            rope_type,
            float(factor) if isinstance(factor, (int, float)) else None,
            _int(meta, p + "rope.scaling.original_context_length"),
        )

    n_ff_raw = _int_or_list(meta, p + "feed_forward_length", n_layer)
    n_ff = max(n_ff_raw) if isinstance(n_ff_raw, tuple) else n_ff_raw

    tensors = tuple(header.tensors)
    weight_bytes = sum(t.n_bytes for t in tensors)
    parameters = sum(t.n_elements for t in tensors)
    file_type = _int(meta, "general.file_type")
    quant = file_type_name(file_type)
    source = "GGUF metadata general.file_type"
    if quant is None:
        quant = _dominant_type(header.tensors)
        source = "GGUF tensor types"
    template = meta.get("tokenizer.chat_template")
    template = template if isinstance(template, str) else None
    names = {"output.weight"}
    tied = not any(t.name in names for t in tensors) and any(
        t.name == "token_embd.weight" for t in tensors
    )
    return ModelSpec(
        format="gguf",
        architecture=arch,
        name=meta.get("general.name") if isinstance(meta.get("general.name"), str) else None,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim_k=head_k,
        head_dim_v=0 if mla else head_v,
        head_dim_k_swa=_int(meta, p + "attention.key_length_swa"),
        head_dim_v_swa=_int(meta, p + "attention.value_length_swa"),
        n_vocab=n_vocab,
        context_length=_int(meta, p + "context_length", 0) or 0,
        n_ff=n_ff,
        rope_scaling=rope,
        sliding_window=window,
        swa_layers=swa,
        n_expert=_int(meta, p + "expert_count", 0) or 0,
        n_expert_used=_int(meta, p + "expert_used_count", 0) or 0,
        kv_lora_rank=_int(meta, p + "attention.kv_lora_rank"),
        mla=mla,
        n_layer_kv=n_layer_kv,
        quantization=quant,
        quantization_source=source,
        tensors=tensors,
        weight_bytes=weight_bytes,
        parameters=parameters,
        file_bytes=max(header.file_size, 0),
        chat_template=template,
        chat_template_name=detect_template(template),
        tied_embeddings=tied,
        **_recurrent_state(meta, p, n_embd),
        extra={
            "gguf_version": header.version,
            "header_bytes": header.data_offset,
            "size_label": meta.get("general.size_label"),
            "split_count": meta.get("split.count"),
            "split_index": meta.get("split.no"),
        },
    )


def _recurrent_state(meta: dict[str, Any], p: str, n_embd: int) -> dict[str, int]:
    """llama.cpp's per-layer recurrent state widths (llama-hparams.cpp n_embd_r/n_embd_s):
    RWKV token shift + WKV state, LFM2 short-conv cache, Mamba/Mamba-2 conv + SSM state."""
    wkv = _int(meta, p + "wkv.head_size", 0) or 0
    if wkv:
        shifts = _int(meta, p + "token_shift_count", 2) or 2
        return {"n_embd_r": shifts * n_embd, "n_embd_s": n_embd * wkv}
    l_cache = _int(meta, p + "shortconv.l_cache", 0) or 0
    if l_cache:
        return {"n_embd_r": n_embd * (l_cache - 1), "n_embd_s": 0}
    d_conv = _int(meta, p + "ssm.conv_kernel", 0) or 0
    d_inner = _int(meta, p + "ssm.inner_size", 0) or 0
    d_state = _int(meta, p + "ssm.state_size", 0) or 0
    n_group = _int(meta, p + "ssm.group_count", 0) or 0
    r = max(d_conv - 1, 0) * (d_inner + 2 * n_group * d_state)
    return {"n_embd_r": r, "n_embd_s": d_state * d_inner}


def read_gguf_spec(path: Path | str) -> ModelSpec:
    """The ModelSpec of a local GGUF file, from its header alone.

    For a split GGUF (`-00001-of-00003.gguf`) the first part holds the metadata; pass every
    part's tensors through `read_split_spec` to get exact totals.
    """
    path = Path(path)
    try:
        with FileSource(path) as src:
            return spec_from_header(read_header(src), str(path))
    except OSError as exc:
        raise ModelFormatError(f"cannot read {path}: {exc.strerror or exc}") from exc


def merge_split(first: ModelSpec, others: list[GGUFHeader]) -> ModelSpec:
    """Add the tensors of the other parts of a split GGUF to the first part's spec."""
    tensors = list(first.tensors)
    file_bytes = first.file_bytes
    for h in others:
        tensors.extend(h.tensors)
        file_bytes += max(h.file_size, 0)
    return first.with_updates(
        tensors=tuple(tensors),
        weight_bytes=sum(t.n_bytes for t in tensors),
        parameters=sum(t.n_elements for t in tensors),
        file_bytes=file_bytes,
    )


def read_split_spec(paths: list[Path]) -> ModelSpec:
    """The ModelSpec of a split GGUF whose parts are all present locally."""
    first = read_gguf_spec(paths[0])
    headers = []
    for p in paths[1:]:
        with FileSource(p) as src:
            headers.append(read_header(src))
    return merge_split(first, headers)
