"""The Hugging Face hub, in one module: parse a reference, list a repo, group its GGUF files into
variants, choose one, read headers by range requests, download, verify.

One module because `inspect`, `fit` and `pull` must agree about a repo: all three list it with
`list_repo` (one request, no retries), group it with `gguf_variants` (one `Variant` type, names
read by `filenames`, the one quantization parser) and pick with `choose` (one policy: a named
file or quant wins, else the largest that fits this machine by the memory plan with serve's
settings, else `DEFAULT_QUANT`). `sources.py` keeps the ByteSource interface and local files;
`HubSource`, the hub's ByteSource, is here, on the hub's session, error sentences and timeout.

Every request goes through `huggingface_hub` (HfApi for the listing, its HEAD metadata call and
its `http_get` streamer for the bytes), so HF_ENDPOINT, HF_TOKEN, proxies and the hub's error
headers behave exactly as in the hub's own tools.

Why not `hf_hub_download`: since huggingface_hub 1.x it downloads into a process-unique temporary
file and deletes it on failure, so an interrupted multi-GB pull starts again from zero. We keep
our own `.incomplete` file beside the final place and hand `http_get` its size as `resume_size`
(a Range request), then hash the finished file against the hub's LFS sha256 before moving it in.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from innkeeper.models import store
from innkeeper.models.filenames import (
    missing_shards,
    normalize_quant,
    quant_label,
    shard_of,
    unsharded,
)
from innkeeper.models.spec import ModelFormatError, ModelSpec

if TYPE_CHECKING:
    from innkeeper.models.hardware import Hardware
    from innkeeper.models.memory import MemoryPlan, MemorySettings

HUB_WEB = "https://huggingface.co"

_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
_PART_RE = re.compile(rf"^{_PART}$")
_TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_URL_PREFIXES = ("https://huggingface.co/", "http://huggingface.co/", "huggingface.co/", "hf.co/")
_URL_PREFIXES += ("https://hf.co/", "hf://")

# Files a transformers-style model needs besides its weights (top level of the repo only).
SUPPORT_FILES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "tokenizer.model",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "chat_template.jinja",
        "chat_template.json",
        "quantize_config.json",
        "quant_config.json",
        "measurement.json",
        "model.safetensors.index.json",
        "pytorch_model.bin.index.json",
    }
)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")

METADATA_TIMEOUT_S = 10.0
"""Seconds a metadata request (listing, header ranges) may wait to connect or for data.

huggingface_hub's client has no timeout at all, so an unroutable hub would hang `inspect` or
`pull` forever. Metadata answers are small; a refused or unresolvable hub fails at once.
"""

JSON_LIMIT_BYTES = 16 * 1024**2
"""The largest config/tokenizer JSON `read_json` fetches (real ones are well under 1 MiB)."""

DEFAULT_QUANT = "Q4_K_M"
"""What the automatic choice takes when nothing fits, or this machine's memory is unknown.

The 4-bit K-quant llama.cpp's docs, Ollama and most GGUF repos treat as the default: the
smallest file most people accept the quality of. A repo without one gets its smallest file.
"""


class HubError(Exception):
    """A hub problem the user can act on; the message says what to do."""


class HubRefError(HubError):
    """Text that is not a hub model reference."""


class HubAccessError(HubError):
    """The hub refused access: a gated or private repo, or a bad token."""


class QuantNotFoundError(HubError):
    """No file in the repo matches the quantization or file name asked for."""


class MissingShardError(HubError):
    """A split model whose repo lacks one or more shards."""


class IntegrityError(HubError):
    """A downloaded file whose sha256 differs from the hub's; it has been deleted."""


class DiskSpaceError(HubError):
    """Not enough free disk space for what the pull must fetch."""


class PullCancelled(HubError):
    """A pull stopped on request; its `.incomplete` file stays, so the next pull resumes it."""

    def __init__(self) -> None:
        super().__init__("pull cancelled: the same pull resumes where this one stopped")


# --- references ---------------------------------------------------------------------------------


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


# --- listing ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RepoFile:
    """One file of a repo (or of a local model folder): its path, size and published hashes."""

    path: str
    size: int
    sha256: str | None = None
    blob_id: str | None = None


@dataclass(frozen=True)
class RepoListing:
    """All files of a repo at one commit."""

    repo_id: str
    revision: str
    files: tuple[RepoFile, ...]
    gated: bool | str = False

    def get(self, path: str) -> RepoFile | None:
        for f in self.files:
            if f.path == path:
                return f
        return None


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
        raise HubAccessError(f"repo {repo_id} not found on {endpoint()}: {hint}") from exc
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
        if _is_transport_error(exc):
            raise HubError(f"network error talking to {endpoint()}: {exc}") from exc
        raise


def list_repo(repo_id: str, revision: str | None = None) -> RepoListing:
    """Every file of a repo with size and LFS sha256, in one `model_info(files_metadata=True)`.

    One request, no retries: `inspect`, `fit` and `pull` all list through here, so an
    unreachable hub fails them at once with the same message (`list_repo_tree` would retry
    for ~24 s first).
    """
    from huggingface_hub import HfApi

    tok = token()
    with hub_errors(repo_id, has_token=tok is not None):
        info = HfApi(endpoint=endpoint(), token=tok).model_info(
            repo_id, revision=revision, files_metadata=True, timeout=METADATA_TIMEOUT_S
        )
    files: list[RepoFile] = []
    for sib in info.siblings or []:
        lfs = sib.lfs
        sha = None
        if lfs is not None:
            sha = lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)
        size = sib.size
        if size is None and lfs is not None:
            size = lfs.get("size") if isinstance(lfs, dict) else getattr(lfs, "size", None)
        files.append(RepoFile(sib.rfilename, int(size or 0), sha, sib.blob_id))
    if not info.sha:
        raise HubError(f"{repo_id}: the hub did not say which commit it listed")
    return RepoListing(repo_id, info.sha, tuple(files), gated=info.gated or False)


# --- reading headers without downloading ---------------------------------------------------------


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
        self.requests = 0
        if self.size < 0:
            self._fetch(0, 1)

    def _fetch(self, offset: int, length: int) -> bytes:
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        tok = token()
        headers = build_hf_headers(token=tok)
        headers["Range"] = f"bytes={offset}-{offset + length - 1}"
        headers["Accept-Encoding"] = "identity"
        self.requests += 1
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

    def close(self) -> None:
        """Nothing to release: the session is huggingface_hub's shared one."""

    def __enter__(self) -> HubSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def source(listing: RepoListing, f: RepoFile) -> HubSource:
    """A file of the listing, read at the listed commit (the size is known: no extra request)."""
    return HubSource(listing.repo_id, f.path, revision=listing.revision, size=f.size)


def read_spec(listing: RepoListing, variant: Variant) -> ModelSpec:
    """The ModelSpec of a GGUF variant from its headers alone (every shard's tensor table)."""
    from innkeeper.models.gguf_meta import merge_split, read_header, spec_from_header

    first = source(listing, variant.files[0])
    spec = spec_from_header(read_header(first), first.name)
    if len(variant.files) > 1:
        spec = merge_split(spec, [read_header(source(listing, f)) for f in variant.files[1:]])
    return spec


def read_json(listing: RepoListing, path: str) -> dict[str, Any]:
    """A small JSON object from the repo (config.json, tokenizer_config.json…)."""
    f = listing.get(path)
    if f is None:
        raise ModelFormatError(f"{listing.repo_id} has no {path}")
    if f.size > JSON_LIMIT_BYTES:
        raise ModelFormatError(f"{listing.repo_id}/{path} is too large to be a config file")
    try:
        data = json.loads(source(listing, f).read(0, f.size) or b"{}")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"{listing.repo_id}/{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ModelFormatError(f"{listing.repo_id}/{path} should be a JSON object")
    return data


# --- variants -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One GGUF quantization of a repo or folder: one file, or every shard of a split file."""

    name: str  # the file name without shard suffix and .gguf: "Model-Q4_K_M"
    quantization: str | None  # what the name says (filenames.quant_label), None if nothing
    files: tuple[RepoFile, ...]
    missing_shards: tuple[int, ...] = ()
    shard_total: int = 1

    @property
    def label(self) -> str:
        """The quantization, else the name: what `repo:QUANT` matches and the store names."""
        return self.quantization or self.name

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def main_file(self) -> str:
        """The file a loader opens: the first shard (it holds the metadata)."""
        return self.files[0].path

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "files": [f.path for f in self.files],
            "size_bytes": self.size,
            "quantization": self.quantization,
        }


def gguf_variants(files: Sequence[RepoFile]) -> list[Variant]:
    """Group GGUF files by quantization, smallest first; shards of one split file stay together.

    Vision projectors (`mmproj`) and importance matrices are not model weights and are left out.
    """
    groups: dict[str, list[RepoFile]] = {}
    for f in files:
        base = f.path.rsplit("/", 1)[-1].lower()
        if not base.endswith(".gguf") or "mmproj" in base or "imatrix" in base:
            continue
        groups.setdefault(unsharded(f.path), []).append(f)
    variants = []
    for stem_path, members in groups.items():
        ordered = tuple(sorted(members, key=lambda f: f.path))
        shards = [s for f in ordered if (s := shard_of(f.path))]
        total = max((of for _, of in shards), default=1)
        have = {part for part, _ in shards}
        missing = tuple(i for i in range(1, total + 1) if i not in have) if total > 1 else ()
        name = stem_path.rsplit("/", 1)[-1][: -len(".gguf")]
        variants.append(Variant(name, quant_label(stem_path), ordered, missing, total))
    variants.sort(key=lambda v: (v.size, v.name))
    return variants


def _check_shards(where: str, variant: Variant) -> None:
    if variant.missing_shards:
        shards = ", ".join(str(i) for i in variant.missing_shards)
        raise MissingShardError(
            f"{where}: {variant.label} is split in {variant.shard_total} files but shard(s)"
            f" {shards} are missing from the repo; pick another quantization"
        )


def _describe(variants: Sequence[Variant]) -> str:
    return ", ".join(f"{v.label} ({format_bytes(v.size)})" for v in variants)


def _match_quant(where: str, quant: str, variants: Sequence[Variant]) -> Variant:
    wanted = normalize_quant(quant)
    exact = [v for v in variants if v.label.upper() == wanted]
    if not exact:
        exact = [v for v in variants if v.label.upper().removeprefix("UD-") == wanted]
    if len(exact) == 1:
        return exact[0]
    if len(exact) > 1:
        names = ", ".join(v.main_file for v in exact)
        raise QuantNotFoundError(
            f"{where}: several files are {quant} ({names}); name one as {where}/FILE"
        )
    raise QuantNotFoundError(f"{where} has no {quant} file; it has: {_describe(variants)}")


# --- the choice ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Machine:
    """What the automatic choice plans for: memory settings on some hardware.

    `ctx_size` None is serve's smallest automatic context (2048, or the trained context if
    smaller): a file fits when `serve`, which lowers the context down to that floor to fit,
    would run it without swapping.
    """

    hardware: Hardware
    settings: MemorySettings
    ctx_size: int | None = None
    gpu_layers: int | None = None

    @classmethod
    def for_serve(cls, hardware: Hardware, ctx_size: int | None = None) -> Machine:
        """`serve`'s defaults (EngineConfig: 4 slots sharing one f16 KV cache, flash attention
        auto…) on `hardware`, mapped by the same function `serve` plans with."""
        from innkeeper.engine.config import EngineConfig
        from innkeeper.models.memory import memory_settings

        return cls(hardware, memory_settings(EngineConfig(model_path=Path())), ctx_size)

    def context(self, spec: ModelSpec | None) -> int:
        from innkeeper.models.memory import default_ctx_candidates

        if self.ctx_size:
            return self.ctx_size
        return default_ctx_candidates(spec.context_length if spec else 0)[-1]

    def plan(self, spec: ModelSpec | None, file_bytes: int) -> MemoryPlan:
        """The plan for a file of this size; `spec` is any quantization of the same model."""
        from innkeeper.models.memory import plan_for_files

        settings = replace(self.settings, ctx_size=self.context(spec))
        return plan_for_files(spec, file_bytes, settings, self.hardware, self.gpu_layers)

    def describe(self, spec: ModelSpec | None) -> str:
        from innkeeper.models.hardware import format_size

        s, hw = self.settings, self.hardware
        where = f"{format_size(hw.ram_available_bytes)} RAM"
        if hw.gpus:
            where += f" + {format_size(sum(g.free_bytes for g in hw.gpus))} VRAM"
        text = (
            f"memory plan at context {self.context(spec)}, {s.parallel} slot(s),"
            f" KV {s.cache_type_k}/{s.type_v}, on {where}"
        )
        return text if spec is not None else text + ", model shape estimated from its size"


def detected_machine() -> Machine | None:
    """`serve`'s defaults on this machine; None when its memory cannot be read (unknown)."""
    from innkeeper.models.hardware import detect_hardware

    try:
        hw = detect_hardware()
    except Exception:  # psutil's errors differ by platform; unknown memory is not a failure
        return None
    return Machine.for_serve(hw)


@dataclass(frozen=True)
class Choice:
    """The variant picked, why (one line for the user), and its header if the choice read it."""

    variant: Variant
    reason: str
    spec: ModelSpec | None = field(default=None, compare=False)


def _fallback(pool: Sequence[Variant]) -> tuple[Variant, str]:
    for v in pool:
        if v.label.upper() == DEFAULT_QUANT:
            return v, f"the default {DEFAULT_QUANT}"
    for v in pool:
        if v.label.upper().removeprefix("UD-") == DEFAULT_QUANT:
            return v, f"the default {DEFAULT_QUANT}"
    return pool[0], f"the smallest file (there is no {DEFAULT_QUANT})"


def choose(
    variants: Sequence[Variant],
    *,
    where: str,
    quant: str | None = None,
    filename: str | None = None,
    machine: Machine | None = None,
    read_spec: Callable[[Variant], ModelSpec] | None = None,
) -> Choice:
    """Which GGUF variant `inspect`, `fit` and `pull` mean: the one policy for all three.

    A named file (`repo/file.gguf`) or quant (`repo:QUANT`) always wins. Otherwise the complete
    variants are planned from the largest (least quantized) down and the first that fits
    `machine` wins; none fitting, or no machine (memory unknown), gives `DEFAULT_QUANT`. The
    model's shape comes from the largest variant's header (`read_spec`); an unreadable one
    leaves the plan to estimate it from the file sizes. Incomplete variants are chosen only
    when there is nothing else (`inspect` then says what is missing; `pull` refuses them).
    """
    if not variants:
        raise QuantNotFoundError(f"{where} has no GGUF files")
    if filename is not None:
        for v in variants:
            if any(f.path == filename for f in v.files):
                return Choice(v, f"{filename} named")
        raise QuantNotFoundError(f"{where} has no GGUF file {filename!r}")
    if quant is not None:
        return Choice(_match_quant(where, quant, variants), f"{normalize_quant(quant)} asked for")
    pool = [v for v in variants if not v.missing_shards] or list(variants)
    fallback, fallback_why = _fallback(pool)
    if machine is None:
        return Choice(fallback, f"{fallback_why}: this machine's memory is unknown")
    probe = pool[-1]
    spec = None
    if read_spec is not None:
        with contextlib.suppress(ModelFormatError, HubError, OSError):
            spec = read_spec(probe)
    if spec is not None and not (spec.n_layer and spec.n_vocab):
        spec = None  # nothing to plan with: estimate from the sizes
    for v in reversed(pool):
        if machine.plan(spec, v.size).fits:
            reason = f"the largest that fits ({machine.describe(spec)})"
            return Choice(v, reason, spec if v is probe else None)
    reason = f"{fallback_why}: none fits ({machine.describe(spec)})"
    return Choice(fallback, reason, spec if fallback is probe else None)


@dataclass(frozen=True)
class Selection:
    """What a pull will fetch: the files, which one a loader opens, and why."""

    repo_id: str
    revision: str
    variant: str
    format: str
    files: tuple[RepoFile, ...]
    main_file: str
    reason: str = ""
    variants: tuple[Variant, ...] = field(default=(), compare=False)
    spec: ModelSpec | None = field(default=None, compare=False)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


def select(
    listing: RepoListing,
    *,
    quant: str | None = None,
    filename: str | None = None,
    machine: Machine | None = None,
) -> Selection:
    """What `pull` downloads: `choose`'s variant (whole, every shard), a single named file, or
    a transformers model's weights with its config and tokenizer."""
    variants = gguf_variants(listing.files)
    if filename is not None:
        named = _named_file(listing, filename)
        filename = named.path
        if not any(f.path == filename for v in variants for f in v.files):
            return _select_file(listing, named)
    if variants:
        choice = choose(
            variants,
            where=listing.repo_id,
            quant=quant,
            filename=filename,
            machine=machine,
            read_spec=lambda v: read_spec(listing, v),
        )
        chosen = choice.variant
        _check_shards(listing.repo_id, chosen)
        return Selection(
            repo_id=listing.repo_id,
            revision=listing.revision,
            variant=chosen.label,
            format="gguf",
            files=chosen.files,
            main_file=chosen.main_file,
            reason=choice.reason,
            variants=tuple(variants),
            spec=choice.spec,
        )
    if quant is not None:
        raise QuantNotFoundError(
            f"{listing.repo_id} has no GGUF files, so there is no {quant} to pick:"
            " pull it without a quantization tag"
        )
    return _select_transformers(listing)


def _named_file(listing: RepoListing, filename: str) -> RepoFile:
    """The listed file for a name, matched exactly, else case-insensitively if unique."""
    found = listing.get(filename)
    if found is not None:
        return found
    lowered = [f for f in listing.files if f.path.lower() == filename.lower()]
    if len(lowered) == 1:
        return lowered[0]
    raise QuantNotFoundError(f"{listing.repo_id} has no file {filename!r}")


def _select_file(listing: RepoListing, found: RepoFile) -> Selection:
    """One named file that is not part of a GGUF variant."""
    name = found.path.rsplit("/", 1)[-1]
    fmt = "gguf" if name.lower().endswith(".gguf") else name.rsplit(".", 1)[-1].lower()
    return Selection(
        repo_id=listing.repo_id,
        revision=listing.revision,
        variant=quant_label(found.path) or name,
        format=fmt,
        files=(found,),
        main_file=found.path,
        reason=f"{found.path} named",
    )


def _select_transformers(listing: RepoListing) -> Selection:
    """Safetensors (or, failing that, pickle) weights at the top level plus config and tokenizer."""
    top = [f for f in listing.files if "/" not in f.path]
    weights = [f for f in top if f.path.endswith(".safetensors")]
    fmt = "safetensors"
    if not weights:
        weights = [f for f in top if f.path.lower().endswith(_PICKLE_SUFFIXES)]
        weights = [f for f in weights if "training_args" not in f.path]
        fmt = "pytorch"
    if not weights:
        names = ", ".join(f.path for f in listing.files[:12]) or "none"
        raise HubError(f"{listing.repo_id} has no model weights to pull (files: {names})")
    absent = missing_shards([f.path for f in weights])
    if absent:
        raise MissingShardError(
            f"{listing.repo_id}: the weights are split and {', '.join(absent)} are missing from"
            " the repo"
        )
    support = [f for f in top if f.path in SUPPORT_FILES]
    files = tuple(sorted(weights, key=lambda f: f.path)) + tuple(support)
    return Selection(
        repo_id=listing.repo_id,
        revision=listing.revision,
        variant=fmt,
        format=fmt,
        files=files,
        main_file=files[0].path,
        reason=f"{fmt} weights",
    )


# --- downloading --------------------------------------------------------------------------------


@dataclass
class PullResult:
    """What a pull did: the store entry, and how many bytes came over the wire this time."""

    entry: store.StoreEntry
    downloaded_bytes: int
    resumed_from_bytes: int
    reused_files: int


ProgressHook = Callable[[int, int, RepoFile], None]
"""Called before each file: (index from 1, count, file)."""

BytesHook = Callable[[int, int], None]
"""Called as bytes land: (bytes of the selection on disk now, bytes of the whole selection)."""


class _WatchedFile:
    """The `.incomplete` file as `http_get` sees it: each written chunk reports the bytes now on
    disk and checks the cancel flag, so a pull can show progress and stop between chunks
    without owning the download loop. Everything else goes to the real file."""

    def __init__(
        self, fh: Any, on_size: Callable[[int], None] | None, cancel: threading.Event | None
    ) -> None:
        self._fh = fh
        self._on_size = on_size
        self._cancel = cancel

    def write(self, data: bytes) -> int:
        n = self._fh.write(data)
        if self._on_size is not None:
            self._on_size(self._fh.tell())
        if self._cancel is not None and self._cancel.is_set():
            raise PullCancelled()
        return n

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def free_disk_bytes(path: Path) -> int:
    """Free bytes on the disk that holds path (or its nearest existing parent)."""
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def _digest(path: Path, sha256: bool) -> str:
    """sha256 of a file, or for non-LFS files the git blob id (sha1 of `blob <size>\\0<data>`)."""
    h = hashlib.sha256() if sha256 else hashlib.sha1()
    if not sha256:
        h.update(f"blob {path.stat().st_size}\0".encode())
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _verify(path: Path, f: RepoFile) -> bool:
    if f.sha256:
        return _digest(path, True) == f.sha256.lower()
    if f.blob_id:
        return _digest(path, False) == f.blob_id.lower()
    return path.stat().st_size == f.size


def _origin(url: str) -> tuple[str, str, int | None]:
    p = urlparse(url)
    return p.scheme, (p.hostname or "").lower(), p.port


def _is_transport_error(exc: BaseException) -> bool:
    """httpx/requests connection errors: their classes differ between huggingface_hub versions."""
    name = type(exc).__name__
    words = ("Connect", "Timeout", "Protocol", "Network", "Transport", "Read")
    return any(k in name for k in words)


def _fetch(
    sel: Selection,
    f: RepoFile,
    final: Path,
    tok: str | None,
    on_size: Callable[[int], None] | None = None,
    cancel: threading.Event | None = None,
) -> int:
    """Download one file into its `.incomplete` file (resuming it) and verify it; return bytes got.

    The HEAD call and the streaming GET are huggingface_hub's own; we only own the file handle,
    so the bytes already on disk survive a crash and become the Range start of the next try.
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    part = store.partial_path(final, f.sha256 or f.blob_id or "x")
    url = hf_hub_url(sel.repo_id, f.path, revision=sel.revision, endpoint=endpoint())
    with hub_errors(sel.repo_id, has_token=tok is not None):
        meta = get_hf_file_metadata(url, token=tok)
    if meta.size is not None and meta.size != f.size:
        raise HubError(f"{f.path}: the hub lists {f.size} bytes but serves {meta.size}")
    location = meta.location or url
    headers = build_hf_headers(token=tok)
    if _origin(location) != _origin(url):
        headers.pop("authorization", None)  # signed CDN URL: credentials stay on the hub
    final.parent.mkdir(parents=True, exist_ok=True)
    resume = part.stat().st_size if part.exists() else 0
    if resume > f.size:
        part.unlink()
        resume = 0
    if on_size is not None:
        on_size(resume)
    for attempt in (1, 2):
        try:
            with part.open("ab", buffering=0) as fh:
                http_get(
                    location,
                    _WatchedFile(fh, on_size, cancel),  # type: ignore[arg-type]
                    resume_size=resume,
                    headers=headers,
                    expected_size=f.size,
                    displayed_filename=f.path.rsplit("/", 1)[-1],
                )
        except Exception as exc:
            status = getattr(getattr(exc, "response", None), "status_code", None)
            if isinstance(exc, HfHubHTTPError) and status is not None and status < 500:
                with hub_errors(sel.repo_id, has_token=tok is not None):
                    raise
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
                raise DiskSpaceError(f"the disk filled up while downloading {f.path}") from exc
            if isinstance(exc, (OSError, HfHubHTTPError)) or _is_transport_error(exc):
                kept = part.stat().st_size if part.exists() else 0
                raise HubError(
                    f"download of {f.path} interrupted ({format_bytes(kept)} of"
                    f" {format_bytes(f.size)} kept): run the same pull again to resume"
                ) from exc
            raise
        if _verify(part, f):
            break
        part.unlink(missing_ok=True)
        if attempt == 1 and resume > 0:
            resume = 0  # a resumed file may have kept a bad prefix: one fresh try
            continue
        raise IntegrityError(
            f"{f.path}: sha256 does not match the hub's ({f.sha256 or f.blob_id});"
            " the download was deleted and nothing was added to the store. Run the pull again."
        )
    got = f.size - resume
    os.replace(part, final)
    return got


def pull(
    sel: Selection,
    root: Path | None = None,
    *,
    progress: bool = True,
    on_file: ProgressHook | None = None,
    free_bytes: Callable[[Path], int] = free_disk_bytes,
    on_bytes: BytesHook | None = None,
    cancel: threading.Event | None = None,
) -> PullResult:
    """Download a selection into the store, resuming, verifying and moving each file in.

    The manifest is written as incomplete before the first byte, updated as each verified file
    lands and marked complete last; every write is atomic, so the store never shows a half-pulled
    model as whole. A failed pull that leaves nothing to resume leaves nothing behind.
    `on_bytes` reports progress as chunks land; setting `cancel` stops the pull at the next
    chunk with `PullCancelled`, keeping what came as a resumable `.incomplete` file.
    """
    from huggingface_hub.utils import WeakFileLock

    root = root if root is not None else store.models_dir()
    entry = store.entry_dir(root, sel.repo_id, sel.variant)
    for f in sel.files:
        store.safe_relative_path(f.path)
    locks = root / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    lock = locks / f"{entry.parent.name}__{entry.name}.lock"
    with WeakFileLock(lock):
        existed = entry.exists()
        entry.mkdir(parents=True, exist_ok=True)
        try:
            return _pull_locked(sel, root, entry, progress, on_file, free_bytes, on_bytes, cancel)
        except BaseException:
            _cleanup_failed(entry, remove_dir=not existed)
            raise


def _pull_locked(
    sel: Selection,
    root: Path,
    entry: Path,
    progress: bool,
    on_file: ProgressHook | None,
    free_bytes: Callable[[Path], int],
    on_bytes: BytesHook | None = None,
    cancel: threading.Event | None = None,
) -> PullResult:
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    tok = token()
    old = store.read_manifest(entry)
    verified = {
        m.path: m for m in (old.files if old and old.revision == sel.revision else []) if m.verified
    }
    manifest = store.Manifest(
        repo=sel.repo_id,
        revision=sel.revision,
        variant=sel.variant,
        format=sel.format,
        main_file=sel.main_file,
        files=[store.ManifestFile(f.path, f.size, f.sha256, f.blob_id) for f in sel.files],
        endpoint=endpoint(),
    )
    todo: list[tuple[int, RepoFile, Path]] = []
    reused = resumed = need = 0
    for i, (f, m) in enumerate(zip(sel.files, manifest.files, strict=True)):
        final = entry / f.path
        known = verified.get(f.path)
        same = known is not None and (known.sha256, known.blob_id) == (f.sha256, f.blob_id)
        if final.is_file() and final.stat().st_size == f.size and (same or _verify(final, f)):
            m.verified = True
            reused += 1
            continue
        todo.append((i, f, final))
        part = store.partial_path(final, f.sha256 or f.blob_id or "x")
        have = part.stat().st_size if part.exists() else 0
        have = have if have <= f.size else 0
        resumed += have
        need += f.size - have
    free = free_bytes(entry)
    if need > free:
        raise DiskSpaceError(
            f"not enough disk space in {root}: the pull needs {format_bytes(need)},"
            f" {format_bytes(free)} free"
        )
    store.write_manifest(entry, manifest)

    was_disabled = are_progress_bars_disabled()
    if not progress:
        disable_progress_bars()
    got = 0
    landed = sum(f.size for f, m in zip(sel.files, manifest.files, strict=True) if m.verified)
    try:
        for n, (i, f, final) in enumerate(todo, 1):
            if cancel is not None and cancel.is_set():
                raise PullCancelled()
            if on_file is not None:
                on_file(n, len(todo), f)
            final.unlink(missing_ok=True)
            on_size = None
            if on_bytes is not None:
                on_size = functools.partial(_report, on_bytes, landed, sel.size)
            got += _fetch(sel, f, final, tok, on_size, cancel)
            landed += f.size
            manifest.files[i].verified = True
            store.write_manifest(entry, manifest)
    finally:
        if not progress and not was_disabled:
            enable_progress_bars()
    manifest.complete = True
    manifest.downloaded_at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    store.write_manifest(entry, manifest)
    return PullResult(store.entry_from_manifest(entry, manifest), got, resumed, reused)


def _report(on_bytes: BytesHook, landed: int, total: int, present: int) -> None:
    """One file's bytes on disk, as the selection's: the files already landed plus this one."""
    on_bytes(landed + present, total)


def _cleanup_failed(entry: Path, *, remove_dir: bool) -> None:
    """After a failed pull: if no verified file and no partial download remain, remove the trace."""
    manifest = store.read_manifest(entry)
    has_files = manifest is not None and any(m.verified for m in manifest.files)
    has_partial = any(p.name.endswith(store.PARTIAL_SUFFIX) for p in entry.rglob("*"))
    if has_files or has_partial:
        return
    (entry / store.MANIFEST_NAME).unlink(missing_ok=True)
    if remove_dir:
        for d in sorted((p for p in entry.rglob("*") if p.is_dir()), reverse=True):
            with contextlib.suppress(OSError):
                d.rmdir()
        with contextlib.suppress(OSError):
            entry.rmdir()
        with contextlib.suppress(OSError):
            entry.parent.rmdir()
