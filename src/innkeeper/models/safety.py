"""Pickle weights scanning: report what a `.bin`/`.pt`/`.pth`/`.pkl`/`.ckpt` file would import.

A pickle is a program: loading it with `torch.load` or `pickle.load` can run any code. We never
unpickle. The opcodes are read by **picklescan**, chosen because it is the scanner the Hugging
Face hub itself runs on every upload (so its verdicts match the "unsafe" badges users see), it
understands PyTorch's zip and legacy formats, numpy and 7z containers without importing torch,
and it has no heavy dependencies. fickling decompiles pickles to Python (deeper, but heavier and
slower on multi-GB checkpoints); modelscan wraps several scanners with a larger dependency tree.

Safe formats (GGUF, safetensors) contain no code and are reported safe without a scan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz"}
_PICKLE_PROTOCOL_START = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
_ZIP_MAGIC = b"PK\x03\x04"


@dataclass(frozen=True)
class SafetyReport:
    """The verdict on one file or folder: `safe` is False when anything dangerous was found."""

    safe: bool
    verdict: str  # "safe" | "dangerous" | "suspicious" | "unscannable"
    scanned_files: int = 0
    dangerous_imports: tuple[str, ...] = ()
    suspicious_imports: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()
    scanner: str = "picklescan"
    files: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, object]:
        return {
            "safe": self.safe,
            "verdict": self.verdict,
            "scanner": self.scanner,
            "scanned_files": self.scanned_files,
            "dangerous_imports": list(self.dangerous_imports),
            "suspicious_imports": list(self.suspicious_imports),
            "errors": list(self.errors),
        }


def is_pickle_weights(path: Path | str) -> bool:
    """Whether `path` (a file, or a folder holding weights) is pickle-based weights.

    `serve` refuses these unless `--allow-pickle`: loading them can execute code. A folder
    counts as pickle when its only weights are pickle files (a folder that also has
    safetensors/GGUF weights would be loaded from those).
    """
    p = Path(path)
    if p.is_dir():
        files = [f for f in p.iterdir() if f.is_file()]
        if any(f.suffix in (".safetensors", ".gguf") for f in files):
            return False
        return any(_looks_like_pickle(f) for f in files if f.suffix.lower() in PICKLE_SUFFIXES)
    if not p.is_file():
        return False
    return (p.suffix.lower() in PICKLE_SUFFIXES and _looks_like_pickle(p)) or _sniff_pickle(p)


def _sniff_pickle(path: Path) -> bool:
    """Content check for pickles with unusual names: protocol-2+ header or a torch zip."""
    try:
        with path.open("rb") as fh:
            head = fh.read(4)
    except OSError:
        return False
    if head[:2] in _PICKLE_PROTOCOL_START:
        return True
    return head == _ZIP_MAGIC and path.suffix.lower() in PICKLE_SUFFIXES


def _looks_like_pickle(path: Path) -> bool:
    if path.suffix.lower() in (".npy", ".npz"):
        return True
    try:
        with path.open("rb") as fh:
            head = fh.read(4)
    except OSError:
        return False
    # .bin is also used for raw tensors (e.g. some GGML v1 files); require pickle/zip content.
    return head[:2] in _PICKLE_PROTOCOL_START or head == _ZIP_MAGIC or head[:1] in (b"\x80", b"(")


def scan_pickle(path: Path | str) -> SafetyReport:
    """Scan one pickle file or every pickle file in a folder, without unpickling anything."""
    from picklescan.scanner import SafetyLevel, scan_directory_path, scan_file_path

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p} does not exist")
    try:
        result = scan_directory_path(str(p)) if p.is_dir() else scan_file_path(str(p))
    except Exception as exc:  # picklescan raises on malformed archives
        return SafetyReport(False, "unscannable", errors=(f"{type(exc).__name__}: {exc}",))
    dangerous = sorted(
        {f"{g.module}.{g.name}" for g in result.globals if g.safety == SafetyLevel.Dangerous}
    )
    suspicious = sorted(
        {f"{g.module}.{g.name}" for g in result.globals if g.safety == SafetyLevel.Suspicious}
    )
    if dangerous:
        verdict = "dangerous"
    elif result.scan_err:
        verdict = "unscannable"
    elif suspicious:
        verdict = "suspicious"
    else:
        verdict = "safe"
    return SafetyReport(
        safe=verdict == "safe",
        verdict=verdict,
        scanned_files=result.scanned_files,
        dangerous_imports=tuple(dangerous),
        suspicious_imports=tuple(suspicious),
        errors=("the scanner could not parse every file",) if result.scan_err else (),
    )


def safe_format_report(fmt: str) -> SafetyReport:
    """The verdict for formats that cannot carry code (GGUF, safetensors)."""
    return SafetyReport(True, "safe", scanner=f"none needed ({fmt} holds no code)")
