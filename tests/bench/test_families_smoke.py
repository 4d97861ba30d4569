"""bench.families runs end to end: every family streams a first token from one server."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import families

pytestmark = pytest.mark.slow  # starts a real server: not in `make test-fast`


def test_every_family_reports_a_first_token(tmp_path: Path) -> None:
    out = tmp_path / "families.json"
    assert families.main(["--rounds", "1", "--threads", "1", "--out", str(out)]) == 0
    ttft = json.loads(out.read_text())["ttft"]
    assert set(ttft) == set(families.FAMILIES)
    assert all(row["n"] == 1 and row["median_ms"] > 0 for row in ttft.values())
