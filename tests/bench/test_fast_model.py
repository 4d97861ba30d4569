"""bench/fast_model.py and the bench's `fast` model and `--gen-tokens` option.

The `fast` model stands in for a small model on a GPU (tokens so cheap that the server's own
per-token work dominates): it must be servable, decode far faster than SmolLM2, and be the
same file on every machine so results compare across runs.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import fast_model, overhead, run  # noqa: E402


def test_the_fast_model_is_the_same_file_every_time_and_decodes_fast(tmp_path: Path) -> None:
    from innkeeper.models.store import default_model_path

    a = fast_model.write_fast_model(tmp_path / "a.gguf", default_model_path())
    b = fast_model.write_fast_model(tmp_path / "b.gguf", default_model_path())
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()
    result = overhead.measure(overhead.parse_args([str(a), "--tokens", "64", "--repeats", "1"]))
    assert result["tokens_per_run"] == 64
    # ~0.3 ms of llama_decode a token here (SmolLM2: ~6 ms); 2 ms leaves room for a slow CI.
    assert result["median_per_token"]["engine_in_decode_us"] < 2000


def test_gen_tokens_sizes_single_and_concurrency_requests() -> None:
    cfg = run.scenario_config(run.parse_args(["--gen-tokens", "1024"]))
    assert cfg.single_tokens == cfg.conc_tokens == 1024
    quick = run.scenario_config(run.parse_args(["--quick"]))
    assert (quick.single_tokens, quick.conc_tokens) == (128, 64)  # the defaults stay
    with pytest.raises(SystemExit):
        run.parse_args(["--gen-tokens", "1"])
