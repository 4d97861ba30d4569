"""schemathesis against the server's own OpenAPI document: every route family, valid and
invalid inputs generated from the schema, every check `schemathesis run --checks all` runs:
no 5xx, no answer the document does not describe, every input the document allows accepted
and every input it forbids rejected.

Bounded: a few examples per operation, and generation lengths clamped to 4 tokens (the
point is the HTTP contract, not throughput). Text with a language of its own (GBNF) is a
named `format`, written by tests/api/schemathesis_formats.py; the same by hand:
`SCHEMATHESIS_HOOKS=tests.api.schemathesis_formats schemathesis run --checks all URL`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import CHECKS, load_all_checks

from innkeeper.api.app import GENERATE_PATHS
from tests.api import schemathesis_formats  # noqa: F401  (registers the text formats)
from tests.helpers import ServerProcess, run_server

pytestmark = pytest.mark.slow  # starts real servers or browsers: not in `make test-fast`

LENGTH_KEYS = (
    "max_tokens",
    "max_new_tokens",
    "max_completion_tokens",
    "n_predict",
    "num_predict",
    "max_length",
    "min_tokens",
)
EXAMPLES = 6
CTX = 512
FAMILIES = ("/v1/", "/api/v1/", "/api/extra/", "/v1/internal/", "/tokenize", "/props")


@pytest.fixture(scope="module")
def fuzzed() -> Iterator[ServerProcess]:
    with run_server(
        "--max-tokens",
        "4",
        "--ctx-size",
        str(CTX),
        "--parallel",
        "2",
        "--threads",
        "1",
        "--max-queue",
        "16",
        name="schema",
    ) as srv:
        yield srv


@pytest.fixture(scope="module")
def api_schema(fuzzed: ServerProcess) -> Any:
    schema = schemathesis.openapi.from_url(f"{fuzzed.url}/openapi.json")
    paths = [op.ok().path for op in schema.get_all_operations()]
    for fam in FAMILIES:  # every route family is in the document
        assert any(p.startswith(fam) for p in paths), fam
    return schema


def clamp(case: Any, mode: GenerationMode) -> None:
    """Keep generations short: 4 tokens at most (KoboldAI's default length is 180)."""
    body = case.body
    if isinstance(body, dict) and case.operation.path in GENERATE_PATHS:
        # only values the document allows are shortened: an invalid one must stay invalid
        if body.get("max_tokens") is None:
            body["max_tokens"] = 4
        for key in LENGTH_KEYS:
            value = body.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and 4 < value <= CTX:
                body[key] = 4
        if isinstance(body.get("n"), int) and 2 < body["n"] <= 16:
            body["n"] = 2
        if mode == GenerationMode.POSITIVE and isinstance(body.get("prompt"), list):
            del body["prompt"][2:]


load_all_checks()
ALL_CHECKS = CHECKS.get_all()  # what `schemathesis run --checks all` runs


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_api_contract(api_schema: Any, mode: GenerationMode) -> None:
    """Each operation in turn, with hypothesis driving schemathesis's strategies.

    (schemathesis's own pytest integration, `from_fixture`, does not run under pytest 9.)
    """
    failures: dict[str, str] = {}
    calls = 0
    t0 = time.monotonic()

    for result in api_schema.get_all_operations():
        operation = result.ok()
        if operation.definition.raw.get("x-innkeeper-admin"):
            continue  # load/unload/pull/delete change the model under every other operation

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
            # the same examples every run: CI must not turn red by the draw (schemathesis
            # cannot tell a custom format's valid strings, e.g. the empty grammar, from
            # invalid ones in negative mode); explore with a seed by hand for new cases
            derandomize=True,
            phases=[Phase.explicit, Phase.generate],
        )
        def check(case: Any) -> None:
            nonlocal calls
            clamp(case, mode)
            calls += 1
            case.call_and_validate(checks=ALL_CHECKS, timeout=60)

        try:
            check()
        except Unsatisfiable:
            pass  # negative mode, and nothing in this operation's input can be made invalid
        except Exception as exc:  # collect every operation's failure
            failures[operation.label] = str(exc)[:2000]
    print(
        f"schemathesis {mode.value}: {calls} calls in {time.monotonic() - t0:.1f} s, "
        f"{len(failures)} operations failed"
    )
    assert calls > 0
    assert not failures, "\n\n".join(f"{k}:\n{v}" for k, v in failures.items())
