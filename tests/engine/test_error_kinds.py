"""Engine failures carry a typed ErrorKind (issue 11 groundwork), set where they happen."""

from __future__ import annotations

import pytest

from innkeeper.engine import generation
from innkeeper.engine.events import ErrorKind
from tests.engine.conftest import Runner


def test_a_grammar_llama_cpp_refuses_is_a_grammar_error(runner: Runner) -> None:
    # Within innkeeper's limits (the api would have refused it first: this is the engine's
    # own check, for a caller that skipped the api's).
    prompt = runner.engine.tokenize("Hi")
    _, fin, _ = runner.run(prompt, 4, grammar='root ::= "a" undefined-rule')
    assert fin.reason == "error" and fin.error_kind is ErrorKind.GRAMMAR
    _, fin, _ = runner.run(prompt, 4, grammar="root ::= " + "(" * 40 + '"a"' + ")" * 40)
    assert fin.error_kind is ErrorKind.GRAMMAR and "nests" in (fin.error or "")


def test_a_grammar_step_over_the_time_limit_ends_only_that_request(
    runner: Runner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(generation, "GRAMMAR_STEP_LIMIT_S", 0.0)
    prompt = runner.engine.tokenize("Hi")
    text, fin, _ = runner.run(prompt, 4, grammar='root ::= "a"+')
    assert fin.reason == "error" and fin.error_kind is ErrorKind.GRAMMAR
    assert "too costly" in (fin.error or "")
    text, fin, _ = runner.run(prompt, 4)  # no grammar: not affected
    assert fin.reason == "length" and fin.error_kind is None and text
