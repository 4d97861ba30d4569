"""The GPU bench's whole pipeline on CPU (`python -m bench.gpu --smoke`), so a user's GPU run
does not break on a typo: shapes, the libraries under innkeeper, fit, the memory probes, the
paired rounds, the report.

No CUDA build and no llama-server here: the reference is a stand-in, a script that takes
llama-server's flags and runs `innkeeper serve` with the same settings (both sides are the real
engine on the real model files). innkeeper runs on the installed llama.cpp libraries through
the bench's own `llama_cpp` overlay, as it runs on the CUDA build on a GPU machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.gpu import build, memory, nvml, run, shapes  # noqa: E402

# llama-server's flags, as the bench passes them, to `innkeeper serve`'s.
STAND_IN = f"""#!{sys.executable}
import os, sys
FLAGS = {{"-t": "--threads", "-c": "--ctx-size", "-np": "--parallel", "-fa": "--flash-attn",
         "-ngl": "--gpu-layers", "--host": "--host", "--port": "--port"}}
args, out = sys.argv[1:], []
if args == ["--version"]:
    print("version: 0 (innkeeper standing in for llama-server)")
    sys.exit(0)
while args:
    flag = args.pop(0)
    if flag == "-m":
        out.insert(0, args.pop(0))
    elif flag == "-lv":
        args.pop(0)
    elif flag in FLAGS:
        out += [FLAGS[flag], args.pop(0)]
    elif flag not in ("-kvu", "--no-webui"):
        sys.exit(f"stand-in: unexpected llama-server flag {{flag}}")
os.environ["INNKEEPER_LLAMA_LOG"] = "1"  # llama.cpp's KV lines, as llama-server -lv 4 logs
os.execv(sys.executable, [sys.executable, "-m", "innkeeper", "serve", *out])
"""


def test_shapes_are_the_real_models_shapes(tmp_path: Path) -> None:
    from innkeeper.models.gguf_meta import read_gguf_spec
    from innkeeper.models.spec import format_params
    from innkeeper.models.store import default_model_path

    smol = read_gguf_spec(default_model_path())
    tiny = read_gguf_spec(shapes.write_model("tiny", tmp_path, default_model_path()))
    assert format_params(tiny.parameters) == format_params(smol.parameters)  # 134.52M
    big = read_gguf_spec(shapes.write_model("8b", tmp_path, default_model_path()))
    # Llama-3.1-8B's layers (8.03B with its 128k vocabulary) with SmolLM2's 49k one.
    assert format_params(big.parameters) == "7.38B"
    assert (tmp_path / "synthetic-8b.Q4_0.gguf").stat().st_blocks * 512 < 64 * 2**20  # sparse


def test_arguments_and_cuda_architectures() -> None:
    args = run.parse_args([])
    assert args.shapes == ["8b", "tiny"] and args.rounds == 3 and args.ctx_size == 8192
    smoke = run.parse_args(["--smoke"])
    assert smoke.shapes == ["tiny"] and smoke.rounds == 1 and smoke.out.name.endswith("-gpu-smoke")
    with pytest.raises(SystemExit):
        run.parse_args(["--shapes", "70b"])
    facts = [
        nvml.GpuFacts(0, "H100", "9.0", 81559, "580"),
        nvml.GpuFacts(1, "L4", "8.9", 22491, "580"),
    ]
    assert nvml.cuda_architectures(facts) == "89;90"
    rargs = run.bench_args(args, Path("/x/llama-server"))
    assert rargs.llama_arg == ["-ngl", "99"] and rargs.innkeeper_arg == ["--gpu-layers=auto"]
    assert rargs.flash_attn == "on" and rargs.scenarios == ["single", "prompt", "concurrency"]


def test_memory_table() -> None:
    plan = {"devices": [{"kind": "ram", "total_bytes": 1}, {"kind": "gpu", "total_bytes": 2**31}]}
    assert memory.planned_gpu_mib(plan) == 2048
    assert memory.planned_gpu_mib({"devices": [{"kind": "ram", "total_bytes": 1}]}) is None
    rows = {
        "8b": [
            memory.Footprint("innkeeper", "auto", 5000.0, 5100.0, answered=True).as_dict(),
            memory.Footprint("llama-server", "99", None, error="exited with 1\nlog").as_dict(),
        ]
    }
    table = memory.render(rows).splitlines()
    assert table[2] == "| 8b | innkeeper | auto | 5,000 | 5,100 | 1.02 | yes |"
    assert table[3] == "| 8b | llama-server | 99 | n/a | n/a | n/a | no: exited with 1 |"


@pytest.mark.slow  # starts real servers: not in `make test-fast`
def test_smoke_run_end_to_end(tmp_path: Path) -> None:
    stand_in = tmp_path / "bin" / "llama-server"
    stand_in.parent.mkdir()
    stand_in.write_text(STAND_IN)
    stand_in.chmod(0o755)
    # A copy of the installed libraries, so that loading from it can be told apart.
    lib_dir = tmp_path / "libs"
    shutil.copytree(build.installed_llama_cpp() / "lib", lib_dir, symlinks=True)
    out = tmp_path / "out"
    env = {**os.environ, "INNKEEPER_BENCH_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "bench.gpu", "--smoke", "--threads", "1"]
    cmd += ["--llama-server", str(stand_in), "--lib-dir", str(lib_dir), "--out", str(out)]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert time.monotonic() - start < 120

    result = json.loads((out / "results.json").read_text())
    assert result["gpu"]["lib_dir"] == str(lib_dir)
    # innkeeper ran on lib_dir's libllama, through the bench's copy of the llama_cpp package.
    assert result["gpu"]["libllama"] == str((lib_dir / "libllama.so").resolve())
    assert result["gpu"]["offload"] is False

    [rows] = result["memory"].values()
    assert [r["gpu_layers"] for r in rows] == ["auto", "15", "99"]
    assert all(r["answered"] for r in rows), rows
    assert rows[0]["planned_mib"] is None  # no GPU here: fit plans nothing on one

    tiny = result["models"]["tiny"]
    assert tiny["rounds_done"] == 1 and not tiny["interrupted"]
    cand = tiny["rounds"][0]["cand"]
    for metric in ("decode_tps", "pp_tps", "agg_c1", "agg_c2"):
        assert cand[metric] > 0, metric
    assert cand["failed_total"] == 0
    assert tiny["kv_mib"]["cand"] and tiny["kv_mib"]["ref4"]  # both logs were read

    md = (out / "results.md").read_text()
    assert md.startswith("# innkeeper GPU bench, ")
    assert "## GPU memory" in md and "| tiny | innkeeper | auto |" in md
    assert "SmolLM2-135M shape, synthetic Q4_0 (tiny)" in md
    assert "single-stream decode ≥ 0.97x llama-server -np 1" in md
