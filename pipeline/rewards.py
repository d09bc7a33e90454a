"""Rewards as code: the reward model, the gold judge, or the user's own Python functions, weighted and summed.

`grpo.reward` names one source or a list of them: `rm` (the trained reward model, scored by the
caller), `gold` (the embedded task's gold judge), or `package.module:function` / `path/to/file.py:function`.
A reward function follows TRL's `reward_funcs` convention, so one written for GRPOTrainer works here:

    def my_reward(prompts, completions, **kwargs) -> list[float]

called with keywords, one prompt per completion (each prompt repeated once per sample of its group).
Prompts are as the data has them: strings, or lists of {role, content} messages. Completions are
strings for string prompts and [{"role": "assistant", "content": text}] for conversational ones
(`completions_for`). Extra keyword arguments (TRL passes the dataset's other columns) are passed on.

Unlike TRL, which turns a None reward into NaN and skips that completion, a reward here must be a
finite number for every completion: anything else is a UserError naming the function and the index,
because a silently skipped completion would bias the group baselines without anyone noticing.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import numbers
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline.data.chat import prompt_text
from pipeline.errors import UserError
from pipeline.tasks import default_task

KINDS = ("rm", "gold", "function")
_DOTTED = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")
SPEC_HELP = "rm, gold, package.module:function or path/to/file.py:function"


@dataclass
class RewardSource:
    """One term of the reward: `name` as the user wrote it, `kind` rm | gold | function, `fn` None for rm."""

    name: str
    kind: str
    fn: Callable | None
    weight: float = 1.0

    def __post_init__(self):
        if self.kind not in KINDS or (self.fn is None) != (self.kind == "rm"):
            raise ValueError(f"reward source {self.name}: kind {self.kind!r} with fn {self.fn!r}; kinds are {KINDS}, only rm has no fn")


def completions_for(prompts: Sequence, texts: Sequence[str]) -> list:
    """Completions shaped as TRL passes them: the text for a string prompt, an assistant message list for a conversation."""
    if len(prompts) != len(texts):
        raise ValueError(f"{len(prompts)} prompts but {len(texts)} completions")
    return [text if isinstance(prompt, str) else [{"role": "assistant", "content": text}] for prompt, text in zip(prompts, texts)]


def completion_text(completion) -> str:
    """The text of one completion in either shape (the assistant turns of a message list, joined)."""
    if isinstance(completion, str):
        return completion
    return "".join(m["content"] for m in completion if m.get("role", "assistant") == "assistant")


def gold_reward(prompts: list, completions: list, **kwargs) -> list[float]:
    """The embedded task's gold judge as a reward function (0 to 1; ValueError on a prompt it cannot parse)."""
    judge = default_task().gold_score
    return [judge(prompt_text(p), completion_text(c)) for p, c in zip(prompts, completions, strict=True)]


def parse_reward_sources(spec, weights=None) -> list[RewardSource]:
    """The sources named by config `grpo.reward` (a string or a list), with `grpo.reward_weights` (None: all 1.0).

    Functions are imported here, so that a typo fails at start-up with one line, not after the first rollout.
    """
    names = [spec] if isinstance(spec, str) else list(spec or [])  # Hydra hands lists over as ListConfig
    if not names or any(isinstance(n, str) and not n.strip() for n in names):
        raise UserError(f"grpo.reward is empty: name at least one reward: {SPEC_HELP}")
    for name in names:
        if not isinstance(name, str):
            raise UserError(f"grpo.reward entries must be strings ({SPEC_HELP}), not {type(name).__name__} {name!r}")
    names = [n.strip() for n in names]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UserError(f"grpo.reward names {', '.join(duplicates)} more than once; give each reward once and weight it with grpo.reward_weights")
    if weights is None:
        weights = [1.0] * len(names)
    elif isinstance(weights, (str, numbers.Number)) or len(list(weights)) != len(names):
        given = "one number" if isinstance(weights, (str, numbers.Number)) else f"{len(list(weights))} weights"
        raise UserError(f"grpo.reward_weights has {given} but grpo.reward names {len(names)} rewards; give one weight per reward, in the same order")
    weights = list(weights)
    for name, weight in zip(names, weights):
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
            raise UserError(f"grpo.reward_weights: the weight of {name} must be a finite number, not {weight!r}")
    return [_source(name, float(weight)) for name, weight in zip(names, weights)]


def _source(name: str, weight: float) -> RewardSource:
    if name == "rm":
        return RewardSource(name, "rm", None, weight)
    if name == "gold":
        return RewardSource(name, "gold", gold_reward, weight)
    if ":" not in name:
        raise UserError(f"grpo.reward entry {name!r} is not one of {SPEC_HELP}")
    return RewardSource(name, "function", load_reward_function(name), weight)


def load_reward_function(spec: str) -> Callable:
    """The callable named by `package.module:function` or `path/to/file.py:function` (an attribute path may be dotted)."""
    target, _, attribute = spec.rpartition(":")  # rpartition: a Windows drive letter stays in the path
    if not target or not _DOTTED.fullmatch(attribute):
        raise UserError(f"reward function {spec}: expected {SPEC_HELP}")
    is_file = target.endswith(".py") or "/" in target or os.sep in target
    if not is_file and not _DOTTED.fullmatch(target):
        raise UserError(f"reward function {spec}: {target!r} is neither a dotted module name nor a path to a .py file")
    module = _import_file(spec, target) if is_file else _import_module(spec, target)
    obj = module
    for part in attribute.split("."):
        if not hasattr(obj, part):
            where = getattr(module, "__file__", None) or module.__name__
            raise UserError(f"reward function {spec}: {where} has no attribute {attribute!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserError(f"reward function {spec}: {attribute} is not callable: it is {type(obj).__name__} {obj!r:.60}")
    return obj


def _import_failure(spec: str, error: Exception) -> UserError:
    """One line for an error raised while the user's module runs: a syntax error's file and line, else the exception."""
    if isinstance(error, SyntaxError):
        return UserError(f"reward function {spec}: syntax error in {error.filename}, line {error.lineno}: {error.msg}")
    return UserError(f"reward function {spec}: importing it raised {type(error).__name__}: {error}")


def _import_module(spec: str, module_name: str):
    cwd = os.getcwd()
    if not _cwd_on_path(cwd):
        # An installed console script does not put the working directory on sys.path as `python -m
        # pipeline` does; add it last, so that both find the user's modules the same way.
        sys.path.append(cwd)
        importlib.invalidate_caches()
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name is None or not (module_name == error.name or module_name.startswith(error.name + ".")):
            # the user's module was found but imports something that is missing
            raise UserError(f"reward function {spec}: importing {module_name} failed: it imports {error.name!r}, which is not installed") from error
        raise UserError(
            f"reward function {spec}: no module named {error.name!r} (looked in the current directory {cwd} "
            f"and PYTHONPATH={os.environ.get('PYTHONPATH', '')!r}; or give a file: path/to/file.py:function)"
        ) from error
    except Exception as error:  # the user's code failed while importing: say where, in one line
        raise _import_failure(spec, error) from error


def _cwd_on_path(cwd: str) -> bool:
    return any(os.path.abspath(p or os.curdir) == cwd for p in sys.path)


def _import_file(spec: str, filename: str):
    path = Path(filename).expanduser()
    if not path.is_file():
        raise UserError(f"reward function {spec}: no file {filename} (relative paths start from the current directory {os.getcwd()})")
    resolved = path.resolve()
    # A module name unique to the file, registered in sys.modules, so that dataclasses and pickling
    # (which look classes up there) work in the user's module as in any imported one.
    digest = hashlib.blake2b(str(resolved).encode(), digest_size=6).hexdigest()
    stem = re.sub(r"\W", "_", resolved.stem)
    module_name = f"pipeline_reward_{stem}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    module_spec = importlib.util.spec_from_file_location(module_name, resolved)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[module_name]
        raise _import_failure(spec, error) from error
    return module


def call_reward_function(source: RewardSource, prompts: list, completions: list, **kwargs) -> list[float]:
    """The function's rewards for the completions, checked: one finite number per completion, else a UserError."""
    if source.fn is None:
        raise ValueError(f"reward source {source.name} is the reward model: the caller scores it, not call_reward_function")
    try:
        returned = source.fn(prompts=prompts, completions=completions, **kwargs)  # keywords, as TRL calls them
    except Exception as error:
        raise UserError(f"reward function {source.name} raised {type(error).__name__}: {error}") from error
    return _check_rewards(source.name, returned, len(completions))


def _check_rewards(name: str, returned, expected: int) -> list[float]:
    what = f"reward function {name} returned {type(returned).__name__}"
    if isinstance(returned, (torch.Tensor, np.ndarray)):
        if returned.ndim != 1:
            raise UserError(f"{what} of shape {tuple(returned.shape)}; expected one number for each of the {expected} completions")
        values = returned.tolist()
    elif isinstance(returned, (list, tuple)):
        values = list(returned)
    else:
        raise UserError(f"{what}; expected a list of {expected} numbers, one per completion")
    if len(values) != expected:
        raise UserError(f"{what} of length {len(values)}; expected {expected}, one number per completion")
    rewards = []
    for i, value in enumerate(values):
        if (isinstance(value, torch.Tensor) and value.numel() == 1) or (isinstance(value, np.ndarray) and value.size == 1):
            value = value.item()  # a list of 0-d tensors or arrays
        if value is None:
            raise UserError(f"reward function {name} returned None at index {i}; every completion needs a number")
        if not isinstance(value, numbers.Real):  # bools count, as 0 and 1
            raise UserError(f"reward function {name} returned {type(value).__name__} {value!r} at index {i}; rewards must be numbers")
        value = float(value)
        if not math.isfinite(value):
            raise UserError(f"reward function {name} returned {value} at index {i}; rewards must be finite")
        rewards.append(value)
    return rewards


def weighted_rewards(
    sources: Sequence[RewardSource], prompts: list, completions: list, rm_scores: torch.Tensor | None, **kwargs
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(weighted sum (B,), each source's own rewards (B,) by name) for a batch of completions.

    `rm` takes `rm_scores`, which the caller computed with the reward model; the per-source rewards
    are unweighted, for logging as TRL does (`rewards/<name>/mean`). kwargs go to every function.
    """
    n = len(completions)
    if len(prompts) != n:
        raise ValueError(f"{len(prompts)} prompts but {n} completions: repeat each prompt once per completion")
    device = rm_scores.device if rm_scores is not None else torch.device("cpu")
    per_source: dict[str, torch.Tensor] = {}
    total = torch.zeros(n, dtype=torch.float32, device=device)
    for source in sources:
        if source.kind == "rm":
            if rm_scores is None:
                raise ValueError("grpo.reward includes rm, so weighted_rewards needs the reward model's scores (rm_scores)")
            if rm_scores.shape != (n,):
                raise ValueError(f"rm_scores has shape {tuple(rm_scores.shape)}; expected ({n},), one score per completion")
            rewards = rm_scores.detach().to(torch.float32)
        else:
            rewards = torch.tensor(call_reward_function(source, prompts, completions, **kwargs), dtype=torch.float32, device=device)
        per_source[source.name] = rewards
        total = total + source.weight * rewards
    return total, per_source
