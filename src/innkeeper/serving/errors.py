"""What the serving runtime refuses, as types: the api layer maps each to its HTTP shape.

Nothing here knows a status code or a route family: `api/errors.py` holds the one table from
these types to statuses, and each family formats the message its own way. Code that must tell
two failures apart checks their types, never their text.
"""

from __future__ import annotations


class ServingError(Exception):
    """A request the runtime cannot serve; `message` is written for the client."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after  # seconds a client should wait before trying again


class ParamError(ServingError, ValueError):
    """A request value that is well-typed but makes no sense (too long a prompt, a bad id)."""


class ClientGone(ServingError):
    """The client hung up while its request was still being prepared."""


class WorkerLost(ServingError):
    """The model was wrecked by a lost RPC worker while this request used it (ErrorKind
    WORKER_LOST, as a generation it ended gets)."""


class ModelNotFound(ServingError):
    """The name matches no model this server offers."""


class ModelNotLoaded(ServingError):
    """The model is not loaded and this request may not load it."""


class AdminRequired(ServingError):
    """The request would load, unload or evict a model, and it does not carry the admin key."""


class ModelBusy(ServingError):
    """Try again shortly: the model is loading, was just unloaded, or its queue is full."""


class BadLoadRequest(ServingError):
    """A load that can never work as asked: a file that is no model, settings out of range."""


class WorkerNotAllowed(BadLoadRequest):
    """A load names an RPC worker the server may not connect to on a client's word: neither
    on loopback (where SSH tunnels land) nor among the server's own --rpc workers."""


class InsufficientMemory(ServingError):
    """Loading the model would not fit this machine beside the models that must stay."""


class LoadFailed(ServingError):
    """llama.cpp refused a file that looked loadable (the server's side of the failure)."""


class NotFound(ServingError):
    """Something other than a model (a pull job, a store entry) does not exist."""


class Conflict(ServingError):
    """The request clashes with the server's state (delete the model it started with...)."""


class TooManyJobs(ServingError):
    """More background jobs (pulls) are running than the server allows at once."""


class StoreFailed(ServingError):
    """The model store could not be changed (a disk error)."""
