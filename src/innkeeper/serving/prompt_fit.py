"""Fitting a prompt and its length into the context, by the rules the clients expect.

Every route's prompt goes through here before anything starts: an empty prompt becomes the
BOS token, a length over the context is refused, and with `truncation_length` /
`max_context_length` the prompt is left-trimmed as text-generation-webui and KoboldCpp do.
Pure arithmetic on token lists, so it needs no engine.
"""

from __future__ import annotations

from innkeeper.engine.vision import MediaPrompt
from innkeeper.serving.errors import ParamError
from innkeeper.serving.generation import Generation


def check_lengths(gen: Generation, n_ctx: int) -> None:
    """No length spelling may ask for more than the context holds."""
    name, longest = gen.longest or ("max_tokens", gen.max_tokens)
    if longest is not None and longest > n_ctx:
        raise ParamError(f"{name} ({longest}) exceeds the context size ({n_ctx} tokens)")


def fit_prompt(
    prompt: list[int], gen: Generation, n_ctx: int, bos: int, media: MediaPrompt | None = None
) -> tuple[list[int], int]:
    """Check the prompt and length against the context; returns (prompt, max_tokens).

    With `truncation_length`/`max_context_length` the prompt is left-trimmed to fit, as
    text-generation-webui and KoboldCpp do (and, as KoboldCpp does, a length that would
    fill that whole window is cut to leave one prompt token); without, a prompt that
    leaves no room is a client error. `bos` < 0: the model has none.
    """
    if not prompt:
        if bos < 0:
            raise ParamError("the prompt is empty")
        prompt = [bos]
    check_lengths(gen, n_ctx)
    if gen.truncate_to:
        limit = min(gen.truncate_to, n_ctx)
        if gen.max_tokens is not None and gen.max_tokens >= limit > 1:
            gen.max_tokens = limit - 1
        keep = limit - (gen.max_tokens or 0)
        if keep <= 0:
            raise ParamError(
                f"max_tokens ({gen.max_tokens}) leaves no room for a prompt in a "
                f"context of {limit} tokens"
            )
        if len(prompt) > keep and media is not None:
            raise ParamError(
                f"the prompt has {len(prompt)} tokens with its images and cannot be "
                f"left-trimmed to {keep}: shorten it"
            )
        if len(prompt) > keep:
            head = prompt[:1] if prompt[0] == bos else []
            prompt = head + prompt[len(prompt) - keep + len(head) :]
    if len(prompt) >= n_ctx:
        raise ParamError(
            f"the prompt has {len(prompt)} tokens but the context holds {n_ctx}: "
            "no room to generate (shorten the prompt or start the server with a larger "
            "--ctx-size)"
        )
    room = n_ctx - len(prompt)
    max_tokens = min(gen.max_tokens, room) if gen.max_tokens else room
    return prompt, max_tokens
