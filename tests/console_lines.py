"""The console as the tests read it: the messages of a run's output, those said twice, and noise.

A message is a line without Hydra's `[time][logger][LEVEL] - ` prefix or Lightning's `INFO: ` one, so
that one line printed by two handlers counts twice; progress bars (and the metric lines that the
progress bar prints under itself) and blank lines are left out.
"""

from __future__ import annotations

import re
from collections import Counter

PREFIX = re.compile(r"^\[[^\]]*\]\[[^\]]*\]\[[A-Z]+\] - |^(?:DEBUG|INFO|WARNING|ERROR): ")
PROGRESS = re.compile(r"━|it/s|s/it|examples/s|^\s{10,}")

# What a user of the pipeline cannot act on (pipeline/console.py drops it).
NOISE = (
    "💡 Tip",
    "litlogger",
    "litmodels",
    "`weights_only` was not set",
    "`Trainer(val_check_interval=1.0)` was configured",
    "module(s) in eval mode at the start of training",
    "anonymous setting has no effect",
    "LeafSpec",
    "TPU available",
    "exists and is not empty",
)


def messages(output: str) -> list[str]:
    lines = output.replace("\r", "\n").splitlines()
    return [PREFIX.sub("", line).strip() for line in lines if line.strip() and not PROGRESS.search(line)]


def said_twice(output: str) -> dict[str, int]:
    return {m: n for m, n in Counter(messages(output)).items() if n > 1}


def noise(output: str) -> list[str]:
    return [m for m in messages(output) if any(n in m for n in NOISE)]
