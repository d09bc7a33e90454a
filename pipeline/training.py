"""Lightning plumbing shared by the stages: optimiser and schedule, logger, checkpoints, throughput, the Trainer,
and the language-model LightningModule that pretraining and SFT both train."""

from __future__ import annotations

import logging
import math
import os
import random
import re
import time
import uuid
from pathlib import Path
from typing import Any, Sequence

import hydra
import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric

from pipeline import runs, timing
from pipeline.data.samplers import GroupedSampler, ResumableSampler, ShuffledSampler
from pipeline.errors import UserError
from pipeline.files import read_json, write_json
from pipeline.losses.lm import IGNORE, next_token_loss
from pipeline.memory import MEMORY_FILE, MemoryFigures
from pipeline.model import GPT, Block, GPTConfig, decay_param_groups, generate, pad_vocab
from pipeline.model.gpt import set_activation_checkpointing
from pipeline.tokenizer import save_tokenizer

log = logging.getLogger(__name__)


def model_config_from(cfg_model: DictConfig, vocab_size: int) -> GPTConfig:
    """The architecture fields of cfg.model (others, such as compile, are not the model's), vocabulary padded to 64."""
    arch = {k: v for k, v in OmegaConf.to_container(cfg_model, resolve=True).items() if k in GPTConfig.__dataclass_fields__}
    arch["vocab_size"] = pad_vocab(vocab_size)
    try:
        return GPTConfig.from_dict(arch)
    except ValueError as e:
        raise UserError(str(e)) from None


def schedule_steps(module: pl.LightningModule, max_steps: int) -> int:
    """The optimiser steps the schedule spans: trainer.max_steps, or (max_steps=-1) what the epochs come to."""
    if max_steps and max_steps > 0:
        return int(max_steps)
    return max(1, int(module.trainer.estimated_stepping_batches))


class OptimizerChain(torch.optim.Optimizer):
    """Several optimisers over disjoint parameters, stepped as one: what Lightning's automatic optimisation and an
    LR scheduler see. param_groups are the parts' own groups, read afresh at each access: load_state_dict gives
    a part new group dicts, and a schedule must move the rates the parts use."""

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]):
        self.optimizers = list(optimizers)
        self.defaults = {}
        self._optimizer_step_pre_hooks, self._optimizer_step_post_hooks = {}, {}
        self._optimizer_state_dict_pre_hooks, self._optimizer_state_dict_post_hooks = {}, {}
        self._optimizer_load_state_dict_pre_hooks, self._optimizer_load_state_dict_post_hooks = {}, {}

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self) -> dict:
        return {p: s for o in self.optimizers for p, s in o.state.items()}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for optimizer in self.optimizers:
            optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict) -> None:
        parts = state_dict.get("optimizers") if isinstance(state_dict, dict) else None
        if not isinstance(parts, list) or len(parts) != len(self.optimizers):
            raise ValueError(f"optimizer state: expected the states of {len(self.optimizers)} optimisers (optim.matrices changed since the checkpoint?)")
        for optimizer, part in zip(self.optimizers, parts):
            optimizer.load_state_dict(part)


def muon_matrices(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The weight matrices Muon updates: every trainable 2-D weight inside the transformer blocks.

    Embeddings, the (tied) output head, a scalar head and every 1-D gain stay with AdamW, as in Muon's
    reference recipe: their update is not a matrix acting on hidden states. LoRA's adapter factors stay
    with AdamW too (peft=lora / qlora): each is a thin low-rank half of an update, not a weight matrix.
    """
    return [p for name, p in module.named_parameters() if p.requires_grad and p.dim() == 2 and ".blocks." in f".{name}" and "lora_" not in name]


def adamw_with_schedule(module: torch.nn.Module, opt: DictConfig, max_steps: int) -> dict:
    """AdamW (decay on matrices only; fused on GPU) with linear warmup then cosine decay to min_lr_ratio * lr.

    opt.matrices=muon: the blocks' weight matrices take torch.optim.Muon instead (momentum opt.muon_momentum,
    update RMS matched to AdamW's, so one lr serves both), the rest AdamW; the schedule moves both. With
    nothing for Muon to take (LoRA trains adapters only), it is AdamW alone.
    """
    fused = torch.cuda.is_available() and all(p.is_cuda for p in module.parameters())
    matrices = muon_matrices(module) if opt.get("matrices", "adamw") == "muon" else []
    if matrices:
        chosen = {id(p) for p in matrices}
        rest = [p for p in module.parameters() if p.requires_grad and id(p) not in chosen]
        muon = torch.optim.Muon(matrices, lr=opt.lr, weight_decay=opt.weight_decay, momentum=float(opt.get("muon_momentum", 0.95)), adjust_lr_fn="match_rms_adamw")
        adamw = torch.optim.AdamW(decay_param_groups(rest, opt.weight_decay), lr=opt.lr, betas=tuple(opt.betas), fused=fused or None)
        optimizer = OptimizerChain([muon, adamw]) if rest else muon
    else:
        optimizer = torch.optim.AdamW(
            decay_param_groups(module, opt.weight_decay), lr=opt.lr, betas=tuple(opt.betas), fused=fused or None
        )
    warmup, floor = int(opt.warmup_steps), float(opt.min_lr_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def wandb_mode() -> str:
    """Offline unless the user chose otherwise: WANDB_MODE wins, then a stored login, else offline."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY") or (Path.home() / ".netrc").is_file() and "api.wandb.ai" in (Path.home() / ".netrc").read_text():
        return "online"
    return "offline"


def make_logger(cfg: DictConfig, run_dir: Path, parents: Sequence[Path] = ()) -> Logger:
    """W&B (one run per stage run, resumed under the same id after a kill) or CSV; `parents` become its input artifacts."""
    if cfg.logger.name == "csv":
        return CSVLogger(save_dir=str(run_dir), name="csv", version="")
    os.environ["WANDB_MODE"] = wandb_mode()
    os.environ.setdefault("WANDB_SILENT", "true")
    id_file = run_dir / "wandb_id.txt"
    if id_file.is_file():
        run_id = id_file.read_text().strip()
    else:
        run_id = uuid.uuid4().hex[:12]
        id_file.parent.mkdir(parents=True, exist_ok=True)
        id_file.write_text(run_id)
    name = run_name_of(run_dir)
    logger = WandbLogger(
        project=cfg.logger.project,
        entity=cfg.logger.entity,
        group=cfg.logger.group or os.environ.get("PIPELINE_GROUP") or name,
        job_type=cfg.stage,
        name=f"{cfg.stage}/{name}",
        id=run_id,
        resume="allow",
        save_dir=str(run_dir),
        log_model=bool(cfg.logger.log_model),
        config=OmegaConf.to_container(cfg, resolve=True),
    )
    logger._wandb_init.pop("anonymous", None)  # Lightning passes anonymous=None, which W&B warns has no effect
    if is_global_zero():
        for path in parents:
            use_model_artifact(logger, path)
    return logger


def model_artifact_name(stage: str, run_dir: Path) -> str:
    """The W&B artifact name of a stage run's model.pt (W&B allows letters, digits, '.', '_' and '-')."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{stage}-model-{Path(run_dir).name}")[:120]


def use_model_artifact(logger: WandbLogger, path: Path) -> None:
    """Declare a parent stage's model.pt as this run's input, so W&B draws the lineage graph.

    The artifact is rebuilt from the same file, name and metadata that the parent logged, so its
    digest is the parent's and W&B resolves it to the parent's version instead of a new one. Offline,
    wandb refuses `use_artifact` ("Cannot use artifact when in offline mode"); the record it would
    write for a local artifact (an artifact record marked use_after_commit, which `wandb sync` turns
    into a use of the committed version) is written through the run's `_log_artifact` instead.
    A parent that is not a finished run of this pipeline (a bare .ckpt) has no artifact to point at.
    """
    import wandb

    run_dir = Path(path).parent
    if Path(path).name != runs.MODEL_FILE or not (run_dir / runs.METRICS_FILE).is_file():
        log.info("lineage: %s is not the model.pt of a finished stage run; no input artifact declared", path)
        return
    metrics = read_json(run_dir / runs.METRICS_FILE)
    stage = metrics.get("stage") or run_dir.parent.name
    artifact = wandb.Artifact(name=model_artifact_name(stage, run_dir), type="model", metadata=metrics)
    artifact.add_file(str(path), policy="immutable")  # a finished model.pt never changes: no staging copy
    run = logger.experiment
    mode = run.settings.mode
    if mode in ("offline", "dryrun"):
        run._log_artifact(artifact, use_after_commit=True)
    elif mode != "disabled":
        run.use_artifact(artifact)


def run_name_of(run_dir: Path) -> str:
    return Path(run_dir).name


HISTORY_FILE = "history.jsonl"


class History(Logger):
    """Every scalar the stage logs, one JSON line per logging call: {"step": N, "train/loss": ...}.

    The report's curves read run_dir/history.jsonl whichever logger=... the user chose. It is a
    Lightning Logger beside the user's (not a callback) because loggers are what receive the logged
    values, at the step they belong to. It only appends: a resumed run logs the steps after its
    checkpoint again, at the same steps, and `history_series` keeps the last value of each step.
    """

    def __init__(self, path: Path):
        super().__init__()
        self.path = Path(path)

    @property
    def name(self) -> str:
        return "history"

    @property
    def version(self) -> int:
        return 0

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass  # the config lives in .hydra/

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        import json

        row = {k: float(v) for k, v in metrics.items() if k != "epoch" and isinstance(v, (int, float, torch.Tensor)) and torch.as_tensor(v).numel() == 1}
        if not row:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("ab+") as f:
            # A line torn by a kill is ended first, so that it spoils only itself.
            if f.tell():
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
            f.write((json.dumps({"step": int(step or 0), **row}) + "\n").encode())


def read_history(path: Path) -> list[dict]:
    """The rows of a history.jsonl (none when the file is missing); a line torn by a kill is skipped."""
    import json

    path = Path(path)
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def history_series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one logged key in step order; a step logged twice (after a resume) keeps its last value."""
    by_step = {int(r["step"]): r[key] for r in rows if key in r}
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


class Throughput(Callback):
    """Tokens per second of the optimisation steps (and MFU where the device's peak is known)."""

    def __init__(self, flops_per_token: float | None = None, skip_steps: int = 3):
        self.flops_per_token = flops_per_token
        self.skip_steps = skip_steps  # the first steps pay for warm-up and allocation
        self.tokens = 0
        self.seconds = 0.0
        self._start = None
        self._first_step = 0

    def on_train_start(self, trainer, pl_module):
        self._first_step = trainer.global_step  # a resumed run pays for warm-up again

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if trainer.global_step - self._first_step <= self.skip_steps or self._start is None:
            return
        self.seconds += time.perf_counter() - self._start
        self.tokens += int(batch["input_ids"].numel()) * trainer.world_size
        if trainer.global_step % trainer.log_every_n_steps == 0:
            pl_module.log_dict(self.figures(trainer), rank_zero_only=True)

    def figures(self, trainer) -> dict[str, float]:
        if self.seconds == 0:
            return {}
        out = {"perf/tokens_per_s": self.tokens / self.seconds}
        peak = device_peak_flops()
        if peak and self.flops_per_token:
            out["perf/mfu"] = out["perf/tokens_per_s"] * self.flops_per_token / (peak * trainer.world_size)
        return out


class PhaseTimer(Callback):
    """trainer.fit split into `train steps` (each batch: forward, backward, optimiser step), `validation` (its loops,
    the sanity check included), `checkpoints` (trainer.save_checkpoint) and `fit` (the rest of the loop)."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        save = trainer.save_checkpoint
        if not getattr(save, "_timed", False):
            wrapped = timing.timed("checkpoints")(save)
            wrapped._timed = True
            trainer.save_checkpoint = wrapped  # ModelCheckpoint writes through it

    def on_fit_start(self, trainer, pl_module) -> None:
        timing.CLOCK.enter("fit")

    def on_fit_end(self, trainer, pl_module) -> None:
        timing.CLOCK.leave("fit")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        timing.CLOCK.enter("train steps")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        timing.CLOCK.leave("train steps")

    def on_validation_start(self, trainer, pl_module) -> None:
        timing.CLOCK.enter("validation")

    def on_validation_end(self, trainer, pl_module) -> None:
        timing.CLOCK.leave("validation")

    def on_sanity_check_start(self, trainer, pl_module) -> None:
        timing.CLOCK.enter("validation")

    def on_sanity_check_end(self, trainer, pl_module) -> None:
        timing.CLOCK.leave("validation")

    def on_exception(self, trainer, pl_module, exception) -> None:
        timing.CLOCK.leave("fit")


def device_peak_flops(dtype: torch.dtype = torch.bfloat16) -> float | None:
    """Peak dense FLOP/s of this GPU at dtype, from Lightning's table (None on a CPU or a GPU it does not know)."""
    if not torch.cuda.is_available():
        return None
    from lightning.fabric.utilities.throughput import get_available_flops

    return get_available_flops(torch.device("cuda"), dtype)


class Batches(pl.LightningDataModule):
    """Train and validation sets with their collate function: shuffled, full batches for training.

    With `lengths` (one per training row) training batches group rows of similar length, and with
    `groups` (a key per row) rows sharing a key stay together (GroupedSampler); otherwise plain
    shuffling (ShuffledSampler). Both orders are seeded; a ResumableSampler deals their batches to the ranks.

    The checkpoint records where training stands in the data (the epoch and the batches of it already
    trained on), so a resumed run goes on mid-epoch with the batches an uninterrupted run meets next.
    The position is read from the fit loop's progress rather than asked of the loader: Lightning draws
    one batch ahead, so a loader cannot tell the batch it has handed out from those trained on
    (torchdata's StatefulDataLoader loses that batch on resume), and Lightning drops a loader's saved
    state when configure_optimizers reads trainer.estimated_stepping_batches (Lightning #20550).
    """

    def __init__(self, train, val, batch_size: int, collate=None, num_workers: int = 0, lengths: list[int] | None = None, groups: list | None = None, seed: int = 0):
        super().__init__()
        self.train_set, self.val_set = train, val
        self.batch_size, self.collate, self.num_workers = batch_size, collate, num_workers
        self.lengths, self.groups, self.seed = lengths, groups, seed
        self.resume_at: dict | None = None  # the position of the checkpoint being resumed, until the loader is built
        self.source = None  # the epoch order of the loader last built

    def train_dataloader(self):
        trainer = self.trainer
        world = trainer.world_size if trainer else 1
        if self.lengths is None and self.groups is None:
            source = ShuffledSampler(len(self.train_set), self.seed, draw=world == 1)
        else:
            source = GroupedSampler(self.batch_size, self.lengths, self.groups, self.seed)
        self.source = source
        sampler = ResumableSampler(source, self.batch_size, world, trainer.global_rank if trainer else 0)
        if self.resume_at:
            sampler.resume(self.resume_at["epoch"], self.resume_at["batches"])
            if "seed" in self.resume_at and isinstance(source, ShuffledSampler):
                source.seeds[self.resume_at["epoch"]] = int(self.resume_at["seed"])  # the order that epoch had
            self.resume_at = None
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler, drop_last=True, collate_fn=self.collate, num_workers=self.num_workers)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=self.batch_size, collate_fn=self.collate, num_workers=self.num_workers)

    def state_dict(self) -> dict:
        """{"epoch": the epoch under way, "batches": its batches already trained on, over all ranks}."""
        trainer = self.trainer
        if trainer is None or trainer.state.fn != "fit":
            return {}
        # started - 1: current_epoch already counts an epoch whose last batch is done, before the next one starts.
        epoch = max(0, trainer.fit_loop.epoch_progress.current.started - 1)
        batches = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if batches >= trainer.num_training_batches:  # that epoch is over: the next one starts at its beginning
            epoch, batches = epoch + 1, 0
        state = {"epoch": epoch, "batches": batches * trainer.world_size}
        seeds = getattr(getattr(self, "source", None), "seeds", {})
        if epoch in seeds:  # a ShuffledSampler's drawn seed of the running epoch
            state["seed"] = seeds[epoch]
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        self.resume_at = dict(state_dict)


class ExactResume(Callback):
    """Every random number generator in the checkpoint, each rank's own, put back when training resumes.

    Dropout draws from torch's generator, user code from Python's or NumPy's. With these, the data
    position (Batches.state_dict) and what Lightning restores itself (weights, optimiser, schedule,
    loops, checkpoint scores), a resumed run computes what the uninterrupted run would have. They are
    put back at on_train_start, after Lightning has built the training iterator (which draws a seed
    from torch's generator), so that the next draw is the one the uninterrupted run made next.
    Under DDP the ranks' generators part ways (dropout on batches of different widths), so every rank's
    are gathered into the checkpoint: Lightning builds a checkpoint on every rank and writes rank 0's.
    Tensors and plain lists only: the checkpoint loads with weights_only=True.
    """

    def __init__(self):
        self.pending: list[dict] | None = None

    @staticmethod
    def generators() -> dict:
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if cuda else None,  # this rank's device alone: no context on the others
            "python": random.getstate(),
            "numpy": [v.tolist() if isinstance(v, np.ndarray) else v for v in np.random.get_state()],
        }

    def state_dict(self) -> dict:
        ranks = [self.generators()]
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            ranks = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(ranks, self.generators())
        return {"ranks": ranks}

    def load_state_dict(self, state_dict: dict) -> None:
        self.pending = state_dict["ranks"]

    def on_train_start(self, trainer, pl_module) -> None:
        ranks, self.pending = self.pending, None
        if not ranks:
            return
        state = ranks[trainer.global_rank % len(ranks)]  # another world size cannot resume exactly anyway
        torch.set_rng_state(state["torch"])
        if state["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


class FiniteGuard(Callback):
    """Stop a stage at the first non-finite gradient, before the optimiser step spoils the weights.

    The check runs after the backward pass, where DDP has already averaged the gradients, so every
    rank sees the same verdict at the same step and all stop together (none waits in a collective).
    The checkpoints written so far hold the last good weights; nothing overwrites them.
    """

    def __init__(self, stage: str = "training"):
        self.stage = stage

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return
        total = torch.stack([g.detach().float().abs().sum() for g in grads]).sum()
        if not torch.isfinite(total):
            last = Path(trainer.default_root_dir) / "checkpoints" / "last.ckpt"
            kept = f"the last good checkpoint is kept ({last})" if last.is_file() else "no checkpoint had been written yet"
            raise UserError(
                f"{self.stage} diverged at step {trainer.global_step}: non-finite gradients; "
                f"{kept}. Lower optim.lr, raise optim.warmup_steps or set trainer.gradient_clip_val"
            )


class ValidateLastStep(Callback):
    """Validate the final step too, when trainer.val_check_interval does not divide trainer.max_steps.

    Without it the steps after the last scheduled validation are never measured, and the best
    checkpoint (what load_best gives the stage's final figures and model.pt) ignores them. Asking the
    loop to stop at the last step makes Lightning run its validation there (its early-stopping path).
    """

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if 0 < trainer.max_steps <= trainer.global_step and trainer.limit_val_batches:
            trainer.should_stop = True


def is_global_zero() -> bool:
    """Rank 0 before a Trainer exists (DDP child processes carry their rank in the environment)."""
    from lightning.pytorch.utilities import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def fsdp_wrap_policy():
    """Shard at transformer-block granularity (used by conf/trainer/fsdp.yaml)."""
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    return ModuleWrapPolicy({Block})


def build_trainer(
    cfg: DictConfig,
    run_dir: Path,
    monitor: str,
    mode: str,
    callbacks: list[Callback] = (),
    parents: Sequence[Path] = (),
    **overrides: Any,
) -> tuple[pl.Trainer, ModelCheckpoint]:
    """The Trainer from cfg.trainer, with our logger, last + best checkpoints and the progress bar.

    `parents` are the model files the stage started from: the W&B run declares them as its inputs.
    """
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="best",
        monitor=monitor,
        mode=mode,
        save_top_k=1,
        save_last=True,
        auto_insert_metric_name=False,
        enable_version_counter=False,
    )
    # Every stage run writes run_dir/memory.json: parameter, gradient and optimiser bytes, peak memory, step time.
    # PhaseTimer: where the fit's time goes (pipeline/timing.py), into metrics.json's time/phases.
    all_callbacks = [checkpoint, LearningRateMonitor(logging_interval="step"), FiniteGuard(cfg.stage), MemoryFigures(run_dir / MEMORY_FILE), PhaseTimer(), ValidateLastStep(), *callbacks]
    logger = make_logger(cfg, run_dir, parents)
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_cfg.update(overrides)
    # The user's logger first: trainer.logger (samples tables, the model artifact) is that one.
    loggers = [logger, History(run_dir / HISTORY_FILE)]
    trainer = hydra.utils.instantiate(trainer_cfg, logger=loggers, callbacks=all_callbacks, default_root_dir=str(run_dir), _convert_="all")
    return trainer, checkpoint


def resume_checkpoint(cfg: DictConfig, run_dir: Path, model_config: dict | None = None) -> str | None:
    """ckpt_path if given, else this run's own last.ckpt: the same command after a kill resumes.

    A checkpoint whose model has another architecture is refused with the differing fields named.
    """
    if cfg.ckpt_path:
        path = Path(cfg.ckpt_path)
        if not path.is_file():
            raise UserError(f"ckpt_path={path}: no such checkpoint file")
    else:
        path = run_dir / "checkpoints" / "last.ckpt"
        if not path.is_file():
            return None
    # Read here first (weights only), so that an unsafe, truncated or foreign file is one clear error, not Lightning's traceback.
    checkpoint = runs.load_file(path, "checkpoint")
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "loops" not in checkpoint:
        raise UserError(f"{path} is not a Lightning checkpoint of a training run (no state_dict or loop state)")
    if model_config is not None:
        saved = checkpoint.get("hyper_parameters", {}).get("model_config")
        # Compared key by key: a checkpoint from before a new config field (saved without it, default None) still fits.
        diff = {} if saved is None else {k: (saved.get(k), model_config.get(k)) for k in sorted(set(saved) | set(model_config)) if saved.get(k) != model_config.get(k)}
        if diff:
            details = ", ".join(f"{k}: checkpoint {a} vs config {b}" for k, (a, b) in diff.items())
            raise UserError(f"checkpoint {path} holds a model of another architecture ({details})")
    return str(path)


def log_table(logger: Logger | None, key: str, columns: list[str], rows: list[list[Any]]) -> None:
    """A table of samples: a W&B table, or a JSON-lines file beside the CSV metrics."""
    if isinstance(logger, WandbLogger):
        logger.log_text(key=key, columns=columns, data=rows)
    elif logger is not None and getattr(logger, "log_dir", None):
        import json

        path = Path(logger.log_dir) / (key.replace("/", "_") + ".jsonl")
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            for row in rows:
                f.write(json.dumps(dict(zip(columns, row)), default=str) + "\n")


def log_model_artifact(logger: Logger | None, path: Path, name: str, kind: str, metadata: dict) -> None:
    """The finished model.pt as a W&B artifact (recorded offline, uploaded at `wandb sync`)."""
    if not isinstance(logger, WandbLogger):
        return
    import wandb

    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:120]  # W&B's rule for artifact names
    artifact = wandb.Artifact(name=safe, type=kind, metadata=metadata)
    artifact.add_file(str(path))
    logger.experiment.log_artifact(artifact)


def finish(
    run_dir: Path, model: GPT, tokenizer, metrics: dict, trainer: pl.Trainer, kind: str, stage: str, extra: dict | None = None, base: Path | None = None, model_stage: str | None = None
) -> None:
    """The end of every stage: tokenizer and model.pt into the run directory, the artifact to W&B, then metrics.json last.

    metrics.json marks the run as finished, so it is written after everything it vouches for. `model_stage`:
    the stage model.pt records, where it is not this one (stage=prune keeps its source's: generate and serve
    send chat prompts to a model by it).
    """
    with timing.phase("finish"):
        save_tokenizer(tokenizer, run_dir / runs.TOKENIZER_DIR)
        lora = runs.save_model(run_dir / runs.MODEL_FILE, model, kind=kind, stage=model_stage or stage, extra=extra, base=base)  # base: a LoRA model's
        logger = trainer.logger
        if logger is not None:
            logger.log_metrics({f"final/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=trainer.global_step)
        metadata = metrics if lora is None else {**metrics, "lora": lora}  # an adapter: its base (path, weights digest) and settings, as in model.pt
        log_model_artifact(logger, run_dir / runs.MODEL_FILE, model_artifact_name(stage, run_dir), kind="model", metadata=metadata)
    # Where this run's time went, up to here (pipeline/timing.py); W&B's closing sync and the process exit come after.
    metrics["time/phases"] = timing.breakdown()
    write_json(run_dir / runs.METRICS_FILE, metrics)
    if logger is not None:
        logger.finalize("success")
        if hasattr(logger, "experiment") and hasattr(logger.experiment, "finish"):
            logger.experiment.finish()
    log.info("%s finished: %s", stage, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()})


def load_best(module: pl.LightningModule, checkpoint: ModelCheckpoint) -> None:
    """Load the best checkpoint's weights (by the monitored figure) into module: the final figures and model.pt are of those."""
    best = checkpoint.best_model_path
    if best and Path(best).is_file():
        module.load_state_dict(runs.load_file(Path(best), "checkpoint")["state_dict"], strict=module.strict_loading)  # LoRA: adapters only


class TrainedOnly(Callback):
    """A LoRA run's checkpoints hold what trains (adapters, heads), not the frozen base.

    The base is the start model, which the resumed process loads again (parents.json vouches that it
    is the same file) and, for QLoRA, quantises again the same way; the checkpoint is a few per cent
    of a full one. Loading checks that every trained tensor is there.
    """

    def __init__(self, module: pl.LightningModule, prefix: str):
        self.prefix = prefix  # the LoRA model's attribute path in the module: "model."
        self.trained = sorted(n for n, p in module.named_parameters() if p.requires_grad and n.startswith(prefix))

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        keep = set(self.trained)
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(self.prefix) or k in keep}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        missing = [k for k in self.trained if k not in checkpoint["state_dict"]]
        if missing:
            raise UserError(f"the checkpoint lacks {len(missing)} trained LoRA tensors ({missing[:3]}): it was not written by this LoRA run; pass rerun=true")


def apply_peft(cfg: DictConfig, module: pl.LightningModule, attr: str = "model") -> list[Callback]:
    """peft=lora / qlora: adapters on module.<attr>, whose base weights are loaded already; the callbacks its checkpoints need.

    Full finetuning (peft=none): nothing changes and no callback is needed.
    """
    settings = lora_settings(cfg)
    if settings is None:
        return []
    from pipeline.model.lora import apply_lora  # peft: imported only for LoRA runs

    model = apply_lora(getattr(module, attr), settings)
    module.strict_loading = False  # the checkpoints hold the adapters only (TrainedOnly)
    log.info("%s: %s (rank %d), %d parameters train", cfg.stage, cfg.peft.method, settings.r, sum(p.numel() for p in model.parameters() if p.requires_grad))
    return [TrainedOnly(module, f"{attr}.")]


def lora_settings(cfg: DictConfig):
    """The LoraSettings of cfg.peft, None for full finetuning."""
    peft = OmegaConf.to_container(cfg.get("peft") or {"method": "none"}, resolve=True)
    if peft.get("method", "none") == "none":
        return None
    from pipeline.model.lora import settings_from_config

    try:
        return settings_from_config(peft)
    except ValueError as e:
        raise UserError(str(e)) from None


def memory_levers(cfg: DictConfig, *models: torch.nn.Module) -> None:
    """model.activation_checkpointing=true on the models a stage trains (GPT / ScalarGPT, LoRA or not); false turns it off.

    Each block then keeps only its input in a forward that records gradients and is run again in the
    backward pass. Frozen models (references, reward models) need not be passed: their forwards record
    no gradients, so nothing is checkpointed there anyway. The setting is read with a default (false),
    so a user config without the key works; it is a runtime setting, never part of model.pt's config.
    """
    on = bool(OmegaConf.select(cfg, "model.activation_checkpointing", default=False))
    for model in models:
        set_activation_checkpointing(model, on)
    if on and models:
        log.info("%s: activation checkpointing on (%d model%s): blocks are recomputed in the backward pass", cfg.get("stage"), len(models), "s" if len(models) > 1 else "")


class LanguageModelModule(pl.LightningModule):
    """A GPT trained on next-token prediction; validation reports loss, perplexity and samples.

    Pretraining batches carry `input_ids` alone (every token is a target); SFT batches carry `labels`
    too, IGNORE on the tokens that carry no loss (the prompt, padding).
    """

    def __init__(self, model_config: dict, optim: dict, max_steps: int, compile: bool = False, model_kind: str = "lm", stage: str = "pretrain"):
        super().__init__()
        self.save_hyperparameters()
        self.model = GPT(GPTConfig.from_dict(model_config))
        self.val_loss = MeanMetric()
        self.best_val_loss = math.inf
        self.tokenizer = None  # set by the stage for sample generations; not part of the checkpoint
        self.sample_prompts: list[list[int]] = []
        self.max_new_tokens = 48

    def configure_model(self) -> None:
        # In-place compile keeps parameter names, so checkpoints load with or without it.
        if self.hparams.compile and not getattr(self, "_compiled", False):
            self.model.compile()
            self._compiled = True

    def loss(self, batch: dict) -> torch.Tensor:
        ids = batch["input_ids"]  # (B, T+1)
        if "labels" not in batch:  # every token is a target
            return next_token_loss(self.model(ids[:, :-1]), ids[:, 1:])  # (B, T, V) against (B, T)
        targets = batch["labels"][:, 1:]
        keep = targets != IGNORE  # the output head runs only where there is a loss (not on prompts, padding)
        return next_token_loss(self.model(ids[:, :-1], keep=keep), targets[keep])  # (N, V) against (N,)

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.val_loss.update(self.loss(batch))

    def on_validation_epoch_end(self):
        loss = self.val_loss.compute().item()
        self.val_loss.reset()
        if not self.trainer.sanity_checking:
            self.best_val_loss = min(self.best_val_loss, loss)
        self.log_dict({"val/loss": loss, "val/ppl": math.exp(min(loss, 50)), "val/loss_best": self.best_val_loss}, sync_dist=False, prog_bar=True)
        if self.trainer.is_global_zero and self.sample_prompts and self.tokenizer is not None and self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
            self.log_samples()

    def log_samples(self) -> None:
        rows = []
        tok = self.tokenizer
        for prompt in self.sample_prompts:
            ids = torch.tensor([prompt], device=self.device)
            out = generate(self.model, ids, max_new_tokens=self.max_new_tokens, temperature=0.0, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
            rows.append([self.global_step, tok.decode(prompt, skip_special_tokens=True), tok.decode(out.tokens[0], skip_special_tokens=True)])
        log_table(self.logger, f"samples/{self.hparams.stage}", ["step", "prompt", "completion"], rows)
        log.info("sample at step %d: %r -> %r", self.global_step, rows[0][1], rows[0][2])

    def on_save_checkpoint(self, checkpoint):
        checkpoint["best_val_loss"] = self.best_val_loss

    def on_load_checkpoint(self, checkpoint):
        self.best_val_loss = checkpoint.get("best_val_loss", math.inf)

    def configure_optimizers(self):
        return adamw_with_schedule(self.model, OmegaConf.create(self.hparams.optim), schedule_steps(self, self.hparams.max_steps))
