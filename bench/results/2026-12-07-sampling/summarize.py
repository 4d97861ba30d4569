"""Tables of this folder's bench.overhead results (run.sh wrote them): python summarize.py."""

import json
import statistics as st
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODELS = {"smollm2": "SmolLM2-135M Q4_1 (49k vocab)", "gemma3": "Gemma 3 270M Q4_K_M (262k)"}
SAMPLING = ["greedy", "min-p", "top-k", "rep-pen"]


def load(name: str) -> dict | None:
    path = HERE / name
    return json.loads(path.read_text()) if path.exists() else None


def tok_s(result: dict, peer: bool = False) -> list[float]:
    n = result["tokens_per_run"] * result["streams"]
    runs = result["peer"]["samples"] if peer else result["samples"]
    return [n / r["wall_s"] for r in runs]


def peer_row(desc: str, sampling: str, r: dict) -> str:
    med = r["median_per_token"]
    a, b = tok_s(r), tok_s(r, True)
    ratio = st.median(x / y for x, y in zip(a, b, strict=True))
    return (
        f"| {desc} | {sampling} | {med['engine_outside_decode_us']:.0f} | "
        f"{med['sampler_c_us']:.0f} | {med['event_loop_us']:.0f} | "
        f"{r['peer']['engine_minus_decode_thread_us']:+.0f} | "
        f"{r['peer']['loop_minus_other_threads_us']:+.0f} | "
        f"{r.get('wake_floor_us', float('nan')):.0f} | "
        f"{st.median(a):.1f} / {st.median(b):.1f} = **{ratio:.3f}x** |"
    )


def main() -> None:
    print("## innkeeper against llama-server, per token (µs of CPU) and end to end\n")
    print(
        "| model | sampling | engine thread outside decode | of it sampling | event loop | "
        "engine - llama-server decode thread | loop - llama-server HTTP threads | "
        "wake floor | tok/s innkeeper / llama-server (paired) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    runs = [(f"peer-{m}-{s}.json", desc, s) for m, desc in MODELS.items() for s in SAMPLING]
    runs += [
        ("peer-fast-greedy.json", "fast (2x64, 49k vocab)", "greedy"),
        ("peer-smollm2-greedy-4streams.json", "SmolLM2, 4 streams", "greedy"),
    ]
    for name, desc, sampling in runs:
        r = load(name)
        if r:
            print(peer_row(desc, sampling, r))

    print("\n## The sampler shortcuts in place: numpy's work against llama.cpp's plain chains\n")
    print(
        "| model | sampling | sampling, shortcuts | sampling, plain chains | paired difference | "
        "engine thread outside decode, paired difference |"
    )
    print("|---|---|---|---|---|---|")
    for m, desc in MODELS.items():
        for s in SAMPLING:
            r = load(f"shortcuts-{m}-{s}.json")
            if not r:
                continue
            pc = r["plain_chains"]
            print(
                f"| {desc} | {s} | {r['median_per_token']['sampler_c_us']:.0f} | "
                f"{pc['median_per_token']['sampler_c_us']:.0f} | "
                f"**{pc['sampling_difference_us']:+.0f}** | "
                f"{pc['outside_decode_difference_us']:+.0f} |"
            )


if __name__ == "__main__":
    main()
