"""serve's settings from their one declaration: GPU flags, load modes and the library load order.

Every flag reaches llama.cpp (read back from the structs in test_backend.py) and the memory plan
(tests/models/test_memory.py); here: the CLI surface, real server processes and their memory.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from innkeeper.cli import app
from innkeeper.cli.serve import build_config
from innkeeper.models.store import default_model_path
from innkeeper.settings import ConfigError
from innkeeper.settings.server import ServerConfig
from tests.cli.test_serve_cli import assert_one_error_line, serve
from tests.helpers import REPO, free_port, run_server

pytestmark = pytest.mark.slow  # starts real servers or browsers: not in `make test-fast`


def config(*args: str) -> ServerConfig:
    """The ServerConfig `innkeeper serve ARGS` would run with (typer's parsing, then ours)."""
    import innkeeper.cli.server

    captured: list[ServerConfig] = []
    real = innkeeper.cli.server.run_server
    innkeeper.cli.server.run_server = lambda cfg, **_: captured.append(cfg)  # type: ignore[assignment]
    try:
        result = CliRunner().invoke(app, ["serve", *args])
    finally:
        innkeeper.cli.server.run_server = real
    assert result.exit_code == 0, result.output
    return captured[0]


def test_flags_and_aliases_build_one_config() -> None:
    cfg = config(
        "-c", "1024", "-ngl", "all", "-t", "3", "-b", "256", "-ub", "128", "-np", "2",
        "-fa", "ON", "--cache-type", "q8_0", "-ctv", "q4_0", "-mg", "1", "-sm", "row",
        "-ts", "3,1", "-nkvo", "-ncmoe", "5", "--no-mmap", "--mlock", "--port", "5999",
    )  # fmt: skip
    e = cfg.engine
    assert (e.ctx_size, e.gpu_layers, e.threads, e.batch_size, e.ubatch_size) == (
        1024, 999, 3, 256, 128,
    )  # fmt: skip
    assert (e.parallel, e.flash_attn, e.cache_type_k, e.cache_type_v) == (2, "on", "q8_0", "q4_0")
    assert (e.main_gpu, e.split_mode, e.tensor_split) == (1, "row", (3.0, 1.0))
    assert (e.kv_offload, e.cpu_moe, e.n_cpu_moe, e.use_mmap, e.use_mlock) == (
        False, False, 5, False, True,
    )  # fmt: skip
    assert cfg.port == 5999
    many = config(
        "--api-key", "k1", "--api-key", "k2", "--allow-host", "My-PC.lan.",
        "--cors-origin", "http://localhost:8000/", "--cors-origin", "*",
    )  # fmt: skip
    assert many.api_keys == ("k1", "k2")  # repeatable options keep every value, parsed
    assert many.allowed_hosts == ("my-pc.lan",)
    assert many.cors_origins == ("http://localhost:8000", "*")
    defaults = config()
    assert defaults.engine.gpu_layers is None and defaults.engine.kv_offload
    assert defaults.engine.cache_type_k == defaults.engine.cache_type_v == "f16"
    assert config("--cpu-moe").engine.cpu_tensor_patterns == (
        r"\.ffn_(up|down|gate|gate_up)_(ch|)exps",
    )
    assert config("--n-cpu-moe", "2").engine.cpu_tensor_patterns == (
        r"blk\.0\.ffn_(up|down|gate|gate_up)_(ch|)exps",
        r"blk\.1\.ffn_(up|down|gate|gate_up)_(ch|)exps",
    )


def test_help_lists_every_flag() -> None:
    out = CliRunner().invoke(app, ["serve", "--help"], env={"COLUMNS": "200"}).output
    for flag in (
        "--main-gpu", "--tensor-split", "--split-mode", "--no-kv-offload", "--cpu-moe",
        "--n-cpu-moe", "-ctk", "-ctv", "--no-mmap", "--mlock", "-ngl", "-ub", "-np", "-fa",
    ):  # fmt: skip
        assert flag in out, flag
    assert "KV cache type for K" in out and "KV cache type for V" in out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--tensor-split", "a,b"], "--tensor-split"),
        (["--main-gpu", "-1"], "--main-gpu"),
        (["--n-cpu-moe", "-3"], "--n-cpu-moe"),
        (["--split-mode", "diagonal"], "--split-mode"),
        (["--split-mode", "none", "--tensor-split", "1,1"], "--tensor-split"),
    ],
)
def test_bad_gpu_flags(args: list[str], needle: str) -> None:
    assert_one_error_line(serve(*args), needle)


def test_validation_is_the_declarations() -> None:
    with pytest.raises(ConfigError, match="--port must be between 1 and 65535"):
        build_config(default_model_path(), {"port": 0})
    with pytest.raises(ConfigError, match="unknown cache type 'q3'"):
        build_config(default_model_path(), {"cache_type": "q3"})


# ---- --no-mmap / --mlock on a real server ------------------------------------------------------


def _maps_model(pid: int, model: Path) -> bool:
    return str(model.resolve()) in Path(f"/proc/{pid}/maps").read_text()


def _status(pid: int, key: str) -> int:
    m = re.search(rf"^{key}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    assert m, key
    return int(m.group(1))


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_no_mmap_reads_the_model_instead_of_mapping_it() -> None:
    model = default_model_path()
    with run_server("--ctx-size", "512", "--parallel", "1", name="mmap") as srv:
        assert _maps_model(srv.proc.pid, model)
    with run_server("--ctx-size", "512", "--parallel", "1", "--no-mmap", name="nommap") as srv:
        assert not _maps_model(srv.proc.pid, model)
        r = httpx.post(f"{srv.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 200


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_mlock_locks_the_model() -> None:
    with run_server("--ctx-size", "512", "--parallel", "1", "--mlock", name="mlock") as srv:
        size = default_model_path().stat().st_size
        assert _status(srv.proc.pid, "VmLck") * 1024 >= size * 0.9


@pytest.mark.skipif(not shutil.which("prlimit"), reason="needs util-linux prlimit")
def test_mlock_over_the_limit_is_one_clear_error() -> None:
    cmd = ["prlimit", "--memlock=0:0"]
    if os.geteuid() == 0:  # root locks past any limit with CAP_IPC_LOCK: drop it first
        if not shutil.which("setpriv"):
            pytest.skip("needs setpriv to drop CAP_IPC_LOCK as root")
        cmd += ["setpriv", "--inh-caps=-ipc_lock", "--bounding-set=-ipc_lock"]
    proc = subprocess.run(
        [*cmd, sys.executable, "-m", "innkeeper", "serve", "--port", str(free_port()), "--mlock"],
        capture_output=True,
        text=True,
        timeout=60,  # without the check the server just runs: a timeout fails the test
    )
    assert_one_error_line(proc, "ulimit -l")


# ---- llama.cpp's libraries load before numpy, in every process that may load a model -----------

PROBE = textwrap.dedent(
    """
    import os, sys

    class _Probe:
        def find_spec(self, name, path=None, target=None):
            if name == "numpy":
                sys.meta_path.remove(self)
                maps = open("/proc/self/maps").read()
                order = "llama-first" if "libllama.so" in maps else "numpy-first"
                with open(os.environ["LOAD_ORDER_OUT"], "a") as fh:
                    fh.write(f"{os.getpid()} {order} {' '.join(sys.argv[:3])}\\n")
            return None

    sys.meta_path.insert(0, _Probe())
    """
)


@pytest.fixture()
def probe(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """Every Python process started with this env records whether libllama was mapped when
    numpy was first imported (a sitecustomize on PYTHONPATH: inherited by child processes)."""
    (tmp_path / "sitecustomize.py").write_text(PROBE)
    out = tmp_path / "order.txt"
    path = os.pathsep.join([str(tmp_path), str(REPO), os.environ.get("PYTHONPATH", "")])
    return {"PYTHONPATH": path, "LOAD_ORDER_OUT": str(out)}, out


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_libllama_loads_before_numpy(probe: tuple[dict[str, str], Path]) -> None:
    env, out = probe
    with run_server("--ctx-size", "512", "--parallel", "1", env=env, name="order") as srv:
        assert httpx.get(f"{srv.url}/health").status_code == 200
    model = str(default_model_path())
    for args in (["fit", model, "--measure", "--json"], ["doctor", "--json"]):
        subprocess.run(
            [sys.executable, "-m", "innkeeper", *args],
            env={**os.environ, **env},
            capture_output=True,
            timeout=180,
        )
    lines = out.read_text().splitlines()
    # serve, fit, fit --measure's child (python -c) and doctor each imported numpy
    assert len(lines) >= 4, lines
    assert all(" llama-first " in f"{line} " for line in lines), lines


# ---- the plan and serve agree on GPUs ----------------------------------------------------------


def test_serve_splits_several_gpus_as_the_plan(tmp_path: Path) -> None:
    """`fit --vram 24GiB,12GiB` plans 22+11 layers; serve passes that split to llama.cpp."""
    from innkeeper.engine.planning import planned_engine
    from innkeeper.models.hardware import GPU, Hardware
    from innkeeper.models.memory import auto_settings
    from tests.models.gguf_factory import LLAMA3_8B, write_shape

    GIB = 1024**3
    path = write_shape(tmp_path / "llama8b.gguf", LLAMA3_8B)
    two = Hardware(
        64 * GIB, 64 * GIB, (GPU(0, "a", 24 * GIB, 24 * GIB), GPU(1, "b", 12 * GIB, 12 * GIB))
    )
    cfg = build_config(path, {"ctx_size": 4096}).engine
    auto = auto_settings(cfg, two)
    assert [d.layers for d in auto.plan.devices[1:]] == [22, 11]
    assert planned_engine(cfg, auto).tensor_split == (22.0, 11.0)
    given = build_config(path, {"ctx_size": 4096, "tensor_split": "1,1"}).engine
    assert planned_engine(given, auto).tensor_split == (1.0, 1.0)  # the user's split wins
    single = build_config(path, {"ctx_size": 4096, "split_mode": "none"}).engine
    assert planned_engine(single, auto).tensor_split is None


def test_fit_plans_cpu_moe(tmp_path: Path) -> None:
    import json

    from tests.models.gguf_factory import MIXTRAL_TINY, write_shape

    path = write_shape(tmp_path / "mixtral.gguf", MIXTRAL_TINY)

    def fit(*args: str) -> dict:
        proc = subprocess.run(
            [sys.executable, "-m", "innkeeper", "fit", str(path), "-c", "4096", "--json",
             "--vram", "1200MiB", "--ram", "32GiB", *args],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        return json.loads(proc.stdout)

    base, moe = fit(), fit("--cpu-moe")
    assert base["gpu_layers"] < moe["gpu_layers"] == 9
    assert moe["devices"][0]["weights_bytes"] > base["devices"][0]["weights_bytes"]
    nkvo = fit("--no-kv-offload", "-ngl", "9")
    assert nkvo["devices"][1]["kv_cache_bytes"] == 0
    bad = subprocess.run(
        [sys.executable, "-m", "innkeeper", "fit", str(path), "--n-cpu-moe", "-3"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert_one_error_line(bad, "--n-cpu-moe")


def test_gpu_flags_serve_on_a_cpu_build() -> None:
    """The flags go to llama.cpp even where they change nothing (no GPU, no experts in
    SmolLM2: the --cpu-moe pattern matches no tensor); the server loads and answers."""
    args = ("--ctx-size", "512", "--parallel", "1", "--cpu-moe", "-nkvo", "-sm", "none")
    with run_server(*args, name="gpuflags") as srv:
        r = httpx.post(f"{srv.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
