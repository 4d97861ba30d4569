"""Generators for the text formats innkeeper's OpenAPI document names (`format: gbnf`,
`format: json-string-list`): JSON Schema cannot spell out a grammar language, so the
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
