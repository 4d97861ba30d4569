"""Embedding throughput: innkeeper against `llama-server --embeddings` on the same model.

Each request is what SillyTavern's Vector Storage sends when it indexes a chat: one
`POST /v1/embeddings` with 64 chunks of ~100 tokens. Both servers get the same model, threads,
flash attention and pooling; the report gives inputs/s and tokens/s per server (the median of
the rounds, interleaved) and the cosine between their vectors (they must agree).

    python -m bench.embeddings [--model PATH] [--rounds 3] [--llama-server PATH]

llama-server comes from `--llama-server`, $LLAMA_SERVER or the bench's cached build; it is
never built here (`python -m bench.llama_server` builds it): without one, innkeeper runs alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from bench.llama_server import LlamaServerError, find_llama_server
from bench.servers import RunningServer, innkeeper_spec, llama_server_spec, start

WORDS = [
    "the",
    "tavern",
    "keeper",
    "poured",
    "another",
    "round",
    "while",
    "the",
    "bard",
    "tuned",
    "a",
    "lute",
    "and",
    "old",
    "friends",
    "argued",
    "about",
    "dragons",
    "maps",
    "rivers",
    "gold",
    "storms",
    "ships",
    "lanterns",
    "and",
    "forgotten",
    "songs",
]


def chunks(n: int = 64, words: int = 75) -> list[str]:
    """`n` different texts of ~100 tokens each (deterministic: every run sends the same)."""
    return [
        " ".join(WORDS[(i * 7 + k * (i % 5 + 1)) % len(WORDS)] for k in range(words))
        for i in range(n)
    ]


def measure(server: RunningServer, texts: list[str]) -> tuple[float, int, np.ndarray]:
    """Seconds for one request of all `texts`, tokens embedded, and the vectors."""
    t0 = time.perf_counter()
    r = httpx.post(f"{server.url}/v1/embeddings", json={"input": texts}, timeout=600)
    seconds = time.perf_counter() - t0
    r.raise_for_status()
    body = r.json()
    vectors = np.asarray([d["embedding"] for d in sorted(body["data"], key=lambda d: d["index"])])
    return seconds, int(body["usage"]["prompt_tokens"]), vectors


def main(argv: list[str] | None = None) -> int:
    from innkeeper.models.store import default_model_path

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", type=Path, default=None, help="GGUF (default: embedded SmolLM2)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--inputs", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--flash-attn", choices=["off", "on"], default="on")
    p.add_argument("--pooling", default="mean")
    p.add_argument("--llama-server", help="llama-server binary (else $LLAMA_SERVER, else cache)")
    p.add_argument("--out", type=Path, help="write the result as JSON here too")
    args = p.parse_args(argv)
    model = args.model or default_model_path()
    common = {"threads": args.threads, "ctx_size": 2048, "flash_attn": args.flash_attn}
    emb = ["--pooling", args.pooling, "--ubatch-size", "2048", "--batch-size", "2048"]
    specs = [innkeeper_spec(model, **common, extra=emb)]
    note = None
    try:
        binary = find_llama_server(args.llama_server, build=False)
        specs.append(
            llama_server_spec(binary, model, parallel=8, **common, extra=["--embeddings", *emb])
        )
    except LlamaServerError as exc:
        note = f"llama-server not run: {exc}"
        print(note, file=sys.stderr)
    texts = chunks(args.inputs)
    results: dict[str, dict[str, object]] = {}
    vectors: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory(prefix="bench-embeddings-") as logs:
        servers = []
        try:
            for spec in specs:
                servers.append(start(spec, Path(logs)))
            times: dict[str, list[float]] = {s.spec.name: [] for s in servers}
            for s in servers:
                measure(s, texts[:4])  # warm-up: first-use allocations are not throughput
            for _ in range(args.rounds):
                for s in servers:
                    seconds, tokens, vecs = measure(s, texts)
                    times[s.spec.name].append(seconds)
                    vectors[s.spec.name] = vecs
                    results[s.spec.name] = {"tokens": tokens}
            for name, ts in times.items():
                med = statistics.median(ts)
                tokens = int(results[name]["tokens"])  # type: ignore[call-overload]
                results[name].update(
                    seconds=round(med, 3),
                    inputs_per_s=round(len(texts) / med, 1),
                    tokens_per_s=round(tokens / med, 1),
                )
        finally:
            for s in servers:
                s.stop()
    out: dict[str, object] = {"model": str(model), "inputs": len(texts), "servers": results}
    if len(vectors) == 2:
        a, b = vectors.values()
        cos = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        out["min_cosine"] = round(float(cos.min()), 6)
    if note:
        out["note"] = note
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
