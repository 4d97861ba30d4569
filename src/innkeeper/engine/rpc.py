"""llama.cpp's RPC backend: other machines' devices as if they were local GPUs.

A worker (`innkeeper worker`) runs ggml's RPC server over its own devices; the main process
adds each worker's devices to a model's device list and llama.cpp places layers on them.

ggml's client aborts the whole process when a worker cannot be reached or speaks another
protocol version, so every endpoint is first asked in Python (rpc_probe): a bad worker is one
typed error naming it, before any weights move and before llama.cpp ever connects.

A worker that dies while a model uses it fails inside ggml's per-worker dispatcher thread,
which then aborts: llama_decode has no way to return it as an error. While a listener is
registered (`on_worker_lost`: the server), the abort hook below names the worker gone, tells
the listeners, and parks that thread for good instead: the process lives on, and every model
on that worker is wrecked (its engine thread waits forever inside llama_decode; its buffers
cannot be freed). The next load reaches the restarted worker under a new spelling of its
address (`_spelling`), since ggml keeps the dead connection under the old one.

A worker that dies during a load (`loading`: the weights are on their way) fails the same
way, in the dispatcher, while the loading thread waits for it forever inside llama.cpp: the
listeners are told, and the server abandons that load. ggml's failure can also land on the
loading thread itself, when it connects (get_dispatcher: connect and HELLO). That thread holds
ggml's static dispatcher mutex then (and add_server's, or buffer_type's), and every later
use of any worker takes it (loads, and each decode of a pipelined model: event_synchronize),
so parking it would hang them all: the process exits instead, naming the worker. A load
keeps one connection per worker open from its first (`_pin`, just after the probe) to its
end, so that is the one moment it can happen: ggml would otherwise reconnect several times
in the middle of llama_model_load.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import llama_cpp as C
import psutil

from innkeeper.engine.devices import LocalDevice, ggml_registry, local_gpus
from innkeeper.engine.llama_params import ggml_library
from innkeeper.engine.rpc_probe import (
    RpcError,
    RpcUnavailable,
    WorkerInfo,
    probe,
)
from innkeeper.models.hardware import GPU, Hardware


def with_workers(hw: Hardware, endpoints: tuple[str, ...]) -> Hardware:
    """`hw` with each worker's devices as GPUs in front of the local ones (llama.cpp's order),
    sized by what the workers report free: the memory plan then splits layers across them
    as llama.cpp will. RpcError for a worker that does not answer."""
    remote = [
        GPU(
            0,
            f"RPC {info.endpoint}" + (f" #{d.index}" if len(info.devices) > 1 else ""),
            d.total_bytes,
            d.free_bytes,
            info.endpoint,
        )
        for info in (ask(e) for e in endpoints)
        for d in info.devices
    ]
    gpus = [replace(g, index=i) for i, g in enumerate((*remote, *hw.gpus))]
    return replace(hw, gpus=tuple(gpus))


def transfer_per_token(n_embd: int, n_devices: int) -> int:
    """Bytes that cross the network per generated token: the f32 hidden state, once per
    hand-over between consecutive devices (llama.cpp's layer split runs them in turn)."""
    return 4 * n_embd * max(n_devices - 1, 0)


# A worker serves one connection at a time, and ggml keeps one per endpoint for as long as a
# model here uses it: a probe of such a worker would wait for nothing. Its last answer is used.
_in_use: dict[str, int] = {}
_last: dict[str, WorkerInfo] = {}
_lock = threading.Lock()


def ask(endpoint: str) -> WorkerInfo:
    """`probe`, or the last answer while a model of this process holds the worker."""
    with _lock:
        if _in_use.get(endpoint) and endpoint in _last:
            return _last[endpoint]
    info = probe(endpoint)
    with _lock:
        _last[endpoint] = info
    return info


_loading: dict[str, int] = {}  # endpoint -> loads in flight across it (`loading`)
_here = threading.local()  # .pins: the backends a load on this thread keeps open (`_pin`)


@contextlib.contextmanager
def loading(endpoints: tuple[str, ...]) -> Iterator[None]:
    """Run a load across `endpoints` (a model, its context) on this thread. A worker lost
    meanwhile is found and named like one in use, with the listeners told (the server then
    abandons the load, whose thread waits in llama.cpp for good); each worker's connection
    stays open from the first to the end of the load (`_pin`)."""
    with _lock:
        for e in endpoints:
            _loading[e] = _loading.get(e, 0) + 1
    _here.pins = pins = []
    try:
        yield
    finally:
        _here.pins = None
        with _lock:
            for e in endpoints:
                _loading[e] = max(_loading.get(e, 0) - 1, 0)
        free = ggml_library("libggml-base").ggml_backend_free
        free.restype, free.argtypes = None, [ctypes.c_void_p]
        for backend in pins:  # the model's buffers keep the connection if it loaded
            free(backend)


def _pin(lib: ctypes.CDLL, address: bytes) -> None:
    """Within `loading`: open ggml's connection to a worker now, just after its probe, and
    keep it until the load ends. ggml drops a connection as soon as nothing holds it, and
    would open one again (on this thread, holding its locks) for each step of the load."""
    pins = getattr(_here, "pins", None)
    if pins is None:
        return
    _hook_abort()  # a worker lost from here on is named, not just fatal
    backend = lib.ggml_backend_rpc_init(address, 0)  # device 0: the probe found one at least
    if not backend:
        raise RpcError(f"RPC worker {address.decode()} offers no device")
    pins.append(backend)


def hold(endpoints: tuple[str, ...], held: bool) -> None:
    """Count a loaded model's use of its workers (`held`), or its release. A load that
    succeeded with a worker also ends its "lost" mark: it is back."""
    with _lock:
        for e in endpoints:
            _in_use[e] = max(_in_use.get(e, 0) + (1 if held else -1), 0)
            if held:
                _lost.pop(e, None)
    if held:
        _hook_abort()


# ---- a worker that dies while a model uses it -----------------------------------------------

LostListener = Callable[[tuple[str, ...], str], None]

_lost: dict[str, float] = {}  # endpoint -> when it was found gone (time.time())
# endpoint -> the address string ggml is given for it: ggml caches a connection (and the
# devices) per string, and a lost worker's connection is dead for good, so a reload names the
# same host:port another way (one more leading zero on the port: ggml reads it with stoi).
_spelling: dict[str, str] = {}
_listeners: list[LostListener] = []
_ABORT = ctypes.CFUNCTYPE(None, ctypes.c_char_p)
_on_abort = None  # kept alive for as long as ggml may call it


def on_worker_lost(listener: LostListener) -> Callable[[], None]:
    """Call `listener(endpoints, message)` when workers in use are found gone (on ggml's
    thread: it must only hand the news on). Returns the function that unregisters it. While
    none is registered, a lost worker ends the process, as ggml would (with a line naming it)."""
    with _lock:
        _listeners.append(listener)

    def remove() -> None:
        with _lock:
            if listener in _listeners:
                _listeners.remove(listener)

    return remove


def lost_workers() -> dict[str, float]:
    """Workers found gone since a load last used them: endpoint -> since (time.time())."""
    with _lock:
        return dict(_lost)


def spelled(endpoint: str) -> str:
    """The address ggml is given for `endpoint` now (see `_spelling`)."""
    with _lock:
        return _spelling.get(endpoint, endpoint)


def _respelled(address: str) -> str:
    host, _, port = address.rpartition(":")
    return f"{host}:0{port}"


def _established(endpoint: str, conns: list) -> bool:
    """Whether this process holds an open TCP connection to the worker at `endpoint`."""
    host, _, port = endpoint.rpartition(":")
    try:
        ip = socket.gethostbyname(host)  # ggml's client resolves the same way (IPv4)
    except OSError:
        return False
    return any(
        c.raddr and c.raddr.ip == ip and c.raddr.port == int(port) and c.status == "ESTABLISHED"
        for c in conns
    )


def _refuses(endpoint: str) -> bool:
    host, _, port = endpoint.rpartition(":")
    try:  # a live worker accepts into its backlog (it serves our connection); a dead one refuses
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        return True
    return False


def _find_lost() -> tuple[str, ...]:
    """The workers in use (or loading) whose connection is gone: the kernel closed it when the worker
    died (or an SSH tunnel dropped it), while a live worker's stays established. Failing
    that, those that refuse a connection; failing that, every worker in use."""
    with _lock:
        used = [e for e, n in (*_in_use.items(), *_loading.items()) if n]
        used = list(dict.fromkeys(used))
    try:
        conns = psutil.Process().net_connections(kind="tcp4")
        gone = [e for e in used if not _established(e, conns)]
    except psutil.Error:
        gone = []
    return tuple(gone or [e for e in used if _refuses(e)] or used)


def _name_lost_workers(message: bytes | None) -> None:
    """ggml's abort hook while workers are in use. A worker that dies mid-generation makes
    ggml's dispatcher thread abort: with listeners, the worker is marked lost, they are told,
    and this thread (ggml's, holding no lock) never returns, so the process survives."""
    text = (message or b"").decode("utf-8", "replace").strip()
    if "RPC" not in text:  # any other abort: what ggml itself would print
        os.write(2, f"{text}\n".encode())
        ggml_library("libggml-base").ggml_print_backtrace()
        return
    gone = _find_lost()
    who = ", ".join(gone) or "?"
    text = text.rsplit(": ", 1)[-1]  # ggml's words, without its source path and line
    # A thread of ours (a load connecting) holds ggml's dispatcher mutex: parking it would
    # stall every later use of any worker (see the module's docstring), so only ggml's own
    # dispatcher threads are parked.
    ggml_thread = isinstance(threading.current_thread(), threading._DummyThread)
    with _lock:
        listeners = list(_listeners) if ggml_thread else []
        if listeners:
            for e in gone:
                _lost[e] = time.time()
                _in_use[e] = 0  # the wrecked models' holds: the worker is free to answer
                _loading[e] = 0  # the abandoned loads' (their threads never return)
                _spelling[e] = _respelled(_spelling.get(e, e))
    if not listeners:
        os.write(
            2,
            f"error: RPC worker {who} stopped answering ({text}); llama.cpp cannot continue "
            "without it, so innkeeper exits: restart the worker, then innkeeper\n".encode(),
        )
        return
    why = f"RPC worker {who} is gone ({text})"
    for listener in listeners:
        try:
            listener(gone, why)
        except Exception as exc:  # one listener's failure must not spare the process less
            os.write(2, f"error: while handling a lost RPC worker: {exc!r}\n".encode())
    threading.Event().wait()  # park ggml's dispatcher thread: returning would abort()


def _hook_abort() -> None:
    global _on_abort
    if _on_abort is None:
        _on_abort = _ABORT(_name_lost_workers)
        fn = ggml_library("libggml-base").ggml_set_abort_callback
        fn.restype, fn.argtypes = ctypes.c_void_p, [_ABORT]
        fn(_on_abort)


# ---- ggml's backend registry, through ctypes ------------------------------------------------


def _lib_dir() -> Path:
    return Path(C.__file__).parent / "lib"


def available() -> bool:
    """Whether this llama-cpp-python was built with GGML_RPC (it ships libggml-rpc)."""
    return (_lib_dir() / "libggml-rpc.so").is_file()


UNAVAILABLE = (
    "this llama-cpp-python was built without RPC (no libggml-rpc.so): run `make install`, "
    "which rebuilds it with -DGGML_RPC=ON"
)


def _rpc() -> ctypes.CDLL:
    if not available():
        raise RpcUnavailable(UNAVAILABLE)
    lib = ggml_library("libggml-rpc")
    vp, size = ctypes.c_void_p, ctypes.c_size_t
    lib.ggml_backend_rpc_add_server.restype = vp
    lib.ggml_backend_rpc_add_server.argtypes = [ctypes.c_char_p]
    lib.ggml_backend_rpc_init.restype = vp
    lib.ggml_backend_rpc_init.argtypes = [ctypes.c_char_p, ctypes.c_uint32]
    lib.ggml_backend_rpc_start_server.restype = None
    lib.ggml_backend_rpc_start_server.argtypes = [
        ctypes.c_char_p,
        ctypes.c_char_p,
        size,
        size,
        ctypes.POINTER(vp),
    ]
    return lib


def model_devices(endpoints: tuple[str, ...]) -> list[int]:
    """The device list of a load across workers: every worker's devices (in --rpc order),
    then this machine's GPUs, as llama.cpp orders them (workers first: fewer transfers).

    Each worker is probed first, so an unreachable or mismatched one is an RpcError here
    and never reaches ggml's client, which would abort the process.
    """
    lib = _rpc()
    for endpoint in endpoints:
        info = ask(endpoint)
        if not info.devices:
            raise RpcError(f"RPC worker {endpoint} offers no device")
    ggml = ggml_registry()
    devices: list[int] = []
    for endpoint in endpoints:
        address = spelled(endpoint).encode()
        _pin(lib, address)
        reg = lib.ggml_backend_rpc_add_server(address)
        if not reg:
            raise RpcError(f"RPC worker {endpoint} offers no device")
        _added[endpoint] = [
            int(ggml.ggml_backend_reg_dev_get(reg, i))
            for i in range(ggml.ggml_backend_reg_dev_count(reg))
        ]
        devices += _added[endpoint]
    return devices + [d.ptr for d in local_gpus()]


_added: dict[str, list[int]] = {}  # endpoint -> its devices now (ggml keeps them all for good)


def device_labels() -> dict[str, str]:
    """ggml's name of each worker device added so far -> `RPC0 [host:port]`."""
    ggml = ggml_registry()
    out = {}
    for endpoint, devices in _added.items():
        for dev in devices:
            name = (ggml.ggml_backend_dev_name(dev) or b"").decode()
            out[name] = f"{name} [{endpoint}]"
    return out


def start_server(
    endpoint: str, devices: list[LocalDevice], threads: int, cache_dir: Path | None
) -> None:
    """Run ggml's RPC server over `devices`; blocks for as long as it serves (returns only
    when it cannot start, e.g. the port is taken)."""
    lib = _rpc()
    arr = (ctypes.c_void_p * len(devices))(*[d.ptr for d in devices])
    cache = str(cache_dir).encode() if cache_dir is not None else None
    lib.ggml_backend_rpc_start_server(endpoint.encode(), cache, threads, len(devices), arr)
