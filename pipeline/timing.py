"""Where a stage run's wall time goes, measured by the run itself: exclusive phases on one clock.

    from pipeline.timing import phase, timed
    with phase("data"):              # or @timed("eval") on a function
        ...

A phase entered inside another pauses the outer one, so the phases never overlap and their sum,
with `other`, is the run's wall time. The stage's process pays `start` before any of them (Python
start-up, imports, Hydra's composition, the config checks: process creation to run_stage), the
Lightning hooks of PhaseTimer split trainer.fit into its optimisation steps, validation loops and
checkpoint writes (and `fit`: the rest of the loop: batches collated, metrics logged, W&B's own
start), and training.finish counts as `finish` (model.pt, the W&B artifact). `breakdown()` gives
the figures as `time/phases` in every metrics.json; the report sets them side by side, per stage.
"""

from __future__ import annotations

import functools
import time
from collections import defaultdict
from contextlib import contextmanager

import psutil

# The order of the report's columns: what each phase holds is in the module docstring.
PHASES = ("start", "data", "train steps", "validation", "checkpoints", "fit", "eval", "finish", "other")


class Clock:
    """Exclusive phase timer: a stack of open phases, only the innermost one running."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.stack: list[str] = []
        self.since = time.perf_counter()
        self.run_started: float | None = None  # time.time() when run_stage began
        self.start_s = 0.0

    def _switch(self) -> None:
        now = time.perf_counter()
        if self.stack:
            self.seconds[self.stack[-1]] += now - self.since
        self.since = now

    def enter(self, name: str) -> None:
        self._switch()
        self.stack.append(name)

    def leave(self, name: str) -> None:
        self._switch()
        if name in self.stack:  # an exception may have skipped an inner leave
            del self.stack[len(self.stack) - 1 - self.stack[::-1].index(name) :]


CLOCK = Clock()
# When this process began as a stage process, where the recipe forked it (pipeline/__main__.py): the fork knows
# the moment exactly, while psutil's creation time (boot time plus clock ticks) can be off by tenths of a second.
# None: the process's creation time.
PROCESS_STARTED: float | None = None


def mark_run_start() -> None:
    """The stage begins (run_stage): the time since the process was created is its start-up (imports, composition, checks)."""
    CLOCK.run_started = time.time()
    CLOCK.start_s = CLOCK.run_started - (PROCESS_STARTED if PROCESS_STARTED is not None else psutil.Process().create_time())


@contextmanager
def phase(name: str):
    CLOCK.enter(name)
    try:
        yield
    finally:
        CLOCK.leave(name)


def timed(name: str):
    """Decorator: every call of the function is phase `name`."""

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            with phase(name):
                return fn(*args, **kwargs)

        return inner

    return wrap


def breakdown() -> dict[str, float]:
    """{phase: seconds} so far, `start` and `other` (the run's wall time since run_stage that no phase holds) included; {} outside a stage run."""
    if CLOCK.run_started is None:
        return {}
    CLOCK._switch()
    out = {name: CLOCK.seconds.get(name, 0.0) for name in PHASES if name not in ("start", "other")}
    out.update({name: s for name, s in CLOCK.seconds.items() if name not in out})  # a phase the table does not list yet
    out["other"] = max(0.0, (time.time() - CLOCK.run_started) - sum(out.values()))
    out["start"] = CLOCK.start_s
    return {name: round(out[name], 3) for name in [*PHASES, *sorted(set(out) - set(PHASES))] if name in out}
