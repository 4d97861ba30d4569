"""Tuned profiles: the fastest settings `innkeeper tune` measured, per model file and machine.

A profile is a small JSON file in innkeeper's config folder, one per model file (named by a
hash of its path). It records what it was measured on: the model file (size and a hash of its
first MiB, so a re-downloaded or replaced file is noticed) and the machine (CPU, cores, GPUs
and their memory, NVIDIA driver, llama.cpp build). Speed depends on all of them, so a profile
is used only where every one matches; otherwise `serve` says which one changed.

No engine import here: the caller passes the llama.cpp build's description in.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from innkeeper.models.hardware import detect_gpus

PROFILE_VERSION = 1
HEADER_BYTES = 2**20  # hashed from the start of the model file: metadata and first tensors

# Fingerprint keys, in the order a mismatch is reported, with the words for it.
_FINGERPRINT_WORDS = {
    "cpu": "CPU",
    "cores": "core count",
    "gpus": "GPUs",
    "driver": "GPU driver",
    "build": "llama.cpp build",
}


class ProfileError(Exception):
    """A profile file that cannot be read or written."""


def config_dir() -> Path:
    """innkeeper's config folder: $INNKEEPER_CONFIG, else $XDG_CONFIG_HOME/innkeeper."""
    env = os.environ.get("INNKEEPER_CONFIG")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "innkeeper"


def profiles_dir() -> Path:
    return config_dir() / "profiles"


def model_identity(path: Path) -> dict[str, Any]:
    """What makes a model file the same file: size and a hash of its first MiB."""
    resolved = path.resolve()
    digest = hashlib.sha256()
    with resolved.open("rb") as fh:
        digest.update(fh.read(HEADER_BYTES))
    return {"size": resolved.stat().st_size, "header_sha256": digest.hexdigest()}


def _cpu_model() -> str:
    """The CPU's marketing name (Linux /proc/cpuinfo), else what platform knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _driver_version() -> str:
    """The NVIDIA driver's version, or "" without one (most machines)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return ""
    try:
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:
        return ""
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def hardware_fingerprint(build: str) -> dict[str, Any]:
    """What this machine's speed depends on; `build` describes the llama.cpp in use."""
    return {
        "cpu": _cpu_model(),
        "cores": [psutil.cpu_count(logical=False) or 0, os.cpu_count() or 0],
        "gpus": [[g.name, g.total_bytes] for g in detect_gpus()],
        "driver": _driver_version(),
        "build": build,
    }


def fingerprint_mismatch(stored: dict[str, Any], current: dict[str, Any]) -> str | None:
    """Why a profile's machine is not this one ("GPUs changed: …"), or None when it is."""
    for key, words in _FINGERPRINT_WORDS.items():
        if stored.get(key) != current.get(key):
            if key == "build":
                return f"{words} changed"
            return f"{words} changed ({_short(stored.get(key))} -> {_short(current.get(key))})"
    return None


def _short(value: Any) -> str:
    if isinstance(value, list) and value and isinstance(value[0], list):  # GPUs
        return ", ".join(f"{name} {total / 2**30:.0f} GiB" for name, total in value)
    if value in ("", [], None):
        return "none"
    return str(value)


@dataclass
class Profile:
    """The winner of one `tune` run and what it was measured on."""

    model_path: str
    model: dict[str, Any]  # model_identity
    fingerprint: dict[str, Any]
    settings: dict[str, Any]  # EngineConfig field -> value, only those unlike serve's defaults
    ctx_size: int
    parallel: int
    speed: dict[str, float] = field(default_factory=dict)
    tuned_at: str = ""
    version: int = PROFILE_VERSION

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "model_path": self.model_path,
            "model": self.model,
            "fingerprint": self.fingerprint,
            "settings": self.settings,
            "ctx_size": self.ctx_size,
            "parallel": self.parallel,
            "speed": self.speed,
            "tuned_at": self.tuned_at,
        }

    @classmethod
    def from_json(cls, data: Any) -> Profile:
        if not isinstance(data, dict) or data.get("version") != PROFILE_VERSION:
            raise ProfileError("not a profile of this innkeeper version")
        try:
            return cls(
                model_path=str(data["model_path"]),
                model=dict(data["model"]),
                fingerprint=dict(data["fingerprint"]),
                settings=dict(data["settings"]),
                ctx_size=int(data["ctx_size"]),
                parallel=int(data["parallel"]),
                speed={str(k): float(v) for k, v in dict(data.get("speed") or {}).items()},
                tuned_at=str(data.get("tuned_at") or ""),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProfileError(f"malformed profile: {exc}") from None


def profile_path(model_path: Path, root: Path | None = None) -> Path:
    """Where the profile of `model_path` lives (one per resolved path)."""
    resolved = str(model_path.resolve())
    key = hashlib.sha256(resolved.encode()).hexdigest()[:16]
    return (root or profiles_dir()) / f"{model_path.stem[:40]}-{key}.json"


def save_profile(profile: Profile, root: Path | None = None) -> Path:
    """Write atomically (temporary file, fsync, rename): never a half-written profile."""
    target = profile_path(Path(profile.model_path), root)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".profile.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(profile.to_json(), fh, indent=2, sort_keys=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return target


def read_profile(model_path: Path, root: Path | None = None) -> Profile | None:
    """The stored profile of `model_path`, None if there is none; ProfileError if unreadable."""
    path = profile_path(model_path, root)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ProfileError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return Profile.from_json(json.loads(text))
    except json.JSONDecodeError as exc:
        raise ProfileError(f"{path} is not JSON: {exc}") from None


@dataclass(frozen=True)
class ProfileMatch:
    """The outcome of looking for a model's profile: the profile to use, or why none is."""

    profile: Profile | None
    reason: str  # why it is not used ("" when it is, or when there is none)
    path: Path


def find_profile(model_path: Path, build: str, root: Path | None = None) -> ProfileMatch:
    """The profile for `model_path` on this machine, or the reason the stored one does not fit."""
    path = profile_path(model_path, root)
    try:
        profile = read_profile(model_path, root)
    except ProfileError as exc:
        return ProfileMatch(None, str(exc), path)
    if profile is None:
        return ProfileMatch(None, "", path)
    try:
        if profile.model != model_identity(model_path):
            return ProfileMatch(None, "the model file changed since it was tuned", path)
    except OSError as exc:
        return ProfileMatch(None, f"cannot read the model file: {exc.strerror}", path)
    why = fingerprint_mismatch(profile.fingerprint, hardware_fingerprint(build))
    if why:
        return ProfileMatch(None, f"tuned on other hardware: {why}", path)
    return ProfileMatch(profile, "", path)
