"""The Hugging Face hub: parse a reference, list a repo, group its GGUF files into variants,
choose one, read headers by range requests, download, verify.

`inspect`, `fit` and `pull` must agree about a repo: all three list it with `list_repo` (one
request, no retries), group it with `gguf_variants` (one `Variant` type, names read by
`filenames`, the one quantization parser) and pick with `choose` (one policy: a named file or
quant wins, else the largest that fits this machine by the memory plan with serve's settings,
else `DEFAULT_QUANT`). One module per job:

    refs       what the user types: owner/name[:QUANT], owner/name/file.gguf, hub URLs
    client     huggingface_hub access: endpoint, token, error sentences, range reads
    listing    a repo at one commit, and reading a listed file
    variants   GGUF files grouped into quantizations, split files kept whole
    choice     the one rule for which variant fits this machine
    selection  what a pull fetches (a variant, a named file, or transformers weights)
    download   resume, verify, move into the store
    fetch      a ref to a store entry, pulling if needed: `pull`, `serve` and pull jobs

Callers use `from innkeeper.models import hub` and `hub.NAME`: the names they use are here.
"""

from innkeeper.models.hub.choice import DEFAULT_QUANT, Machine, choose, detected_machine
from innkeeper.models.hub.download import PullResult, pull
from innkeeper.models.hub.errors import (
    DiskSpaceError,
    HubAccessError,
    HubError,
    HubRefError,
    IntegrityError,
    MissingShardError,
    NotPulledError,
    PullCancelled,
    QuantNotFoundError,
    RepoNotFoundError,
)
from innkeeper.models.hub.fetch import Resolved, describe, pulled_entry, resolve
from innkeeper.models.hub.listing import RepoFile, format_bytes, list_repo, read_json, source
from innkeeper.models.hub.refs import HubRef, parse_ref
from innkeeper.models.hub.selection import Selection, select
from innkeeper.models.hub.variants import Variant, gguf_variants, read_spec

__all__ = [
    "DEFAULT_QUANT",
    "DiskSpaceError",
    "HubAccessError",
    "HubError",
    "HubRef",
    "HubRefError",
    "IntegrityError",
    "Machine",
    "MissingShardError",
    "NotPulledError",
    "PullCancelled",
    "PullResult",
    "QuantNotFoundError",
    "RepoFile",
    "RepoNotFoundError",
    "Resolved",
    "Selection",
    "Variant",
    "choose",
    "describe",
    "detected_machine",
    "format_bytes",
    "gguf_variants",
    "list_repo",
    "parse_ref",
    "pull",
    "pulled_entry",
    "read_json",
    "read_spec",
    "resolve",
    "select",
    "source",
]
