"""`innkeeper inspect` and `innkeeper fit`: real command runs, JSON keys, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from innkeeper.cli import app
from innkeeper.models import hub
from innkeeper.models.gguf_meta import read_gguf_spec
from innkeeper.models.hardware import Hardware
from innkeeper.models.spec import ModelSpec
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
        (["fit", SMOL, "--cache-type", "q3"], "unknown cache type 'q3'"),
        (["fit", SMOL, "--cache-type", "q8_0", "--flash-attn", "off"], "needs flash attention"),
        (["fit", SMOL, "--flash-attn", "maybe"], "must be one of auto, on, off"),
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


# ---- one choice for inspect, fit and pull ------------------------------------------------------

AGREE = "agree/Agree-GGUF"


def _agree_repo(hub_: FakeHub, folder: Path) -> dict[str, Path]:
    """One small real-shaped model at Q4_K_M, Q8_0 and F16 (about 2.5, 4.7 and 8.9 MB)."""
    files = {
        "Agree-Q4_K_M.gguf": (factory.Q.Q4_K, 15),
        "Agree-Q8_0.gguf": (factory.Q.Q8_0, 7),
        "Agree-F16.gguf": (factory.Q.F16, 1),
    }
    paths = {
        name: factory.write_shape(folder / name, factory.TINY_LLAMA, qtype, ftype)
        for name, (qtype, ftype) in files.items()
    }
    hub_.add_repo(AGREE, {**paths, "README.md": b"# agree"})
    return paths


def _named(target: str, store: Path, *machine: str) -> dict[str, str]:
    """The file each command names for `target` on the same (pretend) machine."""
    fit = runner.invoke(app, ["fit", target, *machine, "--json"])
    assert fit.exit_code in (0, 2), fit.output  # 2: the plan does not fit
    pulled = runner.invoke(app, ["pull", target, *machine, "--json", "--models-dir", str(store)])
    assert pulled.exit_code == 0, pulled.output
    named = {
        "fit": json.loads(fit.stdout)["selected_file"],
        "pull": json.loads(pulled.stdout)["files"][0],
    }
    if not machine:  # inspect plans for this machine only
        inspected = runner.invoke(app, ["inspect", target, "--json"])
        assert inspected.exit_code == 0, inspected.output
        named["inspect"] = json.loads(inspected.stdout)["selected_file"]
    return named


def _least_ram(spec: ModelSpec, size: int) -> int:
    """The least RAM (no GPU) on which serve's defaults run a `size`-byte file of `spec`."""
    lo, hi = 0, 1024**3
    while lo < hi:
        mid = (lo + hi) // 2
        if hub.Machine.for_serve(Hardware(mid, mid)).plan(spec, size).fits:
            hi = mid
        else:
            lo = mid + 1
    return lo


def test_inspect_fit_and_pull_name_the_same_file(fake_hub: FakeHub, tmp_path: Path) -> None:
    """Before, `inspect` and `fit` read the smallest variant (Q4_K_M here) while `pull` took the
    largest that fits (F16 on any test machine): one repo, two answers."""
    paths = _agree_repo(fake_hub, tmp_path)
    store = tmp_path / "store"
    # this machine: a 9 MB model fits, so all three take the least quantized file
    assert set(_named(AGREE, store).values()) == {"Agree-F16.gguf"}
    # a machine where the Q8_0 fits and the F16 does not (serve's defaults, as the plan says)
    spec = read_gguf_spec(paths["Agree-F16.gguf"])
    q8 = paths["Agree-Q8_0.gguf"].stat().st_size
    ram = ["--ram", str(_least_ram(spec, q8) + 1024**2), "--vram", "0"]
    assert set(_named(AGREE, store, *ram).values()) == {"Agree-Q8_0.gguf"}
    # nothing fits: the stated default
    tiny = ["--ram", "1KiB", "--vram", "0"]
    assert set(_named(AGREE, store, *tiny).values()) == {"Agree-Q4_K_M.gguf"}
    # an explicit quant or file wins over the machine
    assert set(_named(AGREE + ":q8_0", store, *tiny).values()) == {"Agree-Q8_0.gguf"}
    assert set(_named(AGREE + "/Agree-Q8_0.gguf", store).values()) == {"Agree-Q8_0.gguf"}


# ---- fit takes serve's memory options, from the same declarations ------------------------------


@pytest.mark.parametrize("flash_attn", ["auto", "on", "off"])
@pytest.mark.parametrize("cache_v", [None, "f16", "q8_0", "q4_0"])
def test_fit_flash_attention_by_v_cache(flash_attn: str, cache_v: str | None) -> None:
    """Before, `fit --flash-attn off` failed for every model: an unset V cache type reached the
    quantized-V check as None. Only a quantized V without flash attention is refused."""
    v_args = ["--cache-type-v", cache_v] if cache_v else []
    args = ["fit", SMOL, "-c", "2048", "--ram", "8GiB", "--vram", "0"]
    result = runner.invoke(app, [*args, "--flash-attn", flash_attn, *v_args, "--json"])
    quantized_v = cache_v in ("q8_0", "q4_0")
    if flash_attn == "off" and quantized_v:
        assert result.exit_code == 1
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "needs flash attention" in errors[0], result.output
        assert "Traceback" not in result.output
        return
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["verdict"] == "fits in RAM"
    assert data["settings"]["cache_type_k"] == "f16"
    assert data["settings"]["cache_type_v"] == (cache_v or "f16")
    assert data["settings"]["flash_attn"] is (flash_attn != "off")
    if quantized_v:  # a quantized V is smaller than K
        assert data["v_bytes"] < data["k_bytes"]
    else:
        assert data["v_bytes"] == data["k_bytes"]


def test_fit_cache_type_sets_both_unless_given() -> None:
    base = ["fit", SMOL, "-c", "2048", "--vram", "0", "--json"]
    both = json.loads(runner.invoke(app, [*base, "--cache-type", "q8_0"]).stdout)["settings"]
    assert (both["cache_type_k"], both["cache_type_v"]) == ("q8_0", "q8_0")
    mixed = runner.invoke(app, [*base, "--cache-type", "q8_0", "-ctv", "f16", "-fa", "off"])
    assert mixed.exit_code == 0, mixed.output  # f16 V: no flash attention needed
    settings = json.loads(mixed.stdout)["settings"]
    assert (settings["cache_type_k"], settings["cache_type_v"]) == ("q8_0", "f16")


def test_fit_options_are_serves_memory_options() -> None:
    """One declaration: every option of `fit` but its own is a `serve` option, same flags."""
    from innkeeper.cli.options import options
    from innkeeper.settings.engine import EngineConfig
    from innkeeper.settings.server import ServerConfig

    serve_names = {p.name for p in options(EngineConfig, ServerConfig)}
    fit_names = {p.name for p in options(EngineConfig, ServerConfig, keep=lambda s: s.memory)}
    assert fit_names < serve_names
    assert {"ctx_size", "gpu_layers", "cache_type", "flash_attn", "plan_vram"} <= fit_names
    help_text = runner.invoke(app, ["fit", "--help"], env={"COLUMNS": "200"}).output
    for flag in ("-ctk", "-ctv", "-fa", "-ngl", "-np", "--no-kv-offload", "--vram", "--measure"):
        assert flag in help_text, flag


def test_fit_explains_the_runtime_overhead() -> None:
    """The plan counts ~150 MiB of runtime llama.cpp does not allocate: the table says so."""
    code, out = run("fit", SMOL, "-c", "2048", "--vram", "0")
    assert code == 0, out
    assert "runtime llama.cpp does not allocate" in " ".join(out.split())
    data = json.loads(run("fit", SMOL, "-c", "2048", "--vram", "0", "--json")[1])
    assert data["runtime_overhead_bytes"] == 150 * 1024**2
    assert data["overhead_bytes"] == data["output_buffer_bytes"] + data["runtime_overhead_bytes"]


@pytest.fixture(scope="module")
def vision_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from tests.models.vision_factory import write_pair

    return write_pair(tmp_path_factory.mktemp("vision"))


def test_inspect_says_a_model_with_a_projector_beside_it_can_see(
    vision_pair: tuple[Path, Path],
) -> None:
    from tests.models.vision_factory import N_IMAGE_TOKENS

    model, proj = vision_pair
    for target in (model, model.parent):  # the file, and its folder
        code, out = run("inspect", str(target), "--json")
        assert code == 0, out
        vision = json.loads(out)["vision"]
        assert vision["projector"] == str(proj)
        assert vision["projector_type"] == "mlp"
        assert vision["image_tokens"] == N_IMAGE_TOKENS
        assert 0 < vision["tensor_bytes"] < proj.stat().st_size
    code, out = run("inspect", str(model))
    assert code == 0, out
    assert f"vision yes (projector {proj.name}, image tokens per image {N_IMAGE_TOKENS})" in (
        " ".join(out.split())
    )
    code, out = run("inspect", SMOL, "--json")
    assert json.loads(out)["vision"] is None


def test_fit_counts_the_projector_beside_the_model(vision_pair: tuple[Path, Path]) -> None:
    from innkeeper.models.projector import read_projector

    model, proj = vision_pair
    info = read_projector(proj)
    code, out = run("fit", str(model), "-c", "2048", "--ram", "32GiB", "--json")
    assert code == 0, out
    seeing = json.loads(out)
    code, out = run("fit", str(model), "-c", "2048", "--ram", "32GiB")
    assert code == 0, out
    assert proj.name in out  # the plan's note names it
    lone = model.parent / "alone"
    lone.mkdir()
    (lone / model.name).symlink_to(model)
    code, out = run("fit", str(lone / model.name), "-c", "2048", "--ram", "32GiB", "--json")
    assert code == 0, out
    blind = json.loads(out)
    assert seeing["weights_bytes"] - blind["weights_bytes"] == info.tensor_bytes
    assert any(proj.name in n for n in seeing["notes"])
