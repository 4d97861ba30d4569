"""The runs a model has in flight, and what KoboldCpp's genkey routes ask about them.

KoboldCpp clients poll /api/extra/generate/check for the text so far and stop a run with
/api/extra/abort, naming their run by a `genkey` (multi-user mode) or not at all. Answering
them needs the live runs by genkey and the text of the last finished ones; that bookkeeping
lives here, apart from starting runs (service.py).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

from innkeeper.serving.generation import RunningGeneration

FINISHED_GENKEYS = 64  # finished genkey runs whose text /api/extra/generate/check still knows


class RunBook:
    """Runs started and not yet answered, plus the text of recently finished ones."""

    def __init__(self) -> None:
        self.live: dict[str, RunningGeneration] = {}
        # text of recently finished runs started with a genkey, for KoboldCpp's final poll
        self.finished: OrderedDict[str, str] = OrderedDict()
        self.last_text = ""  # the last finished run started without a genkey

    def __len__(self) -> int:
        return len(self.live)

    def add(self, running: RunningGeneration) -> None:
        self.live[running.id] = running

    def end(self, running: RunningGeneration) -> bool:
        """Forget a run whose response is over, keeping its text for a last poll; False if
        it was already forgotten."""
        if self.live.pop(running.id, None) is None:
            return False
        if not running.genkey:
            self.last_text = running.text
            return True
        self.finished[running.genkey] = running.text
        self.finished.move_to_end(running.genkey)
        while len(self.finished) > FINISHED_GENKEYS:
            self.finished.popitem(last=False)
        return True

    def release(self, runs: Iterable[RunningGeneration]) -> None:
        """Undo started runs whose request failed as a whole: cancel and forget each one."""
        for running in runs:
            running.cancel()
            self.live.pop(running.id, None)

    def abort(self, genkey: str | None = None) -> int:
        """Stop running generations (all, or those started with `genkey`)."""
        n = 0
        for running in list(self.live.values()):
            if genkey and running.genkey != genkey:
                continue  # a keyed abort (KoboldCpp's multi-user rule) stops only its own run
            running.cancel()
            n += 1
        return n

    def latest(self, genkey: str | None = None) -> RunningGeneration | None:
        candidates = [r for r in self.live.values() if not genkey or r.genkey == genkey]
        return max(candidates, key=lambda r: r.created, default=None)

    def progress(self, genkey: str | None = None) -> str:
        """KoboldCpp's /api/extra/generate/check: the text generated so far.

        With a genkey, only that client's own run (running, or among the last finished);
        an unknown genkey gets "". Without one, as KoboldCpp does for single-user clients:
        the run in flight while it is the only one, or the last finished one when idle,
        never a run started with a genkey, and nothing while several users generate.
        """
        if genkey:
            running = self.latest(genkey)
            return running.text if running is not None else self.finished.get(genkey, "")
        if not self.live:
            return self.last_text
        only = next(iter(self.live.values()))
        return only.text if len(self.live) == 1 and not only.genkey else ""
