"""A client's JSON schema as a GBNF grammar (llama-server's `json_schema` field).

The conversion is llama.cpp's own converter as llama-cpp-python ships it (remote `$ref`s are
never fetched). It writes repetitions out item by item, so a schema asking for a billion
items would build a billion-item grammar: counts are bounded before converting, and the
grammar then goes through the same limits as any client grammar (`check_grammar`).
"""

from __future__ import annotations

import json
from typing import Any

from llama_cpp.llama_grammar import json_schema_to_gbnf

MAX_REPEAT = 256  # the largest minItems/maxItems/minLength... a schema may ask for
REPEAT_KEYS = frozenset(
    {"minItems", "maxItems", "minLength", "maxLength", "minProperties", "maxProperties"}
)


class SchemaError(ValueError):
    """The schema cannot become a grammar (malformed, unsupported, or too large)."""


def _check_counts(schema: Any) -> None:
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if key in REPEAT_KEYS and isinstance(value, int | float) and value > MAX_REPEAT:
                    raise SchemaError(f"json_schema: {key} may be at most {MAX_REPEAT}")
                stack.append(value)
        elif isinstance(node, list):
            stack.extend(node)


def schema_grammar(schema: dict[str, Any]) -> str:
    """The GBNF grammar that only lets through JSON matching `schema`."""
    _check_counts(schema)
    try:
        return json_schema_to_gbnf(json.dumps(schema))
    except RecursionError as exc:
        raise SchemaError("json_schema is nested too deeply") from exc
    except Exception as exc:  # the converter signals bad input with any exception type
        raise SchemaError(f"json_schema could not be turned into a grammar: {exc}") from exc
