"""What a training run holds in memory, and how long its steps take: every stage run writes <run_dir>/memory.json.

    bytes of parameters, gradients and optimiser state, trainable parameters, peak resident set
    (and on CUDA torch.cuda.max_memory_allocated), seconds per optimiser step

Bytes are counted by storage, not by tensor: a storage that several modules or attributes share (a
tied embedding, one frozen base under an actor and a critic, a view) counts once. A bitsandbytes
4-bit parameter counts its packed uint8 data and its quantisation state (absmax, code, the nested
state's tensors). `python -m pipeline.tools.membench` compares these figures across stages and LoRA settings.
"""

from __future__ import annotations

import os
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from lightning.pytorch.callbacks import Callback

from pipeline.files import write_json

MEMORY_FILE = "memory.json"


def storage_key(t: torch.Tensor) -> tuple[str, int] | None:
    """(device, address) of a tensor's storage: the same for every view of it; None for a tensor with no bytes (meta, empty)."""
    storage = t.untyped_storage()
    if storage.nbytes() == 0 or t.device.type == "meta":
        return None
    return str(t.device), storage.data_ptr()


def unique_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages under `tensors`: a storage reached twice counts once."""
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        key = storage_key(t)
        if key is not None:
            seen[key] = t.untyped_storage().nbytes()
    return sum(seen.values())


def quant_state_tensors(state: Any) -> Iterator[torch.Tensor]:
    """The tensors of a bitsandbytes QuantState (absmax, code, offset) and of its nested state2."""
    if state is None:
        return
    for value in vars(state).values():
        if isinstance(value, torch.Tensor):
            yield value
        elif type(value).__name__ == "QuantState":
            yield from quant_state_tensors(value)


def parameter_tensors(module: torch.nn.Module) -> Iterator[torch.Tensor]:
    """Every tensor that holds a parameter's value: the parameter, and a 4-bit parameter's quantisation state."""
    for p in module.parameters():
        yield p
        yield from quant_state_tensors(getattr(p, "quant_state", None))


def parameter_bytes(module: torch.nn.Module) -> int:
    return unique_bytes(parameter_tensors(module))


def gradient_bytes(module: torch.nn.Module) -> int:
    """Bytes of the gradients set now (.grad stays set from the backward pass until the next zero_grad)."""
    return unique_bytes(p.grad for p in module.parameters() if p.grad is not None)


def state_tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from state_tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from state_tensors(v)


def optimizer_bytes(optimizers: Iterable[torch.optim.Optimizer]) -> int:
    """Bytes of the optimisers' state tensors (AdamW: exp_avg, exp_avg_sq and a step tensor per parameter, from the first step on)."""
    return unique_bytes(t for opt in optimizers for state in opt.state.values() for t in state_tensors(state))


def trainable_parameters(module: torch.nn.Module) -> int:
    """Elements of the parameters that train; one storage shared by several counts once."""
    seen: dict[tuple[str, int], int] = {}
    for p in module.parameters():
        key = storage_key(p)
        if p.requires_grad and key is not None:
            seen[key] = max(seen.get(key, 0), p.numel())
    return sum(seen.values())


def rss_bytes() -> int | None:
    """The resident set of this process now (Linux: /proc/self/statm); None where there is no such file."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_bytes() -> int:
    """The peak resident set of this process so far (getrusage reports kilobytes on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def cuda_peak_bytes() -> int | None:
    """torch.cuda.max_memory_allocated, where this process has used CUDA; None elsewhere."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    return None


def figures(module: torch.nn.Module, optimizers: Iterable[torch.optim.Optimizer]) -> dict[str, int]:
    """The byte counts of one moment, and their sums (what a model costs before activations)."""
    params, grads, optim = parameter_bytes(module), gradient_bytes(module), optimizer_bytes(optimizers)
    return {
        "trainable_params": trainable_parameters(module),
        "param_bytes": params,
        "grad_bytes": grads,
        "optimizer_bytes": optim,
        "param_optimizer_bytes": params + optim,
        "param_grad_optimizer_bytes": params + grads + optim,
    }


class MemoryFigures(Callback):
    """Times the optimiser steps and records the memory figures of a fit; writes them to `path` at its end (rank 0).

    The process's peak resident set includes what happens around the fit (loading the start models,
    writing checkpoints); the resident set when a backward pass starts, where a step's activations are
    at their largest, is recorded as well (its largest value): activation checkpointing shows there.

    A step is the batches from one optimiser step to the next (several with gradient accumulation; a
    whole rollout-and-update iteration under manual optimisation, as in PPO and GRPO). The figures are
    taken at the end of the first steps (and at the end of the fit): gradients are still set then (they
    stay until the next zero_grad, automatic and manual optimisation alike) and the optimiser state
    exists; the largest of each is kept, and later steps hold the same sizes. The first `warmup` steps (allocation, first-call costs) are not timed.
    """

    def __init__(self, path: Path, warmup: int = 1):
        self.path = Path(path)
        self.warmup = warmup
        self.step_seconds: list[float] = []
        self.peak: dict[str, int] = {}
        self.by_module: dict[str, int] = {}
        self._start: float | None = None
        self._last_step = 0
        self._steps = 0

    @staticmethod
    def _sync(trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_step = trainer.global_step  # a resumed run starts at its checkpoint's step
        self.by_module = {name: b for name, child in pl_module.named_children() if (b := parameter_bytes(child))}

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        now = {"rss_at_backward_bytes": rss_bytes()}
        if trainer.strategy.root_device.type == "cuda":
            now["cuda_at_backward_bytes"] = int(torch.cuda.memory_allocated())
        for key, value in now.items():
            if value is not None:
                self.peak[key] = max(self.peak.get(key, 0), value)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._start is None:
            self._sync(trainer)
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._last_step:
            return  # an accumulation batch: the step goes on
        self._sync(trainer)
        seconds = time.perf_counter() - self._start
        self._start, self._last_step = None, trainer.global_step
        self._steps += 1
        if self._steps > self.warmup:
            self.step_seconds.append(seconds)
        if self._steps <= self.warmup + 1:  # the sizes are those of every later step: no walk over every tensor in each one
            self.sample(pl_module, trainer.optimizers)

    def sample(self, module: torch.nn.Module, optimizers) -> None:
        for key, value in figures(module, optimizers).items():
            self.peak[key] = max(self.peak.get(key, 0), value)

    def result(self) -> dict:
        times = self.step_seconds
        return {
            **self.peak,
            "param_bytes_by_module": self.by_module,
            # The kernel's high-water mark (ru_maxrss) is updated lazily and can trail a /proc sample by a page or so.
            "peak_rss_bytes": max(peak_rss_bytes(), self.peak.get("rss_at_backward_bytes", 0)),
            "cuda_max_allocated_bytes": cuda_peak_bytes(),
            "steps": self._steps,
            "warmup_steps": min(self.warmup, self._steps),
            "step_s": statistics.median(times) if times else None,  # the median: bursts of other jobs' load move it less than a mean
            "step_s_mean": statistics.fmean(times) if times else None,
            "step_s_all": times,
        }

    def on_fit_end(self, trainer, pl_module) -> None:
        self.sample(pl_module, trainer.optimizers)  # a fit that took no step still reports its parameters
        if trainer.is_global_zero:
            write_json(self.path, self.result())
