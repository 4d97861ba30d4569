"""Asking an RPC worker what it is, in Python, before llama.cpp ever connects to it.

ggml's client aborts the whole process when a worker cannot be reached or speaks another
protocol version (GGML_ABORT in ggml-rpc.cpp). `probe` sends the same HELLO message, then asks
the worker's devices and their free memory, with a timeout: a bad worker is one typed error
naming it, before any weights move. Just enough of ggml's wire protocol for that.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from innkeeper.engine.llama_params import BackendError
from innkeeper.settings import ConfigError

# ggml-rpc.h / ggml-rpc.cpp of the pinned llama.cpp
PROTO_MAJOR, PROTO_MINOR = 7, 0
_CMD_GET_DEVICE_MEMORY, _CMD_HELLO, _CMD_DEVICE_COUNT = 11, 14, 15
_CONN_CAPS_SIZE = 24  # transport.h: zeros ask for plain TCP
PROBE_TIMEOUT_S = 5.0


class RpcError(BackendError):
    """A worker that cannot take part in a load; the message names it."""


class RpcUnavailable(RpcError):
    """This llama.cpp build has no RPC backend (built without GGML_RPC)."""


class WorkerUnreachable(RpcError):
    """Nothing answers at the endpoint (or it does not answer like an RPC worker)."""


class WorkerVersionMismatch(RpcError):
    """The worker speaks another RPC protocol version than this llama.cpp."""


class WorkerTooSmall(RpcError, ConfigError):
    """The share of the model placed on a worker's device is more than it reports free: a
    setting (--tensor-split, --gpu-layers, the context) that cannot work, refused before any
    weights move."""


@dataclass(frozen=True)
class WorkerDevice:
    """One device of a worker, as its RPC server reports it."""

    index: int
    free_bytes: int
    total_bytes: int


@dataclass(frozen=True)
class WorkerInfo:
    endpoint: str
    version: tuple[int, int, int]
    devices: tuple[WorkerDevice, ...]


# ---- the wire: just enough of ggml's RPC protocol to ask a worker what it is ----------------


def _recv(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the connection closed")
        data += chunk
    return data


def _call(sock: socket.socket, cmd: int, payload: bytes, reply_size: int) -> bytes:
    """| cmd (1 byte) | size (8 bytes) | payload | -> | size (8 bytes) | reply |"""
    sock.sendall(struct.pack("<BQ", cmd, len(payload)) + payload)
    (size,) = struct.unpack("<Q", _recv(sock, 8))
    if size != reply_size:
        raise ConnectionError(f"unexpected reply size {size} (expected {reply_size})")
    return _recv(sock, size)


def probe(endpoint: str, timeout: float = PROBE_TIMEOUT_S) -> WorkerInfo:
    """Ask the worker at `endpoint` (HOST:PORT) its protocol version, devices and free memory.

    A worker serves one client at a time: one that another server holds does not answer
    within `timeout` and is reported unreachable (busy).
    """
    host, _, port = endpoint.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as sock:
            reply = _call(sock, _CMD_HELLO, bytes(_CONN_CAPS_SIZE), 4 + _CONN_CAPS_SIZE)
            version = (reply[0], reply[1], reply[2])
            if version[0] != PROTO_MAJOR or version[1] > PROTO_MINOR:
                raise WorkerVersionMismatch(
                    f"RPC worker {endpoint} speaks protocol {'.'.join(map(str, version))}, "
                    f"this llama.cpp {PROTO_MAJOR}.{PROTO_MINOR}: run the same innkeeper "
                    "(the same llama-cpp-python) on both machines"
                )
            (count,) = struct.unpack("<I", _call(sock, _CMD_DEVICE_COUNT, b"", 4))
            devices = []
            for i in range(count):
                raw = _call(sock, _CMD_GET_DEVICE_MEMORY, struct.pack("<I", i), 16)
                free, total = struct.unpack("<QQ", raw)
                devices.append(WorkerDevice(i, free, total))
    except TimeoutError:
        raise WorkerUnreachable(
            f"RPC worker {endpoint} did not answer within {timeout:g}s (not a worker, or "
            "busy serving another innkeeper)"
        ) from None
    except (OSError, ConnectionError) as exc:
        raise WorkerUnreachable(
            f"RPC worker {endpoint} is unreachable ({exc}): is `innkeeper worker` running "
            "there, and the tunnel up?"
        ) from None
    return WorkerInfo(endpoint, version, tuple(devices))
