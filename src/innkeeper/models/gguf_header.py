"""The GGUF header (metadata and tensor table), read with bounds checks, never the tensor data.

Why our own header walk instead of `gguf.GGUFReader`: the reader memory-maps the whole file,
builds one numpy object per array element (seconds for a 256k-token vocabulary), trusts every
count it reads (a hostile file with a 2^60-element tensor or a billion-entry array makes it
allocate or loop without bound) and cannot read over HTTP. This walker reads through a
`ByteSource` with bounds checks on every count against the bytes that actually exist, keeps
only small values, and skips the vocabulary by length. It still uses the `gguf` package for what
the format *means*: value types, tensor type block sizes and key spellings.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from gguf.constants import GGML_QUANT_SIZES, GGUF_MAGIC, GGMLQuantizationType, GGUFValueType

from innkeeper.models.sources import ByteSource
from innkeeper.models.spec import ModelFormatError, TensorInfo

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
