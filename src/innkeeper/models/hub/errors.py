"""The hub's errors: each is a sentence the user can act on, typed so callers never match text."""

from __future__ import annotations


class HubError(Exception):
    """A hub problem the user can act on; the message says what to do."""


class HubRefError(HubError):
    """Text that is not a hub model reference."""


class HubAccessError(HubError):
    """The hub refused access: a gated or private repo, or a bad token."""


class RepoNotFoundError(HubAccessError):
    """No such repo on the hub (or a private one the token cannot see)."""


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


class NotPulledError(HubError):
    """The model is not in the store and downloading was refused (`serve --no-pull`)."""
