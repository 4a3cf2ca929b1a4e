"""Progress of a simulate run in replayed steps, counted in forked worker processes too.

A job (one strategy at one cache ratio) replays every fold of the trace; the runner ticks the counter
after each fold by the fold's number of steps, so the bar moves many times per job and tqdm's rate and
ETA are in steps per second. In worker processes the ticks go to a shared ``multiprocessing.Value``
(inherited through ``fork``) that the parent polls while it waits for results; in-process they update
the bar directly. Counting never touches the simulated results.
"""

from __future__ import annotations

import multiprocessing as mp
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any, Callable, Optional, Sequence, TypeVar

J = TypeVar("J")
R = TypeVar("R")

POLL_S = 0.25  # how often the parent folds the workers' ticks into the bar


class StepCounter:
    """Counts replayed steps toward ``bar`` (anything with ``update(n)``, or None for no bar)."""

    def __init__(self, bar: Any = None, shared: bool = False) -> None:
        self.bar = bar
        self._value = mp.get_context("fork").Value("q", 0) if shared and bar is not None else None
        self._shown = 0

    def tick(self, n: int) -> None:
        """``n`` more steps replayed (callable from a forked worker)."""
        if self._value is not None:
            with self._value.get_lock():
                self._value.value += n
        elif self.bar is not None:
            self.bar.update(n)

    def drain(self) -> None:
        """Move the workers' ticks onto the bar (parent process only)."""
        if self._value is None:
            return
        v = self._value.value
        if v > self._shown:
            self.bar.update(v - self._shown)
            self._shown = v


def map_jobs(fn: Callable[[J], R], jobs: Sequence[J], workers: int, counter: StepCounter,
             on_done: Optional[Callable[[int], None]] = None) -> list[R]:
    """``[fn(j) for j in jobs]``, in forked worker processes when ``workers`` > 1; results keep job order.

    ``fn`` ticks ``counter`` itself; ``on_done(n_finished)`` is called as jobs finish (parent only).
    """
    if workers <= 1 or len(jobs) <= 1:
        out = []
        for j in jobs:
            out.append(fn(j))
            if on_done is not None:
                on_done(len(out))
        return out
    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("fork")) as pool:
        futures = [pool.submit(fn, j) for j in jobs]
        pending = set(futures)
        while pending:
            _, pending = wait(pending, timeout=POLL_S, return_when=FIRST_COMPLETED)
            counter.drain()
            if on_done is not None:
                on_done(len(futures) - len(pending))
        return [f.result() for f in futures]
