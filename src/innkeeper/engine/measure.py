"""Ask llama.cpp itself what a model needs: a dry-run load that allocates nothing.

llama.cpp (the build inside llama-cpp-python 0.3.36) can load a model with `no_alloc`: it builds
every buffer, KV cache and worst-case compute graph and logs their sizes, but allocates none of
them, so an 8B model is "loaded" in a fraction of a second with no memory. We read the numbers
from its log lines ("KV cache size", "compute buffer size", "output buffer size") and the model
size from `llama_model_size`.

The load runs in a child process: llama.cpp aborts the whole process on some invalid inputs
(a GGML_ASSERT), and the log callback is process-global, so neither may touch the server.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from innkeeper.models.spec import ModelFormatError
from innkeeper.settings import ConfigError
from innkeeper.settings.engine import CACHE_TYPES

MIB = 1024**2

_KV_RE = re.compile(
    r"llama_kv_cache: size =\s*([\d.]+) MiB \(\s*(\d+) cells,\s*(\d+) layers.*?"
    r"K \((\w+)\):\s*([\d.]+) MiB, V \((\w+)\):\s*([\d.]+) MiB"
)
_COMPUTE_RE = re.compile(r"(\S+) compute buffer size =\s*([\d.]+) MiB")
_OUTPUT_RE = re.compile(r"(\S+)\s+output buffer size =\s*([\d.]+) MiB")
_MODEL_RE = re.compile(r"(\S+) model buffer size =\s*([\d.]+) MiB")


@dataclass
class Measurement:
    """What llama.cpp reported for one load. Sizes are bytes (log values are 0.01 MiB exact)."""

    model_bytes: int
    kv_cache_bytes: int
    k_bytes: int
    v_bytes: int
    compute_bytes: int
    output_bytes: int
    kv_cells: list[int] = field(default_factory=list)
    compute_by_device: dict[str, int] = field(default_factory=dict)
    model_by_buffer: dict[str, int] = field(default_factory=dict)
    dry_run: bool = True

    @property
    def total_bytes(self) -> int:
        return self.model_bytes + self.kv_cache_bytes + self.compute_bytes + self.output_bytes

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "total_bytes": self.total_bytes}


def parse_log(text: str, model_bytes: int, dry_run: bool) -> Measurement:
    """Pull the buffer sizes out of llama.cpp's load log."""
    k = v = 0
    cells: list[int] = []
    for m in _KV_RE.finditer(text):
        cells.append(int(m.group(2)))
        k += round(float(m.group(5)) * MIB)
        v += round(float(m.group(7)) * MIB)
    compute = {m.group(1): round(float(m.group(2)) * MIB) for m in _COMPUTE_RE.finditer(text)}
    output = sum(round(float(m.group(2)) * MIB) for m in _OUTPUT_RE.finditer(text))
    buffers = {m.group(1): round(float(m.group(2)) * MIB) for m in _MODEL_RE.finditer(text)}
    return Measurement(
        model_bytes=model_bytes,
        kv_cache_bytes=k + v,
        k_bytes=k,
        v_bytes=v,
        compute_bytes=sum(compute.values()),
        output_bytes=output,
        kv_cells=cells,
        compute_by_device=compute,
        model_by_buffer=buffers,
        dry_run=dry_run,
    )


def _worker(args: dict[str, object]) -> dict[str, object]:
    """Runs in the child: load with llama.cpp, capture the log, report sizes as JSON."""
    import llama_cpp

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def on_log(level: int, text: bytes, user: object) -> None:
        lines.append(text.decode("utf-8", errors="replace"))

    llama_cpp.llama_log_set(on_log, None)
    llama_cpp.llama_backend_init()
    dry_run = bool(args["dry_run"])
    from innkeeper.engine.llama_params import set_fields  # in the child only: it loads llama.cpp

    mp = llama_cpp.llama_model_default_params()
    gpu_layers = int(args["gpu_layers"])  # type: ignore[call-overload]
    # CPU weight repacking would double-count the weights
    set_fields(mp, n_gpu_layers=gpu_layers, use_extra_bufts=False)
    if dry_run:
        # no_alloc requires no mmap (llama.cpp asserts otherwise)
        set_fields(mp, no_alloc=True, load_mode=llama_cpp.LLAMA_LOAD_MODE_NONE)
    model = llama_cpp.llama_model_load_from_file(str(args["path"]).encode(), mp)
    if not model:
        raise SystemExit("llama.cpp could not load the model:\n" + "".join(lines[-20:]))
    cp = llama_cpp.llama_context_default_params()
    set_fields(
        cp,
        n_ctx=int(args["ctx_size"]),  # type: ignore[call-overload]
        n_batch=int(args["n_batch"]),  # type: ignore[call-overload]
        n_ubatch=int(args["n_ubatch"]),  # type: ignore[call-overload]
        n_seq_max=int(args["parallel"]),  # type: ignore[call-overload]
        flash_attn_type=1 if args["flash_attn"] else 0,
        type_k=CACHE_TYPES[str(args["cache_type_k"])].ggml_type,
        type_v=CACHE_TYPES[str(args["cache_type_v"])].ggml_type,
        swa_full=bool(args["swa_full"]),
        kv_unified=bool(args["kv_unified"]),
    )
    ctx = llama_cpp.llama_init_from_model(model, cp)
    if not ctx:
        raise SystemExit("llama.cpp could not create the context:\n" + "".join(lines[-20:]))
    model_bytes = int(llama_cpp.llama_model_size(model))
    return parse_log("".join(lines), model_bytes, dry_run).to_json()


def measure(
    model_path: Path | str,
    ctx_size: int,
    cache_type: str = "f16",
    flash_attn: bool = True,
    gpu_layers: int = 0,
    parallel: int = 1,
    n_batch: int = 512,
    n_ubatch: int = 512,
    swa_full: bool = True,
    kv_unified: bool = False,
    cache_type_v: str | None = None,
    dry_run: bool = True,
    timeout: float = 300.0,
) -> Measurement:
    """Load `model_path` with llama-cpp-python in a child process and report its allocations.

    `dry_run=True` uses llama.cpp's `no_alloc` (nothing allocated, sub-second even for large
    models); `dry_run=False` loads for real with mmap, the way the server will.
    """
    args = {
        "path": str(Path(model_path).resolve()),
        "ctx_size": ctx_size,
        "cache_type_k": cache_type,
        "cache_type_v": cache_type_v or cache_type,
        "flash_attn": flash_attn,
        "gpu_layers": gpu_layers,
        "parallel": parallel,
        "n_batch": n_batch,
        "n_ubatch": n_ubatch,
        "swa_full": swa_full,
        "kv_unified": kv_unified,
        "dry_run": dry_run,
    }
    for name in (args["cache_type_k"], args["cache_type_v"]):
        if name not in CACHE_TYPES:
            raise ConfigError(f"unknown cache type {name!r}")
    code = (
        "import json, sys\n"
        "from innkeeper.engine.measure import _worker\n"
        "print('@@RESULT@@' + json.dumps(_worker(json.loads(sys.argv[1]))))\n"
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code, json.dumps(args)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise ModelFormatError(f"measuring {model_path} took over {timeout:.0f} s") from None
    for line in proc.stdout.splitlines():
        if line.startswith("@@RESULT@@"):
            data = json.loads(line[len("@@RESULT@@") :])
            data.pop("total_bytes", None)
            return Measurement(**data)
    detail = (proc.stderr.strip() or proc.stdout.strip()).splitlines()[-3:]
    raise ModelFormatError(
        f"llama.cpp could not load {model_path} (exit {proc.returncode}): " + " | ".join(detail)
    )
