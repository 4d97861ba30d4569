"""Time to first token through each API family, on one innkeeper server, same prompt.

Every family ends in the same scheduler, so the difference between them is what each route
adds: parsing, template rendering, framing (SSE or NDJSON). The families are alternated
round by round (ABCD, then DCBA…) so drift on a busy machine spreads over all of them; the
report gives each family's median and its difference from OpenAI chat.

    python -m bench.families [--rounds 20] [--model PATH] [--out bench/results/families.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from bench.servers import innkeeper_spec, start

MESSAGES = [{"role": "user", "content": "Write one sentence about a lighthouse keeper."}]
PROMPT = "<|im_start|>user\nWrite one sentence about a lighthouse keeper.<|im_end|>\n"
PROMPT += "<|im_start|>assistant\n"
MAX_TOKENS = 8


def _first_line_time(
    client: httpx.Client,
    method: str,
    url: str,
    body: dict[str, Any],
    is_token: Callable[[str], bool],
) -> float:
    """Seconds from sending the request to the first streamed line that carries text."""
    t0 = time.perf_counter()
    first: float | None = None
    with client.stream(method, url, json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():  # read it all: the slot is free for the next request
            if first is None and line and is_token(line):
                first = time.perf_counter() - t0
    if first is None:
        raise RuntimeError(f"{url}: no token in the stream")
    return first


def _has_sse_text(key: str) -> Callable[[str], bool]:
    def check(line: str) -> bool:
        if not line.startswith("data: ") or line == "data: [DONE]":
            return False
        return bool(json.loads(line[6:]).get(key) or _delta(json.loads(line[6:])))

    return check


def _delta(event: dict[str, Any]) -> str:
    choices = event.get("choices") or [{}]
    return str((choices[0].get("delta") or {}).get("content") or "")


def _ollama_text(line: str) -> bool:
    return bool(json.loads(line).get("message", {}).get("content"))


FAMILIES: dict[str, tuple[str, str, dict[str, Any], Callable[[str], bool]]] = {
    "openai_chat": (
        "POST",
        "/v1/chat/completions",
        {"messages": MESSAGES, "max_tokens": MAX_TOKENS, "stream": True, "temperature": 0},
        _has_sse_text("content"),
    ),
    "ollama_chat": (
        "POST",
        "/api/chat",
        {
            "model": "",
            "messages": MESSAGES,
            "stream": True,
            "options": {"num_predict": MAX_TOKENS, "temperature": 0},
        },
        _ollama_text,
    ),
    "llamacpp_completion": (
        "POST",
        "/completion",
        {"prompt": PROMPT, "n_predict": MAX_TOKENS, "stream": True, "temperature": 0},
        _has_sse_text("content"),
    ),
    "kobold_stream": (
        "POST",
        "/api/extra/generate/stream",
        {"prompt": PROMPT, "max_length": MAX_TOKENS, "temperature": 0.01},
        _has_sse_text("token"),
    ),
}


def measure(url: str, rounds: int) -> dict[str, list[float]]:
    """TTFT samples per family, alternating the order each round."""
    names = list(FAMILIES)
    samples: dict[str, list[float]] = {n: [] for n in names}
    with httpx.Client(base_url=url, timeout=120) as client:
        model = client.get("/api/tags").json()["models"][0]["name"]
        FAMILIES["ollama_chat"][2]["model"] = model
        for name in names:  # warm-up: template caches, first allocation
            method, path, body, check = FAMILIES[name]
            _first_line_time(client, method, path, body, check)
        for i in range(rounds):
            for name in names if i % 2 == 0 else reversed(names):
                method, path, body, check = FAMILIES[name]
                samples[name].append(_first_line_time(client, method, path, body, check))
    return samples


def report(samples: dict[str, list[float]]) -> dict[str, Any]:
    base = statistics.median(samples["openai_chat"])
    return {
        name: {
            "median_ms": round(statistics.median(s) * 1000, 2),
            "vs_openai_chat_ms": round((statistics.median(s) - base) * 1000, 2),
            "n": len(s),
        }
        for name, s in samples.items()
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--model", help="a GGUF (default: the embedded SmolLM2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.model is None:
        from innkeeper.models.store import default_model_path

        args.model = str(default_model_path())
    spec = innkeeper_spec(Path(args.model), threads=args.threads, ctx_size=2048, flash_attn="auto")
    server = start(spec, Path(tempfile.mkdtemp(prefix="bench-families-")))
    try:
        result = report(measure(server.url, args.rounds))
    finally:
        server.stop()
    text = json.dumps({"model": Path(args.model).name, "ttft": result}, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
