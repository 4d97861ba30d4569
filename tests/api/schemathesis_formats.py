"""Generators for the text formats innkeeper's OpenAPI document names (`format: gbnf`,
`format: json-string-list`, `format: image-base64` on a vision model): JSON Schema cannot spell out a grammar language, so the
document names it and this module teaches schemathesis to write valid examples.

Imported by tests/api/test_schema.py; for the CLI, load it as a hooks module:
`SCHEMATHESIS_HOOKS=tests.api.schemathesis_formats schemathesis run --checks all URL`.
"""

from __future__ import annotations

import json

import schemathesis
from hypothesis import strategies as st

GRAMMARS = (
    "",
    'root ::= "yes" | "no"',
    "root ::= [a-z]+",
    'root ::= item ("," item)*\nitem ::= [0-9]+',
    'root ::= "{" ws "}"\nws ::= [ \\t\\n]*',
)
breaker = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=4)
breakers = st.lists(breaker, max_size=4).map(json.dumps)

schemathesis.openapi.format("gbnf", st.sampled_from(GRAMMARS))
# a JSON list of strings, or its items without the brackets (text-generation-webui's form)
schemathesis.openapi.format(
    "json-string-list", st.one_of(breakers, breakers.map(lambda text: text[1:-1]))
)


def _png(width: int, height: int, color: tuple[int, int, int]) -> str:
    """A real image, base64-encoded, as clients send them."""
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


IMAGES = tuple(_png(w, h, c) for w, h, c in ((8, 8, (255, 0, 0)), (32, 16, (0, 128, 255))))
schemathesis.openapi.format("image-base64", st.sampled_from(IMAGES))
