"""Tensor jobs (load, quantize, write one stored tensor): one at a time, or in parallel within a memory budget.

Without a budget every job runs as it is submitted, so the exporter holds one tensor at a time. With
`--max-memory` jobs run on worker threads (numpy releases the GIL in its array loops) as long as the sum
of their estimated working sets fits the budget; a job that needs more than the whole budget runs alone.
The output does not depend on the order jobs finish in: each one writes at offsets reserved beforehand.
"""

from __future__ import annotations

import os
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

from .errors import ExportError

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """'6G', '512M', '1.5GiB', '4000000000' -> bytes (binary units, as `free -h` and cgroups use)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ExportError(f"--max-memory {text!r}: not a size (examples: 6G, 512M, 1.5GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def resident_bytes() -> int:
    """This process's resident set now (VmRSS), 0 where /proc is not available."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def worker_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class TensorJobs:
    def __init__(self, budget: int | None = None, workers: int | None = None, log=print):
        """`budget`: bytes the running jobs may hold together; None runs each job when it is submitted."""
        self.budget = budget
        self.log = log
        self._pool = ThreadPoolExecutor(workers or worker_count(), "tensor-job") if budget is not None else None
        self._cond = threading.Condition()
        self._held = 0
        self._pending: list[Future] = []
        self._error: BaseException | None = None
        self._warned = False

    def submit(self, estimate: int, job: Callable[[], None], what: str) -> None:
        if self._pool is None:
            job()
            return
        with self._cond:
            if estimate > self.budget and not self._warned:
                self._warned = True
                self.log(f"{what} needs about {estimate >> 20} MiB, more than --max-memory leaves for tensors "
                         f"({self.budget >> 20} MiB): such tensors run alone")
            # Wait until the job fits next to the running ones (a job larger than the budget: until none runs).
            while self._error is None and self._held and self._held + estimate > self.budget:
                self._cond.wait()
            if self._error is not None:
                raise self._error
            self._held += estimate
        self._pending.append(self._pool.submit(self._run, estimate, job))

    def _run(self, estimate: int, job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as e:
            with self._cond:
                self._error = self._error or e
            raise
        finally:
            with self._cond:
                self._held -= estimate
                self._cond.notify_all()

    def wait(self) -> None:
        """Wait for every submitted job; raise the first failure."""
        pending, self._pending = self._pending, []
        for f in pending:
            f.exception()
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
