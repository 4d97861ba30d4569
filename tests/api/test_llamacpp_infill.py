"""/infill's prompt layout, as llama-server builds it (no test model has FIM tokens: the
route's 409 for one without is in test_llamacpp_completion.py)."""

from __future__ import annotations

from innkeeper.api.llamacpp_request import InfillBody, InfillExtra, infill_prompt

PRE, SUF, MID, REP, SEP, BOS = 101, 102, 103, 104, 105, 1


def test_plain_fim_layout() -> None:
    body = InfillBody(input_prefix="def f(", input_suffix="):\n", prompt="x")
    fim = {"pre": PRE, "suf": SUF, "mid": MID}
    assert infill_prompt(fim, BOS, body) == [BOS, PRE, "def f(", SUF, "):\n", MID, "x"]
    assert infill_prompt(fim, None, body)[0] == PRE


def test_extra_context_without_repo_tokens_comes_first() -> None:
    body = InfillBody(
        input_prefix="a", input_suffix="b", input_extra=[InfillExtra(filename="u.py", text="z=1")]
    )
    fim = {"pre": PRE, "suf": SUF, "mid": MID}
    assert infill_prompt(fim, None, body) == ["z=1", PRE, "a", SUF, "b", MID]


def test_repo_level_layout() -> None:
    body = InfillBody(
        input_prefix="a",
        input_suffix="",
        input_extra=[InfillExtra(filename="u.py", text="z=1\n")],
    )
    fim = {"pre": PRE, "suf": SUF, "mid": MID, "rep": REP, "sep": SEP}
    assert infill_prompt(fim, BOS, body) == [
        BOS,
        REP,
        "myproject\n",
        SEP,
        "u.py\n",
        "z=1\n",
        SEP,
        "filename\n",
        PRE,
        "a",
        SUF,
        MID,
    ]
