"""Tasks with a gold judge: the data a recipe trains on and the judge that measures the result.

A task is one module here that provides:

    VERSION                          a string; bump it when the generator changes (cached files are rebuilt)
    default_rows() -> {kind: {split: rows}}
                                     kind "sft" (TRL conversational `messages`), "preference" (`prompt`,
                                     `chosen`, `rejected`, with `chosen_gold` / `rejected_gold`), "prompts"
                                     (`prompt`); splits train, validation, test
    prompt_rows(split, n, seed=0)    the first n prompt-only rows of a split
    gold_score(prompt, response)     the noise-free judge, 0 to 1, from the prompt text alone
    labelled_pairs(prompts, a, b, seed=0)
                                     the simulated annotator's preference rows for two answers to each prompt

The stages reach the task through `default_task()`; a second task is one new module and a line in TASKS.
"""

from __future__ import annotations

import importlib
from types import ModuleType

TASKS = {"instruct": f"{__name__}.instruct"}  # name -> module
DEFAULT = "instruct"
INTERFACE = ("VERSION", "default_rows", "prompt_rows", "gold_score", "labelled_pairs")


def get_task(name: str = DEFAULT) -> ModuleType:
    """The task module of that name, checked against the interface above."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; tasks are {sorted(TASKS)}")
    module = importlib.import_module(TASKS[name])
    missing = [attr for attr in INTERFACE if not hasattr(module, attr)]
    if missing:
        raise TypeError(f"task module {module.__name__} lacks {missing} of the task interface")
    return module


def default_task() -> ModuleType:
    return get_task(DEFAULT)
