"""Async HTTP load generator: the scenarios, run against any OpenAI `/v1/completions` server.

Every request streams (`stream: true`) so time to first token (TTFT) is seen from the client,
HTTP included, exactly as SillyTavern sees it. Generation is forced to full length with
`ignore_eos: true` (llama-server and innkeeper both accept it), so both sides decode the same
number of tokens.

Token counting: `usage.completion_tokens` when the server gives it (its last stream chunk);
else `max_tokens` when `finish_reason` is "length"; else the number of text chunks. The method
used is stored with each request (`count`). Prompt tokens: `usage.prompt_tokens`, else the
reference server's `/tokenize`.

Prompts are random English words from a per-run random seed; every prompt that must be cold
starts with a unique `Session xxxxxxxx-xxxx.` line, so no server can answer it from a prompt
cache filled by an earlier request or an earlier run (llama-server keeps old prompts in RAM).
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

# The same request for every server (the peers' baseline used these).
SAMPLING: dict[str, Any] = {
    "temperature": 0.7,
    "top_k": 40,
    "top_p": 0.95,
    "min_p": 0.05,
    "repeat_penalty": 1.0,
    "seed": 1234,
}

_WORDS_TEXT = (
    "the of and to in is was for on that with as by at from his her it an were are which this "
    "be or has had not but one after first new two their they been who more also its into "
    "other some time when would than there city year years school war world only over where "
    "about during most through people state may many between later made such then under while "
    "including part both well these because being since team before three used known high what "
    "second both early same work life family found name series including several group began "
    "river house music village north south east west small large night water market garden "
    "castle forest window letter morning evening summer winter story song road bridge harbor "
    "station teacher doctor farmer captain soldier merchant painter sailor baker writer stone "
    "silver golden quiet bright ancient narrow gentle sudden careful honest clever hungry tired "
    "brave proud warm cold heavy empty green blue red old young long short walked carried "
    "opened watched remembered answered followed wondered waited smiled whispered laughed "
    "travelled painted gathered borrowed promised noticed believed returned climbed crossed "
    "lantern tavern kettle blanket candle mirror ladder basket feather wagon anchor orchard "
    "meadow valley island tower chapel library cellar kitchen courtyard fountain barrel cloak"
)
WORDS = _WORDS_TEXT.split()


def make_words(rng: random.Random, n_words: int) -> str:
    """`n_words` random words, loosely punctuated into sentences so tokenizers see prose."""
    out: list[str] = []
    sentence = 0
    for _ in range(max(1, n_words)):
        word = rng.choice(WORDS)
        out.append(word.capitalize() if sentence == 0 else word)
        sentence += 1
        if sentence >= rng.randint(8, 16):
            out[-1] += "."
            sentence = 0
    return " ".join(out)


def make_nonce(rng: random.Random) -> str:
    """A `Session xxxxxxxx-xxxx.` line that makes a prompt unique from its first token."""
    return f"Session {rng.getrandbits(32):08x}-{rng.getrandbits(16):04x}."


@dataclass
class TextGen:
    """Random prompts of a wanted size in tokens (calibrated words-per-token of the model)."""

    rng: random.Random
    tokens_per_word: float = 1.3

    def words(self, n_tokens: int) -> str:
        return make_words(self.rng, round(n_tokens / self.tokens_per_word))

    def cold(self, n_tokens: int) -> str:
        """A unique prompt of about `n_tokens` tokens (nonce line included)."""
        return f"{make_nonce(self.rng)} {self.words(max(1, n_tokens - 8))}"


@dataclass
class RequestResult:
    """One streamed completion as the client saw it."""

    ttft: float  # seconds from sending the request to the first text chunk
    total: float  # seconds from sending the request to the end of the stream
    completion_tokens: int
    count: str  # how completion_tokens was obtained: usage | length | chunks
    prompt_tokens: int | None
    cached_tokens: int | None
    finish_reason: str | None
    text: str
    decode_tps: float | None  # (tokens - 1) / (last chunk - first chunk); None below 2 tokens
    error: str | None = None

    def brief(self) -> dict[str, Any]:
        """The record stored in the JSON file (the text is dropped: it is random words)."""
        rec = asdict(self)
        rec.pop("text")
        return rec


@dataclass
class Target:
    """A server under test: a name for reports and its base URL."""

    name: str
    url: str
    extra: dict[str, Any] = field(default_factory=dict)  # added to every request body


def _count(
    usage: dict[str, Any] | None, finish: str | None, max_tokens: int, chunks: int
) -> tuple[int, str]:
    if usage and isinstance(usage.get("completion_tokens"), int):
        return int(usage["completion_tokens"]), "usage"
    if finish == "length":
        return max_tokens, "length"
    return chunks, "chunks"


async def stream_completion(
    client: httpx.AsyncClient,
    target: Target,
    prompt: str,
    max_tokens: int,
    *,
    timeout: float = 300.0,
) -> RequestResult:
    """POST one streaming /v1/completions request and time it chunk by chunk."""
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
        **SAMPLING,
        **target.extra,
    }
    t0 = time.perf_counter()
    first: float | None = None
    last: float | None = None
    text: list[str] = []
    chunks = 0
    usage: dict[str, Any] | None = None
    finish: str | None = None
    error: str | None = None
    try:
        async with client.stream(
            "POST", f"{target.url}/v1/completions", json=body, timeout=timeout
        ) as resp:
            if resp.status_code != 200:
                raw = await resp.aread()
                error = f"HTTP {resp.status_code}: {raw[:300].decode(errors='replace')}"
            else:
                async for line in resp.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    now = time.perf_counter()
                    msg = json.loads(data)
                    if "error" in msg:
                        error = str(msg["error"])[:300]
                        break
                    if msg.get("usage"):
                        usage = msg["usage"]
                    for choice in msg.get("choices") or []:
                        piece = choice.get("text") or ""
                        if piece:
                            chunks += 1
                            text.append(piece)
                            if first is None:
                                first = now
                            last = now
                        if choice.get("finish_reason"):
                            finish = choice["finish_reason"]
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    end = time.perf_counter()
    n, method = _count(usage, finish, max_tokens, chunks)
    if first is None and error is None:
        error = "no text chunk in the stream"
    ttft = (first if first is not None else end) - t0
    decode = None
    if first is not None and last is not None and n >= 2 and last > first:
        decode = (n - 1) / (last - first)
    details = (usage or {}).get("prompt_tokens_details") or {}
    prompt_tokens = (usage or {}).get("prompt_tokens")
    return RequestResult(
        ttft=ttft,
        total=end - t0,
        completion_tokens=n,
        count=method,
        prompt_tokens=prompt_tokens if isinstance(prompt_tokens, int) else None,
        cached_tokens=details.get("cached_tokens"),
        finish_reason=finish,
        text="".join(text),
        decode_tps=decode,
        error=error,
    )


async def tokenize(client: httpx.AsyncClient, url: str, text: str) -> list[int]:
    """Token ids from a llama.cpp-style `/tokenize` endpoint."""
    resp = await client.post(f"{url}/tokenize", json={"content": text}, timeout=60)
    resp.raise_for_status()
    tokens = resp.json()["tokens"]
    return [t if isinstance(t, int) else int(t["id"]) for t in tokens]


Counter = Callable[[str], Awaitable[int]]


# ---------------------------------------------------------------- scenario settings


@dataclass
class ScenarioConfig:
    """Sizes of every scenario; `quick()` is the ~3-minute smoke version."""

    single_requests: int = 3
    single_tokens: int = 128
    short_prompt_tokens: int = 77
    prompt_requests: int = 3
    prompt_tokens: int = 1000
    chat_turns: int = 10
    chat_system_tokens: int = 500
    chat_user_tokens: int = 40
    chat_reply_tokens: int = 48
    trim_exchanges: int = 3  # oldest user/assistant pairs dropped by the top-trim
    revisit_turns: int = 3  # turns of the chat that is left and revisited
    revisit_other_tokens: int = 1000  # the other conversation's prompt in between
    conc_levels: tuple[int, ...] = (1, 2, 4, 8)
    conc_per_client: int = 2
    conc_tokens: int = 128

    @classmethod
    def quick(cls) -> ScenarioConfig:
        return cls(
            single_requests=1,
            prompt_requests=1,
            chat_reply_tokens=24,
            conc_per_client=1,
            conc_tokens=64,
        )


@dataclass
class ScenarioResult:
    """Metrics of one scenario on one server in one round, plus the raw requests."""

    metrics: dict[str, float]
    requests: list[dict[str, Any]]
    errors: list[str]


def _median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def _errors(results: list[RequestResult]) -> list[str]:
    return [r.error for r in results if r.error]


# ---------------------------------------------------------------- scenarios


async def scenario_single(
    client: httpx.AsyncClient, target: Target, gen: TextGen, cfg: ScenarioConfig, count: Counter
) -> ScenarioResult:
    """Single-stream decode: one request at a time, short unique prompt, fixed length.

    decode_tps is tokens/s after the first token (what one user watches), ttft_short_s the
    first-token latency of the ~77-token prompt (which is mostly its prompt processing).
    """
    results = []
    for _ in range(cfg.single_requests):
        r = await stream_completion(
            client, target, gen.cold(cfg.short_prompt_tokens), cfg.single_tokens
        )
        results.append(r)
    ok = [r for r in results if r.error is None]
    return ScenarioResult(
        metrics={
            "decode_tps": _median([r.decode_tps for r in ok if r.decode_tps]),
            "ttft_short_s": _median([r.ttft for r in ok]),
        },
        requests=[r.brief() for r in results],
        errors=_errors(results),
    )


async def scenario_prompt(
    client: httpx.AsyncClient, target: Target, gen: TextGen, cfg: ScenarioConfig, count: Counter
) -> ScenarioResult:
    """Prompt processing: a cold ~1000-token prompt, max_tokens 1; prompt tokens / TTFT."""
    results = []
    rates = []
    for _ in range(cfg.prompt_requests):
        prompt = gen.cold(cfg.prompt_tokens)
        r = await stream_completion(client, target, prompt, 1)
        if r.prompt_tokens is None and r.error is None:
            r.prompt_tokens = await count(prompt)
        results.append(r)
        if r.error is None and r.prompt_tokens:
            rates.append(r.prompt_tokens / r.ttft)
    ok = [r for r in results if r.error is None]
    return ScenarioResult(
        metrics={
            "pp_tps": _median(rates),
            "ttft_prompt_s": _median([r.ttft for r in ok]),
            "prompt_tokens": _median([float(r.prompt_tokens or 0) for r in ok]),
        },
        requests=[r.brief() for r in results],
        errors=_errors(results),
    )


@dataclass
class Chat:
    """A SillyTavern-style text-completion chat: system text, then User/Assistant turns."""

    system: str
    history: list[tuple[str, str]] = field(default_factory=list)

    def prompt(self, user: str) -> str:
        parts = [self.system]
        for u, a in self.history:
            parts.append(f"\nUser: {u}\nAssistant: {a}")
        parts.append(f"\nUser: {user}\nAssistant:")
        return "".join(parts)


def shadow(gen: TextGen, chat: Chat, user: str) -> str:
    """A prompt with the same shape and word counts as `chat.prompt(user)` but new words.

    Used as the "cold run of the same prompt": re-sending the very same text would hit the
    prefix cache, and changing only the nonce on top would let a server that reuses shifted
    chunks (llama-server's --cache-reuse) answer from cache. New words everywhere cannot.
    """

    def same_size(text: str) -> str:
        return make_words(gen.rng, len(text.split()))

    cold = Chat(f"{make_nonce(gen.rng)} {same_size(chat.system)}")
    cold.history = [(same_size(u), same_size(a)) for u, a in chat.history]
    return cold.prompt(same_size(user))


async def _cold_ttft(
    client: httpx.AsyncClient, target: Target, prompt: str, count: Counter
) -> RequestResult:
    r = await stream_completion(client, target, prompt, 1)
    if r.prompt_tokens is None and r.error is None:
        r.prompt_tokens = await count(prompt)
    return r


def _scaled_ratio(warm: RequestResult, cold: RequestResult) -> float:
    """warm TTFT / cold TTFT, the cold one scaled to the warm prompt's token count."""
    if warm.error or cold.error or not warm.prompt_tokens or not cold.prompt_tokens:
        return float("nan")
    cold_same_size = cold.ttft * warm.prompt_tokens / cold.prompt_tokens
    return warm.ttft / cold_same_size


async def scenario_chat(
    client: httpx.AsyncClient, target: Target, gen: TextGen, cfg: ScenarioConfig, count: Counter
) -> ScenarioResult:
    """A growing chat, then a top-trim, then both final prompts sent cold.

    Turns 1..N: system text (~500 tokens, unique), ~40-token user messages, replies of
    `chat_reply_tokens` appended; the whole history is resent each turn, as SillyTavern does.
    Trim: the oldest `trim_exchanges` user/assistant pairs are dropped (system text kept) and a
    new user message added: the request SillyTavern sends once the context is full.
    Cold: prompts of the same shape and size with all-new words (see `shadow`), max_tokens 1.
    """
    chat = Chat(f"{make_nonce(gen.rng)} {gen.words(cfg.chat_system_tokens)}")
    turns: list[RequestResult] = []
    last_prompt = ""
    last_user = ""
    for _ in range(cfg.chat_turns):
        user = gen.words(cfg.chat_user_tokens)
        last_prompt, last_user = chat.prompt(user), user
        r = await stream_completion(client, target, last_prompt, cfg.chat_reply_tokens)
        turns.append(r)
        chat.history.append((user, r.text.strip()))
    final = turns[-1]
    if final.prompt_tokens is None and final.error is None:
        final.prompt_tokens = await count(last_prompt)
    # The top-trim comes right after turn N, while the chat is still the server's latest.
    trimmed = Chat(chat.system, chat.history[cfg.trim_exchanges :])
    trim_user = gen.words(cfg.chat_user_tokens)
    trim_prompt = trimmed.prompt(trim_user)
    trim = await stream_completion(client, target, trim_prompt, cfg.chat_reply_tokens)
    if trim.prompt_tokens is None and trim.error is None:
        trim.prompt_tokens = await count(trim_prompt)
    # Both prompts again, cold (the turn-N one built from the history as it was at turn N).
    at_last = Chat(chat.system, chat.history[:-1])
    cold_final = await _cold_ttft(client, target, shadow(gen, at_last, last_user), count)
    cold_trim = await _cold_ttft(client, target, shadow(gen, trimmed, trim_user), count)

    metrics: dict[str, float] = {}
    for i in (1, 5):
        if i < len(turns) and turns[i - 1].error is None:
            metrics[f"chat_t{i}_s"] = turns[i - 1].ttft
    metrics["chat_tN_s"] = final.ttft if final.error is None else float("nan")
    metrics["chat_tN_cold_s"] = cold_final.ttft if cold_final.error is None else float("nan")
    metrics["chat_tN_over_cold"] = _scaled_ratio(final, cold_final)
    metrics["chat_tN_prompt_tokens"] = float(final.prompt_tokens or float("nan"))
    metrics["trim_s"] = trim.ttft if trim.error is None else float("nan")
    metrics["trim_cold_s"] = cold_trim.ttft if cold_trim.error is None else float("nan")
    metrics["trim_over_cold"] = _scaled_ratio(trim, cold_trim)
    metrics["trim_prompt_tokens"] = float(trim.prompt_tokens or float("nan"))
    if trim.cached_tokens is not None:
        metrics["trim_cached_tokens"] = float(trim.cached_tokens)
    everything = [*turns, trim, cold_final, cold_trim]
    steps = [f"turn{i + 1}" for i in range(len(turns))] + ["trim", "cold_final", "cold_trim"]
    records = [{**r.brief(), "step": step} for r, step in zip(everything, steps, strict=True)]
    return ScenarioResult(metrics=metrics, requests=records, errors=_errors(everything))


async def scenario_concurrency(
    client: httpx.AsyncClient, target: Target, gen: TextGen, cfg: ScenarioConfig, count: Counter
) -> ScenarioResult:
    """N streaming clients at once (each sends `conc_per_client` requests back to back).

    agg_cN: all completion tokens / wall time of the level; ttft_med_cN / ttft_max_cN over
    every request of the level; ttft_max_over_med_cN is the fairness check (≤ 2 wanted).
    """
    metrics: dict[str, float] = {}
    records: list[dict[str, Any]] = []
    errors: list[str] = []

    async def one_client() -> list[RequestResult]:
        out = []
        for _ in range(cfg.conc_per_client):
            prompt = gen.cold(cfg.short_prompt_tokens)
            out.append(await stream_completion(client, target, prompt, cfg.conc_tokens))
        return out

    for level in cfg.conc_levels:
        t0 = time.perf_counter()
        per_client = await asyncio.gather(*(one_client() for _ in range(level)))
        wall = time.perf_counter() - t0
        results = [r for rs in per_client for r in rs]
        ok = [r for r in results if r.error is None]
        ttfts = [r.ttft for r in ok]
        metrics[f"agg_c{level}"] = sum(r.completion_tokens for r in ok) / wall
        metrics[f"ttft_med_c{level}"] = _median(ttfts)
        metrics[f"ttft_max_c{level}"] = max(ttfts) if ttfts else float("nan")
        metrics[f"ttft_max_over_med_c{level}"] = (
            max(ttfts) / _median(ttfts) if ttfts else float("nan")
        )
        metrics[f"failed_c{level}"] = float(len(results) - len(ok))
        for r in results:
            rec = r.brief()
            rec["level"] = level
            records.append(rec)
        errors += _errors(results)
    return ScenarioResult(metrics=metrics, requests=records, errors=errors)


async def scenario_revisit(
    client: httpx.AsyncClient, target: Target, gen: TextGen, cfg: ScenarioConfig, count: Counter
) -> ScenarioResult:
    """Return to an earlier chat after another conversation's long prompt.

    A chat (system text + `revisit_turns` turns) gets one more turn right away: its TTFT is
    the cost of the new tokens alone (`revisit_warm_s`). Then another user's cold
    ~1000-token prompt runs (it takes the slot, or the window, from the chat), and the chat
    comes back with a same-size turn: `revisit_overhead_s` = its TTFT - the warm turn's, what
    returning costs beyond the new tokens (goal ≤ 0.1 s).
    """
    chat = Chat(f"{make_nonce(gen.rng)} {gen.words(cfg.chat_system_tokens)}")
    steps: list[tuple[str, RequestResult]] = []
    for i in range(cfg.revisit_turns + 1):
        user = gen.words(cfg.chat_user_tokens)
        r = await stream_completion(client, target, chat.prompt(user), cfg.chat_reply_tokens)
        steps.append((f"turn{i + 1}", r))
        chat.history.append((user, r.text.strip()))
    warm = steps[-1][1]
    other = await stream_completion(client, target, gen.cold(cfg.revisit_other_tokens), 8)
    steps.append(("other", other))
    back = await stream_completion(
        client, target, chat.prompt(gen.words(cfg.chat_user_tokens)), cfg.chat_reply_tokens
    )
    steps.append(("revisit", back))
    ok = warm.error is None and back.error is None
    metrics = {
        "revisit_warm_s": warm.ttft if warm.error is None else float("nan"),
        "revisit_s": back.ttft if back.error is None else float("nan"),
        "revisit_overhead_s": back.ttft - warm.ttft if ok else float("nan"),
    }
    if back.cached_tokens is not None:
        metrics["revisit_cached_tokens"] = float(back.cached_tokens)
    records = [{**r.brief(), "step": step} for step, r in steps]
    return ScenarioResult(metrics=metrics, requests=records, errors=_errors([r for _, r in steps]))


Scenario = Callable[
    [httpx.AsyncClient, Target, TextGen, ScenarioConfig, Counter], Awaitable[ScenarioResult]
]

SCENARIOS: dict[str, Scenario] = {
    "single": scenario_single,
    "prompt": scenario_prompt,
    "chat": scenario_chat,
    "revisit": scenario_revisit,
    "concurrency": scenario_concurrency,
}


async def calibrate(client: httpx.AsyncClient, url: str, rng: random.Random) -> float:
    """Tokens per generated word for this model, so prompt sizes land near their targets."""
    text = make_words(rng, 600)
    return len(await tokenize(client, url, text)) / 600


def new_client() -> httpx.AsyncClient:
    """One keep-alive client per scenario run, with room for the widest concurrency level."""
    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
    return httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(300.0, connect=10.0))
