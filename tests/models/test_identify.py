"""`identify`: files, folders and hub repos (through the fake hub and the real client)."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

from innkeeper.models import hub
from innkeeper.models.filenames import filename_hints
from innkeeper.models.hardware import Hardware
from innkeeper.models.hf_meta import read_hf_dir
from innkeeper.models.identify import identify
from innkeeper.models.spec import ModelFormatError
from innkeeper.models.store import default_model_path
from innkeeper.models.templates_detect import detect_template
from tests.models import fakehub
from tests.models import gguf_factory as factory
from tests.models.fakehub import FakeHub, add_smollm2

fake_hub = fakehub.fake_hub  # the pull helper's fake hub fixtures
hub_sources = fakehub.hub_sources
SMOL = default_model_path()
ROOMY = hub.Machine.for_serve(Hardware(64 * 1024**3, 64 * 1024**3))
NO_MEMORY = hub.Machine.for_serve(Hardware(1024, 1024))  # nothing fits


def _safetensors(tensors: dict[str, tuple[str, list[int]]]) -> bytes:
    header: dict[str, object] = {}
    offset = 0
    sizes = {"F16": 2, "F32": 4, "I32": 4, "BF16": 2}
    for name, (dtype, shape) in tensors.items():
        n = sizes[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + bytes(offset)


LLAMA_CFG = {
    "model_type": "llama",
    "num_hidden_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 100,
    "max_position_embeddings": 4096,
    "intermediate_size": 128,
    "torch_dtype": "float16",
    "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024},
}


def _hf_dir(root: Path, cfg: dict[str, object], *, tokenizer: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps(cfg))
    tensors = {
        "model.embed_tokens.weight": ("F16", [100, 64]),
        "model.layers.0.self_attn.q_proj.weight": ("F16", [64, 64]),
        "model.layers.1.self_attn.q_proj.weight": ("F16", [64, 64]),
        "lm_head.weight": ("F16", [100, 64]),
    }
    (root / "model-00001-of-00002.safetensors").write_bytes(_safetensors(tensors))
    if tokenizer:
        (root / "tokenizer.json").write_text("{}")
        (root / "tokenizer_config.json").write_text(
            json.dumps(
                {
                    "chat_template": "{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}"
                }
            )
        )
    return root


def test_gguf_file() -> None:
    ident = identify(SMOL)
    d = ident.to_json()
    assert d["format"] == "gguf" and d["quantization"] == "Q4_1"
    assert d["architecture"] == "llama" and d["context_length"] == 8192
    assert d["chat_template_name"] == "chatml"
    assert d["complete"] is True and d["safe"] is True
    assert 134_000_000 < d["parameters"] < 135_000_000
    assert "GGUF metadata general.file_type" in d["recognized_by"]


def test_split_gguf_with_missing_part(tmp_path: Path) -> None:
    part1 = tmp_path / "Model-Q8_0-00001-of-00003.gguf"
    factory.write_shape(part1, factory.TINY_LLAMA)
    shutil.copy(part1, tmp_path / "Model-Q8_0-00003-of-00003.gguf")
    ident = identify(part1)
    assert not ident.complete
    assert ident.missing == ["Model-Q8_0-00002-of-00003.gguf"]
    folder = identify(tmp_path)
    assert folder.format == "gguf" and not folder.complete
    assert folder.variants[0].main_file.endswith("00001-of-00003.gguf")
    assert folder.missing == ["Model-Q8_0-00002-of-00003.gguf"]


def test_hf_folder(tmp_path: Path) -> None:
    d = _hf_dir(tmp_path / "m", LLAMA_CFG)
    ident = identify(d)
    j = ident.to_json()
    assert j["format"] == "safetensors" and j["quantization"] == "float16"
    assert j["architecture"] == "llama" and j["layers"] == 2 and j["kv_heads"] == 2
    assert j["rope_scaling"] == {"type": "yarn", "factor": 4.0, "original_context": 1024}
    assert j["chat_template_name"] == "chatml"
    assert j["missing"] == ["model-00002-of-00002.safetensors"]
    assert j["parameters"] == 100 * 64 * 2 + 64 * 64 * 2
    assert j["weights_bytes"] == j["parameters"] * 2
    assert j["safe"] is True


def test_hf_folder_missing_tokenizer(tmp_path: Path) -> None:
    d = _hf_dir(tmp_path / "m", LLAMA_CFG, tokenizer=False)
    (d / "model-00001-of-00002.safetensors").rename(d / "model.safetensors")
    ident = identify(d)
    assert ident.missing == ["tokenizer (tokenizer.json or tokenizer.model)"]


@pytest.mark.parametrize(
    ("quant", "fmt", "label"),
    [
        ({"quant_method": "gptq", "bits": 4, "group_size": 128}, "gptq", "GPTQ 4-bit g128"),
        ({"quant_method": "awq", "bits": 4, "group_size": 64}, "awq", "AWQ 4-bit g64"),
        (
            {"quant_method": "bitsandbytes", "load_in_4bit": True},
            "bitsandbytes",
            "bitsandbytes nf4",
        ),
        ({"quant_method": "exl2", "bits": 4.65}, "exl2", "EXL2 4.65-bit"),
    ],
)
def test_quantized_hf_formats(
    tmp_path: Path, quant: dict[str, object], fmt: str, label: str
) -> None:
    d = _hf_dir(tmp_path / "m", {**LLAMA_CFG, "quantization_config": quant})
    ident = identify(d)
    assert ident.format == fmt and ident.quantization == label
    assert "config.json quantization_config.quant_method" in ident.recognized_by


def test_exl2_marker_file(tmp_path: Path) -> None:
    d = _hf_dir(tmp_path / "m", LLAMA_CFG)
    (d / "measurement.json").write_text("{}")
    assert identify(d).format == "exl2"


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"num_hidden_layers": "32"}, "num_hidden_layers should be a non-negative integer"),
        ({"hidden_size": -5}, "hidden_size should be a non-negative integer"),
        ({"num_attention_heads": True}, "num_attention_heads should be"),
        ({"rope_scaling": "yarn"}, "rope_scaling should be an object"),
        ({"quantization_config": ["gptq"]}, "quantization_config should be an object"),
        ({"torch_dtype": 16}, "torch_dtype should be a string"),
    ],
)
def test_config_with_wrong_types(tmp_path: Path, patch: dict[str, object], message: str) -> None:
    d = _hf_dir(tmp_path / "m", {**LLAMA_CFG, **patch})
    with pytest.raises(ModelFormatError, match=message):
        read_hf_dir(d)


def test_config_not_an_object(tmp_path: Path) -> None:
    d = _hf_dir(tmp_path / "m", LLAMA_CFG)
    (d / "config.json").write_text("[1, 2, 3]")
    with pytest.raises(ModelFormatError, match="should be a JSON object"):
        identify(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(ModelFormatError, match=r"cannot read config\.json"):
        identify(d)


def test_hostile_safetensors_header(tmp_path: Path) -> None:
    d = _hf_dir(tmp_path / "m", LLAMA_CFG)
    st = d / "model-00001-of-00002.safetensors"
    st.write_bytes(struct.pack("<Q", 2**60) + b"{}")
    with pytest.raises(ModelFormatError, match="claims"):
        identify(d)
    st.write_bytes(_safetensors({"w": ("F16", [10, 10])})[:-50])
    with pytest.raises(ModelFormatError, match="truncated"):
        identify(d)


def test_pickle_folder(tmp_path: Path) -> None:
    d = tmp_path / "p"
    d.mkdir()
    cmd = b"touch /tmp/never"
    (d / "pytorch_model.bin").write_bytes(
        b"\x80\x02cposix\nsystem\nX" + len(cmd).to_bytes(4, "little") + cmd + b"\x85R."
    )
    (d / "config.json").write_text(json.dumps(LLAMA_CFG))
    j = identify(d).to_json()
    assert j["format"] == "pickle" and j["safe"] is False
    assert "posix.system" in j["safety"]["dangerous_imports"]


def test_unknown_inputs(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ModelFormatError, match="not a model file"):
        identify(tmp_path / "notes.txt")
    with pytest.raises(ModelFormatError, match="neither a local file"):
        identify("no such thing")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert identify(empty).format == "unknown" and not identify(empty).complete


@pytest.mark.parametrize(
    ("name", "quant", "ctx", "shard"),
    [
        ("Mistral-7B-Instruct-v0.3-Q4_K_M.gguf", "Q4_K_M", None, None),
        ("llama-2-13b.q5.bin", "Q5", None, None),
        ("Kunoichi-7B-16k-IQ3_XXS.gguf", "IQ3_XXS", 16384, None),
        ("model-00001-of-00003.safetensors", None, None, (1, 3)),
        ("Big-Q8_0-00002-of-00004.gguf", "Q8_0", None, (2, 4)),
        ("phi-3-mini-128k-instruct.f16.gguf", "F16", 131072, None),
    ],
)
def test_filename_hints(
    name: str, quant: str | None, ctx: int | None, shard: tuple[int, int] | None
) -> None:
    h = filename_hints(name)
    assert (h.quantization, h.context, h.shard) == (quant, ctx, shard)


@pytest.mark.parametrize(
    ("template", "name"),
    [
        ("<|start_header_id|>{{ role }}<|end_header_id|>{{ content }}<|eot_id|>", "llama3"),
        ("<|im_start|>{{ role }}\n{{ content }}<|im_end|>", "chatml"),
        ("<start_of_turn>user\n{{ content }}<end_of_turn>", "gemma"),
        ("[INST] {{ content }} [/INST]", "mistral"),
        ("[INST] <<SYS>>{{ system }}<</SYS>> {{ content }} [/INST]", "llama2"),
        ("### Instruction:\n{{ content }}\n### Response:", "alpaca"),
        ("USER: {{ content }} ASSISTANT:", "vicuna"),
        ("<|system|>{{ s }}<|user|>{{ u }}<|model|>", "metharme"),
        ("<|user|>\n{{ c }}<|end|>\n<|assistant|>", "phi3"),
        ("<|START_OF_TURN_TOKEN|><|USER_TOKEN|>{{ c }}", "command-r"),
        ("{{ messages }}", None),
        (None, None),
    ],
)
def test_template_names(template: str | None, name: str | None) -> None:
    assert detect_template(template) == name


# ---- hub ------------------------------------------------------------------------------------


def _add_arch_repo(hub: FakeHub, tmp_path: Path) -> str:
    q8 = factory.write_shape(tmp_path / "Tiny-Q8_0.gguf", factory.TINY_LLAMA)
    f16 = factory.write_shape(tmp_path / "Tiny-F16.gguf", factory.TINY_LLAMA, factory.Q.F16, 1)
    hub.add_repo("arch/Tiny-GGUF", {"Tiny-Q8_0.gguf": q8, "Tiny-F16.gguf": f16, "README.md": b"hi"})
    return "arch/Tiny-GGUF"


def test_hub_gguf_repo_reads_headers_only(fake_hub: FakeHub, tmp_path: Path) -> None:
    repo = add_smollm2(fake_hub)
    fake_hub.reset_counters()
    ident = identify(repo)
    j = ident.to_json()
    assert j["format"] == "gguf" and j["quantization"] == "Q4_1"
    assert j["architecture"] == "llama" and j["chat_template_name"] == "chatml"
    assert j["kind"] == "hub" and j["safe"] is True
    served = sum(fake_hub.bytes_served.values())
    assert served < 8 * 1024**2, served  # the 98 MB weights were not downloaded


def test_hub_variants_and_quant_choice(fake_hub: FakeHub, tmp_path: Path) -> None:
    repo = _add_arch_repo(fake_hub, tmp_path)
    ident = identify(repo + ":F16", NO_MEMORY)  # an explicit quant wins over the machine
    assert [v.quantization for v in ident.variants] == ["Q8_0", "F16"]
    assert ident.selected == "Tiny-F16" and ident.quantization == "F16"
    assert ident.choice == "F16 asked for"
    named = identify(repo + "/Tiny-F16.gguf", NO_MEMORY)
    assert (named.selected_file, named.quantization) == ("Tiny-F16.gguf", "F16")
    with pytest.raises(ModelFormatError, match="no Q2_K file"):
        identify(repo + ":Q2_K")
    with pytest.raises(ModelFormatError, match=r"no GGUF file 'README\.md'"):
        identify(repo + "/README.md")


def test_hub_repo_is_read_at_the_file_pull_picks(fake_hub: FakeHub, tmp_path: Path) -> None:
    """Before, `inspect` read the smallest variant while `pull` took the largest that fits."""
    repo = _add_arch_repo(fake_hub, tmp_path)
    ident = identify(repo, ROOMY)
    assert (ident.selected_file, ident.quantization) == ("Tiny-F16.gguf", "F16")
    assert ident.choice is not None and ident.choice.startswith("the largest that fits")
    assert hub.select(hub.list_repo(repo), machine=ROOMY).main_file == ident.selected_file
    tiny = identify(repo, NO_MEMORY)
    assert tiny.selected_file == "Tiny-Q8_0.gguf"  # no Q4_K_M in the repo: the smallest
    assert tiny.choice is not None and "none fits" in tiny.choice


def test_folder_of_variants_uses_the_same_choice(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    factory.write_shape(folder / "Tiny-Q8_0.gguf", factory.TINY_LLAMA)
    factory.write_shape(folder / "Tiny-F16.gguf", factory.TINY_LLAMA, factory.Q.F16, 1)
    factory.write_shape(folder / "Tiny-Q4_K_M.gguf", factory.TINY_LLAMA, factory.Q.Q4_K, 15)
    assert identify(folder, ROOMY).selected_file == "Tiny-F16.gguf"
    small = identify(folder, NO_MEMORY)
    assert (small.selected_file, small.quantization) == ("Tiny-Q4_K_M.gguf", "Q4_K_M")


def test_hub_missing_shard_and_errors(fake_hub: FakeHub, tmp_path: Path) -> None:
    part = factory.write_shape(tmp_path / "B-Q8_0-00001-of-00003.gguf", factory.TINY_LLAMA)
    q4 = factory.write_shape(tmp_path / "B-Q4_0.gguf", factory.TINY_LLAMA, factory.Q.Q4_0, 2)
    names = ("B-Q8_0-00001-of-00003.gguf", "B-Q8_0-00003-of-00003.gguf", "B-Q4_0.gguf")
    fake_hub.add_repo("arch/Broken-GGUF", dict(zip(names, (part, part, q4), strict=True)))
    broken = identify("arch/Broken-GGUF", ROOMY)
    assert broken.selected == "B-Q4_0" and broken.complete  # the broken Q8_0 is skipped
    assert broken.warnings == ["B-Q8_0 lacks shard(s) 2 in the repo"]
    asked = identify("arch/Broken-GGUF:Q8_0")  # asked for: inspect says what is missing
    assert asked.missing == ["B-Q8_0-00002-of-00003.gguf"] and not asked.complete
    with pytest.raises(ModelFormatError, match="not found"):
        identify("nobody/Nothing-Here")
    with pytest.raises(ModelFormatError, match=r"gated|HF_TOKEN|401|403"):
        identify("fake/Gated-GGUF")


def test_hub_safetensors_repo(fake_hub: FakeHub) -> None:
    ident = identify("fake/Tiny-Llama-GPTQ")
    assert ident.format == "gptq" and ident.quantization == "GPTQ 4-bit g128"
