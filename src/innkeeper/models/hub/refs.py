"""What the user types for a hub model: `owner/name[:QUANT]`, `owner/name/path/file.gguf`, or a
hub page URL (`https://huggingface.co/owner/name/blob/main/file.gguf`)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from innkeeper.models import store
from innkeeper.models.hub.errors import HubRefError

_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
_PART_RE = re.compile(rf"^{_PART}$")
_TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_URL_PREFIXES = ("https://huggingface.co/", "http://huggingface.co/", "huggingface.co/", "hf.co/")
_URL_PREFIXES += ("https://hf.co/", "hf://")


@dataclass(frozen=True)
class HubRef:
    """`owner/name`, `owner/name:QUANT` or `owner/name/path/to/file.gguf`."""

    repo_id: str
    quant: str | None = None
    filename: str | None = None
    revision: str | None = None


def parse_ref(text: str) -> HubRef:
    """Parse what the user typed; hub page URLs (…/blob/main/file.gguf) are accepted too."""
    ref = text.strip()
    for prefix in _URL_PREFIXES:
        if ref.lower().startswith(prefix):
            ref = ref[len(prefix) :]
            break
    parts = ref.split("/")
    if len(parts) < 2:
        raise HubRefError(f"{text!r} is not a hub reference: expected owner/name[:QUANT]")
    owner, name = parts[0], parts[1]
    rest = parts[2:]
    quant = None
    if ":" in name and not rest:
        name, quant = name.split(":", 1)
        if not _TAG_RE.match(quant):
            raise HubRefError(f"{text!r}: {quant!r} is not a quantization tag such as Q6_K")
    if not (_PART_RE.match(owner) and _PART_RE.match(name)) or ".." in (owner, name):
        raise HubRefError(f"{text!r} is not a hub reference: expected owner/name[:QUANT]")
    revision = None
    if len(rest) >= 3 and rest[0] in ("resolve", "blob"):
        revision, rest = rest[1], rest[2:]
    elif len(rest) == 2 and rest[0] == "tree":
        revision, rest = rest[1], []
    filename = "/".join(rest) or None
    if filename is not None:
        try:
            store.safe_relative_path(filename)
        except ValueError as exc:
            raise HubRefError(f"{text!r}: {exc}") from exc
    return HubRef(repo_id=f"{owner}/{name}", quant=quant, filename=filename, revision=revision)
