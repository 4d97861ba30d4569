"""CPU accounting: the load gate before each scenario and who used the cores during it.

On a 2-core machine shared with other jobs, one foreign process taking a core halves a
llama.cpp step (its threads wait at barriers). So before each scenario we wait for the
machine to be idle, and during it we split the CPU time into server / load generator / steal
/ foreign, so a contaminated measurement is visible in the JSON instead of silently averaged.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

import psutil


def _busy_and_steal() -> tuple[float, float, float]:
    """(busy seconds, steal seconds, wall clock) summed over all CPUs since boot."""
    t = psutil.cpu_times()
    idle = t.idle + getattr(t, "iowait", 0.0)
    steal = getattr(t, "steal", 0.0)
    total = sum(t)
    # guest time is already counted in user on Linux; do not count it twice
    total -= getattr(t, "guest", 0.0) + getattr(t, "guest_nice", 0.0)
    return total - idle - steal, steal, time.monotonic()


def _proc_cpu(pid: int, children: bool) -> float:
    """CPU seconds of a process, and if asked of its children: the live ones and those that
    ended and were reaped (a llama-server router starts and ends one child per model load, so
    live children alone would lose an unloaded model's time). 0 when the process is gone."""
    try:
        proc = psutil.Process(pid)
        procs = [proc, *(proc.children(recursive=True) if children else [])]
    except psutil.Error:
        return 0.0
    total = 0.0
    for p in procs:
        try:
            ct = p.cpu_times()
            total += ct.user + ct.system
            if children:
                total += ct.children_user + ct.children_system
        except psutil.Error:
            continue
    return total


@dataclass
class CpuUse:
    """Cores used on average over one measured span, by whom."""

    wall_s: float
    server: float
    loadgen: float
    steal: float
    foreign: float  # everything else: other engineers' jobs, idle servers waking up


class CpuMeter:
    """Start before a scenario, `stop()` after: the cores each party used meanwhile."""

    def __init__(self, server_pid: int) -> None:
        self.server_pid = server_pid
        self.own_pid = os.getpid()
        self._start = self._sample()

    def _sample(self) -> tuple[float, float, float, float, float]:
        busy, steal, now = _busy_and_steal()
        # The servers are our children: count the load generator without them.
        server = _proc_cpu(self.server_pid, children=True)
        return busy, steal, now, server, _proc_cpu(self.own_pid, children=False)

    def stop(self) -> CpuUse:
        b0, s0, t0, srv0, own0 = self._start
        b1, s1, t1, srv1, own1 = self._sample()
        wall = max(t1 - t0, 1e-6)
        server = (srv1 - srv0) / wall
        loadgen = (own1 - own0) / wall
        busy = (b1 - b0) / wall
        return CpuUse(
            wall_s=round(wall, 3),
            server=round(server, 3),
            loadgen=round(loadgen, 3),
            steal=round((s1 - s0) / wall, 3),
            foreign=round(max(0.0, busy - server - loadgen), 3),
        )


def busy_cores(sample_s: float) -> float:
    """Average busy cores (steal included: it is time we cannot have) over `sample_s`."""
    b0, s0, t0 = _busy_and_steal()
    time.sleep(sample_s)
    b1, s1, t1 = _busy_and_steal()
    return ((b1 - b0) + (s1 - s0)) / max(t1 - t0, 1e-6)


@dataclass
class Gate:
    """What the load gate saw before a scenario."""

    waited_s: float
    cores: float
    load1: float
    ok: bool  # False when it gave up after max_wait_s and ran anyway


def wait_for_idle(max_cores: float, max_wait_s: float, sample_s: float = 2.0) -> Gate:
    """Wait until the 1-minute load average or the measured CPU use is below `max_cores`.

    Either clause suffices: the load average lags a minute behind our own previous scenario,
    so on its own it would make us wait for ourselves.
    """
    start = time.monotonic()
    while True:
        load1 = os.getloadavg()[0]
        cores = busy_cores(sample_s)
        waited = time.monotonic() - start
        if load1 < max_cores or cores < max_cores:
            return Gate(round(waited, 1), round(cores, 3), round(load1, 2), True)
        if waited >= max_wait_s:
            return Gate(round(waited, 1), round(cores, 3), round(load1, 2), False)
        time.sleep(1.0)


def as_dict(obj: CpuUse | Gate) -> dict[str, float | bool]:
    """For the JSON file."""
    return asdict(obj)
