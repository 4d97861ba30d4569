"""GGUFs without a chat template fall back to their architecture's format, not to Alpaca; the
embedded model answers to its served name; non-regular files are refused before opening."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from innkeeper.engine.backend import Model
from innkeeper.engine.templates import BUILTIN_FORMATS, BuiltinTemplate, resolve_template
from innkeeper.models import store
from innkeeper.models.identify import identify
from innkeeper.models.sources import FileSource, require_regular_file
from innkeeper.models.spec import ModelFormatError
from innkeeper.models.templates_detect import template_for_architecture
from tests.models import gguf_factory as factory


@pytest.mark.parametrize(
    ("arch", "n_vocab", "expected"),
    [
        ("gemma", 256000, "gemma"),
        ("gemma2", 256000, "gemma"),
        ("gemma3", 262208, "gemma"),
        ("llama", 128256, "llama3"),  # Llama 3.x
        ("llama", 32000, "mistral"),  # Llama 2 / Mistral 7B v0.1 ([INST])
        ("llama", 32768, "mistral"),  # Mistral 7B v0.3
        ("llama", 49152, None),  # SmolLM-style: the vocabulary says nothing
        ("mistral3", 131072, "mistral"),
        ("qwen2", 151936, "chatml"),
        ("qwen3", 151936, "chatml"),
        ("phi3", 32064, "phi3"),
        ("some-new-arch", 1000, None),
    ],
)
def test_architecture_table(arch: str, n_vocab: int, expected: str | None) -> None:
    assert template_for_architecture(arch, n_vocab) == expected
    if expected is not None:
        assert expected in BUILTIN_FORMATS  # every fallback is one innkeeper can render


TINY_LLAMA3 = factory.Shape("llama", 2, 256, 4, 2, 64, 512, 128256, 2048)
TINY_GEMMA3 = factory.Shape(
    "gemma3", 2, 256, 4, 2, 64, 512, 4096, 2048, tied=True, window=128, qk_norm=True,
    post_norms=True,
)  # fmt: skip
TINY_ODD = factory.Shape("llama", 2, 256, 4, 2, 64, 512, 4096, 2048)


@pytest.mark.parametrize(
    ("shape", "expected"), [(TINY_GEMMA3, "gemma"), (TINY_LLAMA3, "llama3"), (TINY_ODD, "alpaca")]
)
def test_loaded_gguf_without_template_uses_its_architecture(
    shape: factory.Shape, expected: str, tmp_path: Path
) -> None:
    path = factory.write_shape(tmp_path / "m.gguf", shape)
    model = Model(path)  # llama.cpp's own view of the file, as the engine gets it
    try:
        assert model.info.chat_template is None
        template = resolve_template(None, model.info)
        assert template.name == expected
        assert resolve_template("chatml", model.info).name == "chatml"  # --chat-template wins
    finally:
        model.close()
    shown = identify(path).to_json()  # `inspect` says what serve will use
    assert shown["has_chat_template"] is False and shown["chat_template_fallback"] == expected


def test_phi3_builtin_renders_its_format() -> None:
    text = BuiltinTemplate(BUILTIN_FORMATS["phi3"]).render(
        [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}]
    )
    assert text == "<|system|>\nS<|end|>\n<|user|>\nhi<|end|>\n<|assistant|>\n"


# ---- the embedded model's name ------------------------------------------------------------------


def test_embedded_model_resolves_by_its_served_name() -> None:
    from innkeeper.engine.planning import model_id_for

    path = store.default_model_path()
    assert store.embedded_model_name() == model_id_for(path)
    for ref in (model_id_for(path), path.name, model_id_for(path).upper()):
        assert store.resolve_model(ref) == path
        assert identify(ref).target == str(path)
    entry = store.embedded_entry()
    assert entry is not None and entry.embedded and entry.path == path and entry.complete


# ---- non-regular files --------------------------------------------------------------------------


def test_fifo_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    with pytest.raises(ModelFormatError, match="FIFO"):
        require_regular_file(fifo)
    with pytest.raises(ModelFormatError, match="FIFO"):
        FileSource(fifo)  # every header reader goes through here
    require_regular_file(tmp_path)  # a folder is fine: callers that need one accept it
    require_regular_file(tmp_path / "missing.gguf")  # "does not exist" is the caller's to say
