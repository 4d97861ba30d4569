"""Random-access byte sources: a local file, or a file on the hub read by HTTP range requests.

Headers (GGUF metadata, safetensors JSON) sit at the start of multi-gigabyte files; reading them
through one small interface lets the same parser inspect a local file or a hub repo without
downloading the weights. Hub requests go through huggingface_hub's own session, URL builder,
auth headers and error mapping, so `HF_ENDPOINT` and `HF_TOKEN` work as they do for `pull`.
"""

from __future__ import annotations

import os
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


class FileSource:
    """A local file, read with seek + read: nothing is mapped or loaded beyond what is asked."""

    def __init__(self, path: Path) -> None:
        self.name = str(path)
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


def hub_endpoint() -> str | None:
    """The hub URL from `HF_ENDPOINT` at call time (huggingface_hub reads it once at import)."""
    return os.environ.get("HF_ENDPOINT") or None


class HubSource:
    """A file in a hub repo, read in ranges with huggingface_hub's HTTP session.

    `size` comes from the hub's file listing when the caller has it; otherwise the first range
    response's `Content-Range` header tells it.
    """

    def __init__(
        self,
        repo_id: str,
        filename: str,
        *,
        revision: str | None = None,
        size: int | None = None,
        token: str | bool | None = None,
    ) -> None:
        from huggingface_hub import hf_hub_url

        self.name = f"{repo_id}/{filename}"
        self.url = hf_hub_url(repo_id, filename, revision=revision, endpoint=hub_endpoint())
        self._token = token
        self.size = size if size is not None else -1
        self.requests = 0
        if self.size < 0:
            self._fetch(0, 1)

    def _fetch(self, offset: int, length: int) -> bytes:
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        headers = build_hf_headers(token=self._token)
        headers["Range"] = f"bytes={offset}-{offset + length - 1}"
        headers["Accept-Encoding"] = "identity"
        self.requests += 1
        try:
            with get_session().stream("GET", self.url, headers=headers) as response:
                hf_raise_for_status(response)
                status = response.status_code
                content_range = response.headers.get("Content-Range", "")
                content_length = response.headers.get("Content-Length", "")
                body = bytearray()
                # A server that ignores Range sends the whole file: stop reading once the asked
                # bytes are in, so a weights file is never downloaded by accident.
                wanted = length if status == 206 else offset + length
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) >= wanted:
                        break
        except Exception as exc:  # network errors, 401/403/404 from the hub
            reason = str(exc).strip().splitlines()
            name = type(exc).__name__
            if "GatedRepo" in name:
                text = "access is gated: accept the license on the hub and set HF_TOKEN"
            elif "RepositoryNotFound" in name or "EntryNotFound" in name:
                text = "not found (or private: set HF_TOKEN)"
            else:
                text = reason[0] if reason else name
            raise ModelFormatError(f"could not read {self.name} from the hub: {text}") from exc
        if status == 206 and "/" in content_range:
            total = content_range.rsplit("/", 1)[1].strip()
            if total.isdigit():
                self.size = int(total)
        elif status == 200:
            if content_length.isdigit():
                self.size = int(content_length)
            body = body[offset:]
        return bytes(body[:length])

    def read(self, offset: int, length: int) -> bytes:
        if length <= 0 or (self.size >= 0 and offset >= self.size):
            return b""
        if self.size >= 0:
            length = min(length, self.size - offset)
        return self._fetch(offset, length)

    def close(self) -> None:
        """Nothing to release: the session is huggingface_hub's shared one."""

    def __enter__(self) -> HubSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
