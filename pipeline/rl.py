"""The online-RL machinery that PPO and GRPO share: prompts, rollout seeds, rank agreement, checkpoints, evaluation.

An online-RL stage (pipeline/stages/ppo.py, grpo.py) is a LightningModule on `OnlineRLModule`, driven by
`Iterations` (item i is iteration i) with manual optimisation. What it gets from here:

- prompts: `load_prompts` (prompt-only, prompt-completion or preference data: their prompts), the
  refusals (`check_prompt_count`, `check_reward_model`) and `prompt_batch`, each rank's disjoint slice
  of a seeded permutation, so a resumed run replays the prompts the uninterrupted one saw;
- `sample_generator`: the sampling generator of (seed, rank, iteration), nothing to save;
- `world_sum` / `world_mean` / `check_finite`: figures over every rank, and a divergence stop that
  every rank reaches, so none hangs in a collective;
- `save_last`: an atomic checkpoint at an iteration boundary, and the iteration, evaluation history
  and RNG states inside it (the stage adds its own state through `extra_state`);
- `evaluate`: greedy answers to held-out prompts scored by the stage (`eval_answers`) and the gold
  judge, and the sampled KL to the reference: the history is the over-optimisation curve;
- `fit_online`: the Trainer, resume, the start evaluation and the fit, the same for every stage;
- `rm_scores`: the reward model's score at the last token, with the reward run's normaliser.
"""

from __future__ import annotations

import logging
import os
import random
from abc import ABC, abstractmethod
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from pipeline import runs
from pipeline.data import DataFormat, load_stage_data, validate_rows
from pipeline.data.chat import prompt_ids, prompt_text
from pipeline.data.corpus import embedded_task
from pipeline.data.loading import source_row
from pipeline.errors import UserError
from pipeline.evaluate import sampled_kl
from pipeline.files import read_json, write_json
from pipeline.model import GPT, GPTConfig, ScalarGPT, generate, last_token_index, left_pad, truncate_after_eos
from pipeline.training import build_trainer, is_global_zero, log_table, resume_checkpoint

log = logging.getLogger(__name__)


class Iterations(torch.utils.data.Dataset):
    """Drives the loop: item i is iteration i (the prompts themselves are chosen by the module)."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


# ---------------------------------------------------------------------------------------------
# Prompts, parents and refusals


def planned_world_size(cfg: DictConfig) -> int | None:
    """The processes cfg.trainer asks for (devices x nodes) where devices is a number; None where Lightning decides (auto, -1)."""
    devices = cfg.trainer.get("devices")
    if isinstance(devices, int) and devices > 0:
        return devices * int(cfg.trainer.get("num_nodes") or 1)
    return None


def check_prompt_count(n: int, batch: int, world: int | None, source: str, key: str) -> None:
    """Every rank draws its own `key` prompts per iteration: fewer prompts than all ranks need would give empty batches."""
    if world is not None and n < batch * world:
        raise UserError(f"{source} [train] has {n} prompts, fewer than {key} x processes = {batch} x {world} = {batch * world}: lower {key} or add prompts")


def check_reward_model(payload: dict, path: Path, tokenizer, actor_config: GPTConfig, actor_path: Path) -> None:
    """The reward model must read the policy's tokens, see its whole sequences and carry its score normaliser."""
    if payload.get("kind") != "scalar":
        raise UserError(f"reward_from={path} is not a reward model (its model.pt has kind {payload.get('kind')!r})")
    needed = {"reward_mean", "reward_std"} - set(payload.get("extra", {}))
    if needed:
        raise UserError(
            f"reward_from={path} lacks the reward model's score normaliser ({', '.join(sorted(needed))}, computed when the reward "
            f"stage finishes): pass the reward run's directory or its model.pt, not a checkpoint"
        )
    if runs.tokenizer_fingerprint(runs.load_start_tokenizer(path)) != runs.tokenizer_fingerprint(tokenizer):
        raise UserError(f"reward_from={path} uses another tokenizer than the policy init_from={actor_path}: train the reward model from the same SFT run")
    rm_block = int(payload["config"]["block_size"])
    if rm_block < actor_config.block_size:
        raise UserError(
            f"reward_from={path} reads {rm_block} tokens (block_size), fewer than the policy's {actor_config.block_size} (init_from={actor_path}): "
            f"the reward model must see the policy's whole sequences"
        )


def load_reward_model(cfg: DictConfig, stage: str, sources: tuple[str, ...], tokenizer, actor: GPT, actor_path: Path, run_name: str) -> tuple[ScalarGPT, dict, Path]:
    """The reward model of `reward_from=` (else the newest finished reward run), checked against the policy: (model, payload, path)."""
    path = runs.resolve_start(cfg.reward_from, sources, Path(cfg.paths.root), stage, key="reward_from", run_name=run_name)
    payload = runs.load_model_payload(path)
    check_reward_model(payload, path, tokenizer, actor.config, actor_path)
    return runs.build_model(payload, ScalarGPT, path), payload, path


def reward_normaliser(payload: dict) -> dict:
    """The reward run's score normaliser (reward_mean, reward_std) and its other numbers."""
    return {k: v for k, v in payload.get("extra", {}).items() if isinstance(v, (int, float))}


def load_prompts(
    cfg: DictConfig, tokenizer, max_prompt: int, stage: str, eval_count: int | None = None, held_out: tuple[str, ...] = ("test", "validation")
) -> tuple[list[list[int]], list, list, str]:
    """Training prompts (token ids, and as TRL prompts) and held-out prompts (TRL prompts) through the shared loader.

    Preference and prompt-completion data give their prompts. `stage` names the config section
    (`<stage>.max_new_tokens`, `<stage>.eval_prompts`: the held-out count unless `eval_count` says) and
    the stage in messages. The held-out prompts come from the first split of `held_out` that the data has.
    """
    ds, fmt, source = load_stage_data(cfg, stage, {"prompt_only", "prompt_completion", "preference"}, lambda: embedded_task(Path(cfg.paths.cache_dir), "prompts"))
    if fmt.implicit_prompt:
        raise UserError(f"stage '{stage}' needs explicit prompts; {source} has implicit-prompt preference data")
    for split in ds:
        validate_rows(ds[split].select_columns(["prompt"]), DataFormat("prompt_only", fmt.conversational), f"{source} [{split}]")
    rows = ds["train"]["prompt"]
    prompts = [fitting_prompt_ids(tokenizer, p, max_prompt, f"{source} [train], row {source_row(ds['train'], i)}", stage) for i, p in enumerate(rows)]
    split = next(s for s in held_out if s in ds)
    count = cfg[stage].eval_prompts if eval_count is None else eval_count
    eval_prompts = [ds[split][i]["prompt"] for i in range(min(count, len(ds[split])))]
    return prompts, list(rows), eval_prompts, source


def fitting_prompt_ids(tokenizer, prompt, max_prompt: int, where: str, stage: str) -> list[int]:
    """A TRL prompt's token ids, refused (naming `where`: the file and row) when it leaves no room for <stage>.max_new_tokens."""
    ids = prompt_ids(tokenizer, prompt)
    if len(ids) > max_prompt:
        raise UserError(f"{where}: the prompt has {len(ids)} tokens; with {stage}.max_new_tokens it must fit the context ({max_prompt} tokens at most)")
    return ids


def uses_gold(cfg: DictConfig) -> bool:
    """eval.gold, where auto means: on the embedded task (a user's data has no judge)."""
    return bool(cfg.eval.gold if cfg.eval.gold != "auto" else not cfg.data.path)


@torch.no_grad()
def rm_scores(reward_model: ScalarGPT, sequences: torch.Tensor, attention: torch.Tensor, norm: dict, scale_by_std: bool) -> torch.Tensor:
    """The reward model's score of left-padded sequences (B, T) at their last real token, normalised: (B,).

    The reward run centres its scores on the reference responses (reward_mean 0); scale_by_std divides by their std as well.
    """
    values = reward_model(sequences, attention_mask=attention)  # (B, T)
    raw = values.gather(1, last_token_index(attention)[:, None]).squeeze(1).float()
    return normalise_scores(raw, norm, scale_by_std)


def normalise_scores(raw: torch.Tensor, norm: dict, scale_by_std: bool) -> torch.Tensor:
    scaled = raw - norm.get("reward_mean", 0.0)
    if scale_by_std:
        scaled = scaled / norm.get("reward_std", 1.0)
    return scaled


# ---------------------------------------------------------------------------------------------
# The module


def frozen_reference(actor: GPT, shared: bool) -> torch.nn.Module:
    """An online RL stage's reference: a model of the actor's shape (the stage loads the SFT weights into it),
    or with LoRA (`shared`) the actor itself with its adapters off, not a second copy."""
    if shared:
        from pipeline.model.lora import AdaptersOff  # peft: imported only for LoRA runs

        return AdaptersOff(actor)
    return GPT(actor.config)


class OnlineRLModule(pl.LightningModule, ABC):
    """What every online-RL stage's module has; the stage sets `stage` and `batch_key`, and holds an `actor` and a `reference`.

    The subclass keeps `self.cfg` (its config section) and `self.hparams` with seed, eos_id and pad_id.
    """

    stage = ""  # the config section and the checkpoint key: "ppo", "grpo"
    batch_key = ""  # the key of the prompts each rank draws per iteration

    def __init__(self):
        super().__init__()
        self.prompts: list[list[int]] = []  # token ids of every training prompt (set by the stage)
        self.eval_prompts: list = []  # held-out prompts (TRL format) for the evaluation
        self.tokenizer = None
        self.gold_fn = None  # prompt text, response text -> gold score; None where no judge applies
        self.iteration = 0
        self.history: list[dict] = []  # eval figures over training: the over-optimisation curve

    # -- data ------------------------------------------------------------------------------

    def prompt_indices(self, iteration: int) -> list[int]:
        """This rank's prompts for an iteration (indices into self.prompts): a seeded permutation, disjoint across ranks, replayable on resume."""
        B = self.cfg[self.batch_key]
        world, rank = self.trainer.world_size, self.trainer.global_rank
        per_epoch = max(1, len(self.prompts) // (B * world))
        epoch, slot = divmod(iteration, per_epoch)
        order = torch.randperm(len(self.prompts), generator=torch.Generator().manual_seed(self.hparams.seed * 1000 + epoch))
        start = (slot * world + rank) * B
        return order[start : start + B].tolist()

    def prompt_batch(self, iteration: int) -> list[list[int]]:
        return [self.prompts[i] for i in self.prompt_indices(iteration)]

    def sample_generator(self, iteration: int, purpose: int = 0) -> torch.Generator:
        """The sampling generator of one rank at one iteration, from (seed, rank, iteration) alone.

        Each rank samples differently, and a resumed run (any number of processes) draws exactly what
        the uninterrupted one drew, with no generator state to save.
        """
        rank = self.trainer.global_rank if self._trainer is not None else 0
        seed = (self.hparams.seed * 1_000_003 + rank * 7919 + iteration * 104_729 + purpose * 15_485_863) % (2**63)
        return torch.Generator(device=self.device).manual_seed(seed)

    # -- the ranks agree ---------------------------------------------------------------------

    def world_sum(self, x: torch.Tensor) -> torch.Tensor:
        """x summed over the DDP ranks (x itself on one process)."""
        trainer = self._trainer
        if trainer is None or trainer.world_size == 1:
            return x
        return trainer.strategy.reduce(x.detach().clone(), reduce_op="sum")

    def world_mean(self, x: torch.Tensor) -> torch.Tensor:
        trainer = self._trainer
        return self.world_sum(x) / (trainer.world_size if trainer is not None else 1)

    def check_finite(self, what: str, *tensors: torch.Tensor) -> None:
        """Stop every rank when any rank holds a non-finite value: all ranks reach this check, so none hangs in a collective."""
        bad = torch.tensor(float(not all(bool(torch.isfinite(t).all()) for t in tensors)), device=self.device)
        if float(self.world_sum(bad)) > 0:
            self.diverged(what)

    def diverged(self, what: str) -> None:
        s = self.stage
        raise UserError(
            f"{s.upper()} diverged at iteration {self.iteration}: non-finite {what}. The last good checkpoint is kept "
            f"(checkpoints/last.ckpt); lower optim.lr, raise {s}.kl_coef or lower {s}.clip_ratio"
        )

    # -- checkpoints -------------------------------------------------------------------------

    def save_last(self) -> None:
        """Checkpoint at an iteration boundary, atomically: a kill leaves the previous or the new file."""
        path = Path(self.trainer.default_root_dir) / "checkpoints" / "last.ckpt"
        tmp = path.with_name(".last.ckpt.tmp")
        self.trainer.save_checkpoint(tmp, weights_only=False)  # the whole state: optimisers, loops, RNGs
        if self.trainer.is_global_zero:
            os.replace(tmp, path)
        self.trainer.strategy.barrier()

    def extra_state(self) -> dict:
        """The stage's own state beyond weights and optimisers (PPO: its KL controller and EMA)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[f"{self.stage}_state"] = {
            "iteration": self.iteration,
            **self.extra_state(),
            "history": self.history,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "python_rng": random.getstate(),
            "numpy_rng": [v.tolist() if isinstance(v, np.ndarray) else v for v in np.random.get_state()],  # plain lists: checkpoints load with weights_only
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint[f"{self.stage}_state"]
        self.iteration = state["iteration"]
        self.load_extra_state(state)
        self.history = state["history"]
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        random.setstate(state["python_rng"])
        kind, keys, pos, has_gauss, gauss = state["numpy_rng"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))

    # -- evaluation --------------------------------------------------------------------------

    @torch.no_grad()
    def greedy(self, prompt_ids_list: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
        """Greedy answers: (left-padded sequences, their attention, responses, response mask, decoded texts)."""
        pad, eos = self.hparams.pad_id, self.hparams.eos_id
        ids, mask = left_pad(prompt_ids_list, pad, self.device)
        gen = generate(self.actor, ids, mask, max_new_tokens=self.cfg.max_new_tokens, temperature=0.0, eos_id=eos, pad_id=pad)
        response, rmask = truncate_after_eos(gen.tokens, gen.mask, eos, pad)
        seqs, att = torch.cat([ids, response], 1), torch.cat([mask, rmask], 1)
        texts = [self.tokenizer.decode(r[m.bool()], skip_special_tokens=True).strip() for r, m in zip(response, rmask)]
        self.actor.train()
        return seqs, att, response, rmask, texts

    def kl_to_reference(self, prompt_ids_list: list[list[int]]) -> torch.Tensor:
        """KL(policy || reference) in nats per response, one sampled response per prompt (pipeline.evaluate.sampled_kl).

        The seed is the run's alone, and all prompts go in one batch: every evaluation draws alike.
        """
        kl = sampled_kl(
            self.actor,
            self.reference,
            prompt_ids_list,
            max_new_tokens=self.cfg.max_new_tokens,
            temperature=self.cfg.temperature,
            eos_id=self.hparams.eos_id,
            pad_id=self.hparams.pad_id,
            seed=self.hparams.seed * 1_000_003 + 12_345,
            batch_size=max(1, len(prompt_ids_list)),
        )
        self.actor.train()
        return kl

    @abstractmethod
    def eval_answers(self, prompts: list) -> tuple[list[str], dict[str, torch.Tensor]]:
        """The stage's greedy answers to TRL prompts (through `greedy`) and its figures of them ({"eval/rm_score": (B,)} for PPO)."""

    @abstractmethod
    def sampled_kl(self, prompts: list) -> torch.Tensor:
        """The evaluation's KL of TRL prompts (through `kl_to_reference`): (B,)."""

    def evaluate(self) -> dict:
        """One point of the history: the stage's figures of greedy answers, the sampled KL and the gold score."""
        if not self.eval_prompts or self.tokenizer is None:
            return {}
        texts, figures = self.eval_answers(self.eval_prompts)
        kl = self.sampled_kl(self.eval_prompts)
        point = {"iteration": self.iteration, **{k: float(v.mean()) for k, v in figures.items()}, "eval/kl": float(kl.mean())}
        golds = []
        if self.gold_fn is not None:
            golds = [self.gold_fn(prompt_text(p), t) for p, t in zip(self.eval_prompts, texts)]
            point["eval/gold_score"] = sum(golds) / len(golds)
        self.history.append(point)
        trainer = self._trainer
        if trainer is not None and trainer.training:
            self.log_dict({k: v for k, v in point.items() if k != "iteration"}, sync_dist=False)
            names = [k.split("/", 1)[1].replace("_", " ") for k in figures]  # eval/rm_score -> rm score
            rows = [
                [prompt_text(p), t, *(float(v[i]) for v in figures.values()), (golds[i] if golds else float("nan")), float(kl[i])]
                for i, (p, t) in enumerate(zip(self.eval_prompts, texts))
            ]
            if trainer.is_global_zero:
                log_table(trainer.logger, f"samples/{self.stage}", ["prompt", "greedy response", *names, "gold score", "sampled kl"], rows[:32])
        log.info("eval at iteration %d: %s", self.iteration, {k: round(v, 4) for k, v in point.items() if k != "iteration"})
        return point


# ---------------------------------------------------------------------------------------------
# The fit


def fit_online(cfg: DictConfig, run_dir: Path, module: OnlineRLModule, iterations: int, parents: list[Path], prompt_count: int, source: str, callbacks: list = ()) -> tuple[pl.Trainer, dict | None, dict | None]:
    """Train `module` for `iterations` rollout rounds, resuming this run's last checkpoint: (trainer, start point, final point).

    The start evaluation runs once (rank zero, before the first iteration) and is kept in
    <stage>_start.json, so a resumed run reports the same start. The points are None on other ranks.
    """
    stage = module.stage
    trainer, _ = build_trainer(
        cfg,
        run_dir,
        monitor=None,
        mode="max",
        max_steps=-1,
        max_epochs=1,
        limit_train_batches=iterations,
        limit_val_batches=0,
        val_check_interval=1.0,
        check_val_every_n_epoch=1,
        gradient_clip_val=None,
        accumulate_grad_batches=1,
        use_distributed_sampler=False,
        log_every_n_steps=1,
        parents=parents,
        callbacks=list(callbacks),  # peft: TrainedOnly
    )
    check_prompt_count(prompt_count, int(cfg[stage][module.batch_key]), trainer.world_size, source, f"{stage}.{module.batch_key}")  # the world as Lightning counts it
    ckpt = resume_checkpoint(cfg, run_dir)
    start_point = None
    if ckpt is None and is_global_zero():
        module.to(trainer.strategy.root_device)
        start_point = module.evaluate()
        write_json(run_dir / f"{stage}_start.json", start_point)
    loader = DataLoader(Iterations(iterations), batch_size=1, collate_fn=lambda items: items[0])
    trainer.fit(module, train_dataloaders=loader, ckpt_path=ckpt, weights_only=True)
    if not trainer.is_global_zero:
        return trainer, None, None
    final_point = module.history[-1] if module.history and module.history[-1]["iteration"] == module.iteration else module.evaluate()
    start_point = start_point or read_json(run_dir / f"{stage}_start.json")
    return trainer, start_point, final_point
