"""Every sampler reaches llama.cpp: each one changes the output where it should."""

from __future__ import annotations

import httpx
import pytest

PROMPT = "<|im_start|>user\nWrite a story about a dragon.<|im_end|>\n<|im_start|>assistant\n"
REPETITIVE = "1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2,"


def gen(client: httpx.Client, prompt: str = PROMPT, **kw) -> str:
    body = {"prompt": prompt, "max_tokens": 32, "ignore_eos": True, **kw}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def greedy(client: httpx.Client, prompt: str = PROMPT, **kw) -> str:
    return gen(client, prompt, temperature=0, **kw)


def test_seed_makes_sampling_reproducible(client: httpx.Client) -> None:
    a = gen(client, temperature=1.0, seed=7)
    assert gen(client, temperature=1.0, seed=7) == a
    assert gen(client, temperature=1.0, seed=8) != a
    assert gen(client, temperature=1.0, sampler_seed=7) == a  # KoboldCpp's spelling


def test_top_k_1_equals_temperature_0(client: httpx.Client) -> None:
    assert gen(client, temperature=1.5, top_k=1, seed=3) == greedy(client)


def test_tiny_top_p_and_full_min_p_are_greedy(client: httpx.Client) -> None:
    g = greedy(client)
    assert gen(client, temperature=1.5, top_k=0, top_p=0.001, min_p=0, seed=3) == g
    assert gen(client, temperature=1.5, top_k=0, top_p=1, min_p=1.0, seed=3) == g


@pytest.mark.parametrize(
    "change",
    [
        {"temperature": 2.0},
        {"typical_p": 0.2},
        {"top_n_sigma": 0.5},
        {"xtc_probability": 1.0, "xtc_threshold": 0.05},
        {"mirostat_mode": 2, "mirostat_tau": 3.0},
        {"mirostat": 1, "mirostat_tau": 3.0},
        {"dynamic_temperature": True, "dynatemp_low": 0.1, "dynatemp_high": 3.0},
    ],
    ids=["temperature", "typical", "top_n_sigma", "xtc", "mirostat2", "mirostat1", "dynatemp"],
)
def test_sampler_changes_sampled_output(client: httpx.Client, change: dict) -> None:
    base = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "seed": 11}
    assert gen(client, **{**base, **change}) != gen(client, **base)


@pytest.mark.parametrize(
    "change",
    [
        {"repetition_penalty": 1.8, "repetition_penalty_range": 64},
        {"rep_pen": 1.8, "rep_pen_range": 64},
        {"presence_penalty": 2.0, "repeat_last_n": 64},
        {"frequency_penalty": 2.0, "repeat_last_n": 64},
        {"dry_multiplier": 3.0, "dry_base": 2.0, "dry_allowed_length": 1, "dry_penalty_last_n": -1},
    ],
    ids=["repetition_penalty", "rep_pen", "presence", "frequency", "dry"],
)
def test_penalties_change_greedy_output(client: httpx.Client, change: dict) -> None:
    # DRY only acts on repeated sequences: give it a prompt full of them.
    prompt = REPETITIVE if "dry_multiplier" in change else PROMPT
    assert greedy(client, prompt, max_tokens=64, **change) != greedy(client, prompt, max_tokens=64)


def test_penalty_applies_to_prompt_tokens(client: httpx.Client) -> None:
    """The very first token differs: only the prompt can have fed the penalty's history."""
    plain = greedy(client, REPETITIVE, max_tokens=1)
    for kw in (
        {"repetition_penalty": 3.0, "repeat_last_n": 64},
        {"dry_multiplier": 5.0, "dry_allowed_length": 1},
    ):
        assert greedy(client, REPETITIVE, max_tokens=1, **kw) != plain


def test_logit_bias_and_token_bans(client: httpx.Client) -> None:
    first = client.post("/tokenize", json={"content": greedy(client, max_tokens=1)}).json()[
        "tokens"
    ][0]
    assert (
        client.post(
            "/tokenize",
            json={"content": greedy(client, max_tokens=1, logit_bias={str(first): -100})},
        ).json()["tokens"][0]
        != first
    )
    banned = greedy(client, max_tokens=1, custom_token_bans=str(first))
    assert client.post("/tokenize", json={"content": banned}).json()["tokens"][0] != first
    forced = client.post("/tokenize", json={"content": " zebra"}).json()["tokens"][0]
    assert "zebra" in greedy(client, max_tokens=2, logit_bias={str(forced): 50})


def test_banned_string_never_appears(client: httpx.Client) -> None:
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    assert "Paris" in greedy(client, prompt, max_tokens=16)
    for kw in ({"banned_strings": ["Paris"]}, {"banned_tokens": ["paris"]}):
        out = greedy(client, prompt, max_tokens=24, **kw)
        assert "paris" not in out.lower()
        assert out.strip()


def test_grammar_forces_shape(client: httpx.Client) -> None:
    grammar = 'root ::= "The answer is " ("yes" | "no") "."'
    for key in ("grammar", "grammar_string"):
        out = gen(
            client, temperature=1.0, seed=5, max_tokens=20, ignore_eos=False, **{key: grammar}
        )
        assert out in ("The answer is yes.", "The answer is no.")


def test_ignore_eos_and_max_tokens(client: httpx.Client) -> None:
    prompt = "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n"
    short = client.post(
        "/v1/completions", json={"prompt": prompt, "max_tokens": 200, "temperature": 0}
    ).json()
    assert short["choices"][0]["finish_reason"] == "stop"
    assert short["usage"]["completion_tokens"] < 200
    forced = client.post(
        "/v1/completions",
        json={"prompt": prompt, "max_tokens": 60, "temperature": 0, "ban_eos_token": True},
    ).json()
    assert forced["usage"]["completion_tokens"] == 60
    assert forced["choices"][0]["finish_reason"] == "length"


def test_min_tokens(client: httpx.Client) -> None:
    prompt = "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n"
    r = client.post(
        "/v1/completions",
        json={"prompt": prompt, "max_tokens": 200, "temperature": 0, "min_tokens": 30},
    ).json()
    assert r["usage"]["completion_tokens"] >= 30


def test_sampler_order_and_priority_are_accepted(client: httpx.Client) -> None:
    a = gen(client, temperature=1.0, seed=2, sampler_order=[5, 6, 0, 1, 3, 4, 2])
    b = gen(
        client, temperature=1.0, seed=2, sampler_priority=["temperature", "top_k", "top_p", "min_p"]
    )
    assert a and b
