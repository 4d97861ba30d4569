"""The admin rule: what a request may cause beyond being answered.

Loading, unloading and evicting models change what every other user of the server gets, so
they are admin actions wherever they can happen: the admin routes, autoload (a request naming
a model that is not loaded), `keep_alive` (which unloads a model early) and the model a
request names (`model`, `?model=`). The api layer decides who the caller is (an admin key, or
a keyless loopback server where everyone is the machine's owner) and passes a `Caller`; the
registry enforces the rule where the effect happens, so no route can forget it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from innkeeper.serving.errors import ParamError


@dataclass(frozen=True)
class Caller:
    """Who asks. `admin`: may load, unload and evict models (and see host paths)."""

    admin: bool


SERVER = Caller(admin=True)  # the server itself: the model `serve` starts with, shutdown


def keep_alive_allowed(caller: Caller, keep_alive: float, server_idle: float) -> bool:
    """Whether `keep_alive` (seconds; negative: forever) may take effect for this caller.

    Anyone may keep a model loaded longer than the server would; only an admin may have it
    unloaded sooner (`keep_alive: 0` from a chat client would otherwise unload the model
    for everyone). `server_idle` is --idle-unload (0: never unloads)."""
    if caller.admin or keep_alive < 0:
        return True
    if server_idle <= 0:
        return False  # the server keeps models forever: any limit is sooner
    return keep_alive >= server_idle


def check_keep_alive(seconds: float) -> float:
    """Refuse what is not a duration: NaN, and infinities (say -1 for forever)."""
    if not math.isfinite(seconds):
        raise ParamError(
            f"keep_alive must be a finite number of seconds, or -1 to keep the model loaded "
            f"(got {seconds})"
        )
    return seconds


def redact_paths(text: str, paths: list[Path]) -> str:
    """`text` with each host path (and its folder) cut down to the file name, for callers
    who are not admins on a keyed or exposed server."""
    for path in sorted(paths, key=lambda p: len(str(p)), reverse=True):
        for spelling in {str(path), str(path.resolve()) if path.exists() else str(path)}:
            text = text.replace(spelling, path.name)
        for folder in {str(path.parent), str(path.parent.resolve())}:
            if len(folder) > 1:
                text = text.replace(folder + "/", "")
    return text
