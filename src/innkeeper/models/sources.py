"""Random-access byte sources: the interface the header parsers read, and local files.

Headers (GGUF metadata, safetensors JSON) sit at the start of multi-gigabyte files; reading them
through one small interface lets the same parser inspect a local file or a hub repo without
downloading the weights. This module holds the interface and the local side only; the hub's
source (`hub.client.HubSource`, HTTP range requests) lives with the rest of the hub code, on the hub's
session, error messages and timeout.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Protocol

from innkeeper.models.spec import ModelFormatError


class ByteSource(Protocol):
    """Something with a known size that can hand out byte ranges."""

    name: str
    size: int

    def read(self, offset: int, length: int) -> bytes:
        """Up to `length` bytes at `offset` (fewer only at end of data)."""
        ...


def require_regular_file(path: Path | str) -> None:
    """Refuse a FIFO, device or socket before opening it: `open()` on a FIFO blocks forever.

    `stat` never blocks, so this is safe on anything that exists; a missing path is left for
    the caller's own "does not exist" message (FileNotFoundError from open).
    """
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return
    kind = (
        "a FIFO (named pipe)"
        if stat.S_ISFIFO(mode)
        else "a socket"
        if stat.S_ISSOCK(mode)
        else "a device"
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
        else "not a regular file"
    )
    raise ModelFormatError(f"{path} is {kind}: a model must be a regular file or a folder")


class FileSource:
    """A local file, read with seek + read: nothing is mapped or loaded beyond what is asked."""

    def __init__(self, path: Path) -> None:
        self.name = str(path)
        require_regular_file(path)
        self._fh = Path(path).open("rb")  # noqa: SIM115 (closed by close()/__exit__)
        self.size = os.fstat(self._fh.fileno()).st_size

    def read(self, offset: int, length: int) -> bytes:
        self._fh.seek(offset)
        return self._fh.read(max(length, 0))

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> FileSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
