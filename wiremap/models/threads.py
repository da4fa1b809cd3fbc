"""How many intra-op threads to use: the cores this process may use, minus the busy ones.

    with threads_for_load() as gov:      # torch.set_num_threads(chosen), restored on exit
        for batch in batches:
            gov.refresh()                  # re-chosen at most once a second

Why: torch's OpenMP threads (GNU libgomp) spin while they wait for each other. When
another process holds a core, a parallel region waits for its preempted thread to be
scheduled again — a timeslice per small op — and the spinning threads take CPU from it.
Attribution runs thousands of small ops, so on a 2-core machine beside one busy process
it ran 10-70x slower with 2 threads than with 1. So the count is

    min(the caller's torch.get_num_threads(), cores allowed, idle cores)

where *cores allowed* is the CPU affinity mask capped by a cgroup CPU quota (v2
`cpu.max`, v1 `cpu.cfs_quota_us`), and *idle cores* is `os.cpu_count()` minus the
runnable tasks of other processes (the median of a few samples of `/proc/stat`), at least 1.
Passive waits (`OMP_WAIT_POLICY=PASSIVE`: waiting threads sleep) are not the default and
do not lift the idle-core limit, measured on the 2-core machine beside 5 other jobs (load
3.5-5.5; bench/attribute.py --size large, 4 interleaved runs each): 1 spinning thread took
5.1-14.5 s (median 6.7 s), 2 sleeping threads 9.5-12.6 s (median 10.1 s). A library could
not make them the default anyway: OpenMP reads the variable once, when torch is imported.
`WIREMAP_THREADS=N` fixes the count instead. Nothing here changes the process for good:
the caller's thread count comes back when the context ends. (With OpenMP the count belongs
to the calling thread: a context in one thread leaves the others' counts alone.)
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from wiremap.errors import WiremapError

ENV = "WIREMAP_THREADS"
REFRESH_SECONDS = 1.0
"""Least time between two choices inside one `threads_for_load` context."""


def allowed_cores(proc: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """Cores this process may run on: its affinity mask, capped by its cgroup CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = cgroup_quota(proc, cgroup_root)
    if quota is not None:
        cores = min(cores, max(1, math.floor(quota)))
    return max(1, cores)


def cgroup_quota(proc: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")):
    """The CPU quota of this process's cgroup in cores (float), or None when unlimited."""
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        rel = path.lstrip("/")
        if controllers == "":  # cgroup v2: cpu.max holds "quota period" or "max period"
            text = _read(cgroup_root / rel / "cpu.max")
            if text and not text.startswith("max"):
                quota, period = text.split()[:2]
                return int(quota) / int(period)
        elif "cpu" in controllers.split(","):  # cgroup v1: quota -1 means unlimited
            folder = cgroup_root / controllers / rel
            if not folder.is_dir():
                folder = cgroup_root / "cpu" / rel
            quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
            if quota and period and int(quota) > 0:
                return int(quota) / int(period)
    return None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def busy_elsewhere(proc: Path = Path("/proc"), samples: int = 5, gap: float = 0.001) -> int:
    """Runnable tasks of other processes: the median of `samples` reads of `/proc/stat`.

    The median, because a process that keeps a core busy most of the time is runnable in
    most samples, where a short burst is not (and one thread too many under load costs far
    more than one too few when idle). Our own runnable threads are not counted.
    """
    counts = []
    for i in range(samples):
        if i:
            time.sleep(gap)
        running = _procs_running(proc)
        if running is None:
            return 0
        counts.append(running - _own_running(proc))
    return max(0, int(statistics.median_high(counts)))


def _procs_running(proc: Path) -> int | None:
    text = _read(proc / "stat") or ""
    for line in text.splitlines():
        if line.startswith("procs_running "):
            return int(line.split()[1])
    return None


def _own_running(proc: Path) -> int:
    n = 0
    for stat in (proc / "self" / "task").glob("*/stat"):
        text = _read(stat)
        # the state follows the command name, which is in parentheses and may hold spaces
        if text and text.rpartition(")")[2].split()[:1] == ["R"]:
            n += 1
    return max(n, 1)  # this thread is running while it reads


def choose_threads(
    cap: int | None = None, proc: Path = Path("/proc"), cgroup_root: Path = Path("/sys/fs/cgroup")
) -> int:
    """Threads to use now (module docstring); `cap` defaults to torch.get_num_threads()."""
    fixed = os.environ.get(ENV, "").strip()
    if fixed:
        if not fixed.isdigit() or int(fixed) < 1:
            raise WiremapError(
                f"{ENV}={fixed!r}; set it to a positive number of threads or unset it"
            )
        return int(fixed)
    cap = torch.get_num_threads() if cap is None else cap
    allowed = allowed_cores(proc, cgroup_root)
    idle = (os.cpu_count() or 1) - busy_elsewhere(proc)
    return max(1, min(cap, allowed, idle))


class ThreadGovernor:
    """Sets torch's thread count to `choose_threads(cap)` and keeps it fitting the load."""

    def __init__(self, cap: int) -> None:
        self.cap, self.last, self.threads = cap, -math.inf, cap

    def refresh(self, force: bool = False) -> int:
        now = time.monotonic()
        if force or now - self.last >= REFRESH_SECONDS:
            self.last = now
            threads = choose_threads(self.cap)
            if threads != torch.get_num_threads():
                torch.set_num_threads(threads)
            self.threads = threads
        return self.threads


@contextmanager
def threads_for_load() -> Iterator[ThreadGovernor]:
    """torch's intra-op threads fitted to the free cores inside; the caller's count after."""
    before = torch.get_num_threads()
    gov = ThreadGovernor(before)
    try:
        gov.refresh(force=True)
        yield gov
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)
