"""`innkeeper inspect` and `innkeeper fit`: real command runs, JSON keys, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from innkeeper.cli import app
from innkeeper.models.store import default_model_path
from tests.models import fakehub
from tests.models import gguf_factory as factory
from tests.models.fakehub import FakeHub

fake_hub = fakehub.fake_hub  # the pull helper's fake hub fixtures
hub_sources = fakehub.hub_sources
SMOL = str(default_model_path())
runner = CliRunner()

INSPECT_KEYS = {
    "format",
    "quantization",
    "architecture",
    "parameters",
    "context_length",
    "chat_template_name",
    "complete",
    "safe",
}
FIT_KEYS = {
    "weights_bytes",
    "kv_cache_bytes",
    "compute_bytes",
    "overhead_bytes",
    "total_bytes",
    "gpu_layers",
    "verdict",
    "devices",
}


def run(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.output


def test_inspect_json_keys() -> None:
    code, out = run("inspect", SMOL, "--json")
    assert code == 0, out
    data = json.loads(out)
    assert data.keys() >= INSPECT_KEYS
    assert data["format"] == "gguf" and data["chat_template_name"] == "chatml"


def test_inspect_table() -> None:
    code, out = run("inspect", SMOL)
    assert code == 0, out
    for word in ("Q4_1", "chatml", "8,192", "safe", "30 layers"):
        assert word in out


def test_fit_json_keys_and_numbers() -> None:
    code, out = run(
        "fit",
        SMOL,
        "--ctx-size",
        "4096",
        "--cache-type",
        "q8_0",
        "--ram",
        "8GiB",
        "--vram",
        "0",
        "--json",
    )
    assert code == 0, out
    data = json.loads(out)
    assert data.keys() >= FIT_KEYS
    assert data["verdict"] == "fits in RAM" and data["gpu_layers"] == 0
    assert data["kv_cache_bytes"] == 2 * 30 * 4096 * (192 // 32 * 34)
    parts = ("weights_bytes", "kv_cache_bytes", "compute_bytes", "overhead_bytes")
    assert data["total_bytes"] == sum(data[k] for k in parts)


def test_fit_with_pretend_gpu(tmp_path: Path) -> None:
    model = factory.write_shape(tmp_path / "l3.gguf", factory.LLAMA3_8B)
    code, out = run("fit", str(model), "-c", "8192", "--vram", "6GiB", "--ram", "32GiB", "--json")
    data = json.loads(out)
    assert code == 0 and data["verdict_code"] == "partial"
    assert data["verdict"] == f"fits with {data['gpu_layers']} layers offloaded"
    assert [d["kind"] for d in data["devices"]] == ["ram", "gpu"]
    code, out = run("fit", str(model), "-c", "8192", "--vram", "24GiB")
    assert code == 0 and "fits in VRAM" in out


def test_fit_measure_agrees() -> None:
    code, out = run("fit", SMOL, "-c", "2048", "--vram", "0", "--measure", "--json")
    assert code == 0, out
    data = json.loads(out)
    m = data["measured"]
    assert abs(data["kv_cache_bytes"] - m["kv_cache_bytes"]) < 0.01 * 1024**2
    plan_llama = data["weights_bytes"] + data["kv_cache_bytes"] + data["compute_bytes"]
    assert abs(plan_llama - m["total_bytes"]) / m["total_bytes"] < 0.05


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["fit", SMOL, "--cache-type", "q3"], "unknown KV cache type"),
        (["fit", SMOL, "--cache-type", "q8_0", "--flash-attn", "off"], "needs flash attention"),
        (["fit", SMOL, "--flash-attn", "maybe"], "on or off"),
        (["fit", SMOL, "--vram", "lots"], "not a size"),
        (["inspect", "/no/such/file.gguf"], "neither a local file"),
    ],
)
def test_clear_errors(args: list[str], message: str) -> None:
    code, out = run(*args)
    assert code == 1
    assert "error:" in out and message in out
    assert "Traceback" not in out


def test_hostile_file_through_the_real_command(tmp_path: Path) -> None:
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(Path(SMOL).read_bytes()[:100_000])
    proc = subprocess.run(
        [sys.executable, "-m", "innkeeper", "inspect", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "error:" in proc.stderr and "truncated" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_fit_hub_repo_marks_largest_that_fits(fake_hub: FakeHub, tmp_path: Path) -> None:
    q8 = factory.write_shape(tmp_path / "L-Q8_0.gguf", factory.MIXTRAL_TINY)
    f16 = factory.write_shape(tmp_path / "L-F16.gguf", factory.MIXTRAL_TINY, factory.Q.F16, 1)
    q4 = factory.write_shape(tmp_path / "L-Q4_0.gguf", factory.MIXTRAL_TINY, factory.Q.Q4_0, 2)
    fake_hub.add_repo("arch/L-GGUF", {p.name: p for p in (q8, f16, q4)})
    # ~0.5 GB Q8_0, ~0.95 GB F16: 1.2 GiB of RAM fits the Q8_0 but not the F16
    code, out = run("fit", "arch/L-GGUF", "-c", "4096", "--vram", "0", "--ram", "1.2GiB", "--json")
    assert code == 0, out
    data = json.loads(out)
    assert [v["quantization"] for v in data["variants"]] == ["Q4_0", "Q8_0", "F16"]
    assert data["best_variant"] == "L-Q8_0"
    assert [v["fits"] for v in data["variants"]] == [True, True, False]
    code, out = run("fit", "arch/L-GGUF", "-c", "4096", "--vram", "0", "--ram", "1.2GiB")
    assert code == 0 and "★" in out and "largest that fits" in out
    code, out = run("inspect", "arch/L-GGUF")
    assert code == 0 and "variants" in out and "L-F16" in out
