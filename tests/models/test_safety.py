"""Pickle scanning: a hostile pickle is reported with its imports and never executed."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

from innkeeper.models.safety import is_pickle_weights, scan_pickle


# PROTO 2; GLOBAL 'os system'; 'touch MARKER'; TUPLE1; REDUCE; STOP — written by hand, never loaded.
def _evil(marker: Path) -> bytes:
    cmd = f"touch {marker}".encode()
    return (
        b"\x80\x02cos\nsystem\nq\x00X"
        + len(cmd).to_bytes(4, "little")
        + cmd
        + b"q\x01\x85q\x02Rq\x03."
    )


def test_malicious_pickle_is_reported_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    bad = tmp_path / "pytorch_model.bin"
    bad.write_bytes(_evil(marker))
    report = scan_pickle(bad)
    assert not report.safe
    assert report.verdict == "dangerous"
    assert "os.system" in report.dangerous_imports
    assert not marker.exists()
    assert is_pickle_weights(bad)
    assert report.to_json()["dangerous_imports"] == ["os.system"]


def test_malicious_pickle_inside_torch_zip(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    bad = tmp_path / "model.pt"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("archive/data.pkl", _evil(marker))
    report = scan_pickle(bad)
    assert report.verdict == "dangerous" and "os.system" in report.dangerous_imports
    assert not marker.exists()


def test_plain_pickle_is_safe(tmp_path: Path) -> None:
    ok = tmp_path / "weights.bin"
    ok.write_bytes(pickle.dumps({"layer": [1.0, 2.0]}, protocol=2))
    report = scan_pickle(ok)
    assert report.safe and report.verdict == "safe"


def test_is_pickle_weights(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps([1], protocol=2))
    assert is_pickle_weights(folder)
    (folder / "model.safetensors").write_bytes(b"x")
    assert not is_pickle_weights(folder)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(20))
    assert not is_pickle_weights(gguf)
    assert not is_pickle_weights(tmp_path / "missing.bin")
    raw = tmp_path / "ggml-model.bin"
    raw.write_bytes(b"lmgg" + bytes(100))  # an old GGML file, not a pickle
    assert not is_pickle_weights(raw)
