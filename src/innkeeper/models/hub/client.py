"""Talking to the hub: which endpoint and token, huggingface_hub's errors as ours, and `HubSource`,
a hub file read by range requests (so `inspect` and `fit` read headers without downloading).

Every request goes through `huggingface_hub` (HfApi for the listing, its HEAD metadata call and
its `http_get` streamer for the bytes, its session for ranges), so HF_ENDPOINT, HF_TOKEN, proxies
and the hub's error headers behave exactly as in the hub's own tools. `sources.py` keeps the
ByteSource interface and local files; the hub's ByteSource is here, on the hub's session, error
sentences and timeout.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from innkeeper.models.hub.errors import (
    HubAccessError,
    HubError,
    MissingShardError,
    RepoNotFoundError,
)
from innkeeper.models.spec import ModelFormatError

HUB_WEB = "https://huggingface.co"

METADATA_TIMEOUT_S = 10.0
"""Seconds a metadata request (listing, header ranges) may wait to connect or for data.

huggingface_hub's client has no timeout at all, so an unroutable hub would hang `inspect` or
`pull` forever. Metadata answers are small; a refused or unresolvable hub fails at once.
"""


def endpoint() -> str:
    """The hub to talk to, read at call time so tests (and users) can point HF_ENDPOINT anywhere."""
    return (os.environ.get("HF_ENDPOINT") or HUB_WEB).rstrip("/")


def token() -> str | None:
    """HF_TOKEN, else the token `hf auth login` saved; None sends no credentials."""
    from huggingface_hub import get_token

    return os.environ.get("HF_TOKEN") or get_token() or None


@contextlib.contextmanager
def hub_errors(repo_id: str, *, has_token: bool) -> Iterator[None]:
    """Turn huggingface_hub's exceptions into one clear sentence the user can act on."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    page = f"{HUB_WEB}/{repo_id}"
    try:
        yield
    except GatedRepoError as exc:
        how = (
            "the token in HF_TOKEN has no access: accept the conditions on the repo's page with"
            " that account"
            if has_token
            else "set HF_TOKEN to a token of an account that accepted its conditions"
        )
        raise HubAccessError(f"{repo_id} is a gated repo ({page}): {how}") from exc
    except RepositoryNotFoundError as exc:
        hint = "check the name" + ("" if has_token else ", or set HF_TOKEN if it is private")
        raise RepoNotFoundError(f"repo {repo_id} not found on {endpoint()}: {hint}") from exc
    except RevisionNotFoundError as exc:
        raise HubError(f"{repo_id}: revision not found") from exc
    except LocalEntryNotFoundError as exc:
        raise HubError(f"cannot reach the hub at {endpoint()}: check the connection") from exc
    except EntryNotFoundError as exc:
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise MissingShardError(
            f"{repo_id}: a file the repo lists is missing on the hub ({first})"
        ) from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            raise HubAccessError(
                f"the hub refused access to {repo_id} (HTTP {status}):"
                + (" check HF_TOKEN" if has_token else " set HF_TOKEN")
            ) from exc
        raise HubError(f"hub error for {repo_id}: {str(exc).splitlines()[0]}") from exc
    except OSError as exc:
        raise HubError(f"network error talking to {endpoint()}: {exc}") from exc
    except Exception as exc:
        if is_transport_error(exc):
            raise HubError(f"network error talking to {endpoint()}: {exc}") from exc
        raise


def is_transport_error(exc: BaseException) -> bool:
    """httpx/requests connection errors: their classes differ between huggingface_hub versions."""
    name = type(exc).__name__
    words = ("Connect", "Timeout", "Protocol", "Network", "Transport", "Read")
    return any(k in name for k in words)


class HubSource:
    """A file in a hub repo as a ByteSource, read in ranges with huggingface_hub's HTTP session.

    `size` comes from the listing when the caller has it; otherwise the first range response's
    `Content-Range` header tells it.
    """

    def __init__(
        self, repo_id: str, filename: str, *, revision: str | None = None, size: int | None = None
    ) -> None:
        from huggingface_hub import hf_hub_url

        self.name = f"{repo_id}/{filename}"
        self.repo_id = repo_id
        self.url = hf_hub_url(repo_id, filename, revision=revision, endpoint=endpoint())
        self.size = size if size is not None else -1
        if self.size < 0:
            self._fetch(0, 1)

    def _fetch(self, offset: int, length: int) -> bytes:
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        tok = token()
        headers = build_hf_headers(token=tok)
        headers["Range"] = f"bytes={offset}-{offset + length - 1}"
        headers["Accept-Encoding"] = "identity"
        try:
            # The same error sentences and the same timeout as the listing (and `pull`).
            with (
                hub_errors(self.repo_id, has_token=tok is not None),
                get_session().stream(
                    "GET", self.url, headers=headers, timeout=METADATA_TIMEOUT_S
                ) as response,
            ):
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
        except HubError as exc:
            raise ModelFormatError(f"could not read {self.name} from the hub: {exc}") from exc
        except Exception as exc:  # anything else the HTTP stack raises: still one clear line
            reason = str(exc).strip().splitlines()
            text = reason[0] if reason else type(exc).__name__
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
