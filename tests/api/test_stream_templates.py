"""Chunk templates write a token's chunk byte for byte as encoding the whole object would,
whatever the text holds; and the app refuses a middleware that streams would write past."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pytest
from fastapi.testclient import TestClient
from starlette.middleware.gzip import GZipMiddleware

from innkeeper.api.app import InnkeeperApp
from innkeeper.api.ollama_models import iso, now_iso
from innkeeper.api.openai import _delta_choice, _Stream, _text_choice
from innkeeper.api.streaming import ChunkTemplate, json_str, ndjson_line, slot, sse
from innkeeper.api.streaming import dumps as json_dumps

TEXTS = [
    "",
    " the",
    'say "hi"\\n',
    "line\nbreak\ttab\r",
    "\x00\x01\x1f\x7f",
    "héllo wörld ✓ 日本語 🦙",
    "\u2028\u2029",
    "</script>",
]


@pytest.mark.parametrize("text", TEXTS)
def test_one_slot_template_matches_sse(text: str) -> None:
    template = ChunkTemplate({"token": slot(0), "finish_reason": "null"}, before="event: x\ndata: ")
    assert template(json_str(text)) == sse({"token": text, "finish_reason": "null"}, event="x")


@pytest.mark.parametrize("text", TEXTS)
def test_several_slots_match_ndjson(text: str) -> None:
    obj = {"model": "m", "created_at": slot(0), "message": {"content": slot(1)}, "n": slot(2)}
    template = ChunkTemplate(obj, before="", after="\n")
    made = template(json_str("2024-01-01T00:00:00.000001Z"), json_str(text), json_dumps([1, 2]))
    whole = {"model": "m", "created_at": "2024-01-01T00:00:00.000001Z"}
    assert made == ndjson_line({**whole, "message": {"content": text}, "n": [1, 2]})


@pytest.mark.parametrize("usage", [False, True])
@pytest.mark.parametrize("choice", [_text_choice, _delta_choice])
@pytest.mark.parametrize("text", TEXTS)
def test_openai_token_chunk_is_the_dict_chunk(text: str, choice: Any, usage: bool) -> None:
    options = type("Options", (), {"include_usage": usage})()
    stream = _Stream("cmpl-1", "text_completion", 1, 'm"odel', options, 2, choice)  # type: ignore[arg-type]
    for i in (0, 1, 0):
        assert stream.text(i, text) == stream.chunk([choice(i, text)])


def test_template_slots_must_be_numbered_in_order() -> None:
    with pytest.raises(ValueError):
        ChunkTemplate({"a": 1})
    with pytest.raises(ValueError):
        ChunkTemplate({"a": slot(1), "b": slot(0)})


def test_a_body_rewriting_middleware_is_refused() -> None:
    """Streams write body messages past the middlewares: one that rewrites bodies would
    be skipped for them, so the app refuses to build."""
    app = InnkeeperApp()
    app.add_middleware(GZipMiddleware)
    with pytest.raises(TypeError), TestClient(app) as client:
        client.get("/")


def test_now_iso_is_iso_of_now() -> None:
    """Ollama's per-token timestamp skips `iso`'s conversion: it must still be its string."""
    before = datetime.now(timezone.utc)
    stamp = now_iso()
    assert stamp.endswith("Z") and len(stamp) == len("2024-01-01T00:00:00.000001Z")
    when = datetime.fromisoformat(stamp)
    assert iso(when) == stamp
    assert before <= when <= datetime.now(timezone.utc)
