"""Knowledge distillation, what stage=distill and stage=prune's recovery share: a student learns a frozen teacher's distributions.

    from pipeline.distillation import distill_prompts, held_out_figures, train_student

    prompts = distill_prompts(cfg, section, tokenizer, block_size, stage)                        # Prompts(train, held_out, source)
    start = held_out_figures(cfg, student, teacher, tokenizer, gold, kl_prompts, "start")         # kl/start, gold/start, rows/start
    trainer, figures = train_student(cfg, section, run_dir, student, teacher, tokenizer, prompts, parents, stage)
    final = held_out_figures(cfg, student, teacher, tokenizer, gold, kl_prompts, "final")         # kl/final, gold/final, rows/final

- cfg: the composed config. Its trainer (max_steps, val_check_interval, limit_val_batches, precision, ...),
  optim (AdamW and its schedule), seed, ckpt_path, data.path / data.columns / data.val_fraction (the
  prompts), data.num_workers, paths and logger are read as every stage reads them.
- section: the method's keys, a DictConfig or dict (cfg.distill for stage=distill, cfg.prune.recover for stage=prune):
    lmbda                 the share of batches whose answers the student samples itself (on-policy, GKD's lambda);
                          the other batches use the teacher's own answers (sequence-level KD)
    beta                  the divergence (pipeline/losses/distill.py): 0 forward KL(teacher || student),
                          1 reverse KL(student || teacher), between them GKD's generalised JSD_beta
    temperature           both models' logits are divided by it before the divergence
    nll_weight            weight of the student's plain next-token loss on the answer tokens, added (0: none)
    max_new_tokens        the longest answer, the teacher's or the student's
    teacher_temperature   0: the teacher's answers are greedy; > 0: sampled at it (once, cached)
    sampling_temperature  the student's on-policy samples (0: greedy)
    train_prompts         training prompts drawn at random (the teacher answers each once); null: all
    val_prompts           held-out prompts whose teacher answers give val/loss (the best checkpoint)
    batch_size            prompts per optimiser step (per process)
    generate_batch_size   prompts the teacher answers together
- run_dir: the stage run's directory: checkpoints/, history.jsonl and the teacher's answers (teacher_answers.json,
  made once and reused on resume while the teacher, the prompts and the settings are the same).
- student: the GPT that trains, in place: on return it holds the best checkpoint's weights (by val/loss).
- teacher: a GPT with the student's vocabulary; frozen, in eval mode, never in a checkpoint or the optimiser.
- tokenizer: the teacher's, which the student shares.
- prompts: what distill_prompts returns: training prompts as token ids, held-out ones as token ids, the source's name.
- parents: model files the run started from (W&B lineage).
- stage: the stage's name, for the config keys in messages ("distill", "prune").

Returns (trainer, figures): the fitted Trainer (its logger is the run's; `training.finish` takes it) and
{"val/loss", "val/kd", "val/nll", "train/steps", "train/prompts", "train/on_policy_batches",
"time/teacher_answers_s", "perf/tokens_per_s"}; the figures are empty on ranks other than 0.

`held_out_figures` measures a student against its teacher on held-out prompts (kl/<when>, gold/<when>),
before training and after.

Each batch's answers are the teacher's (cached) or, with probability lmbda, the student's own samples
(engine.generate, no gradient), drawn from (seed, step, the batch's first prompt) alone so that a resumed run
draws what the uninterrupted one drew. The student's and the teacher's logits are computed only at the
positions that predict answer tokens; the prompt carries no loss. Dropout is off in both models.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torchmetrics import MeanMetric

from pipeline.errors import UserError
from pipeline.evaluate import gold_eval, sampled_kl
from pipeline.files import read_json, write_json
from pipeline.losses.distill import distill_loss
from pipeline.losses.lm import IGNORE, next_token_loss
from pipeline.model import GPT, generate, left_pad, truncate_after_eos
from pipeline.rl import check_prompt_count, fitting_prompt_ids, load_prompts, planned_world_size
from pipeline.training import Batches, ExactResume, Throughput, adamw_with_schedule, build_trainer, load_best, resume_checkpoint, schedule_steps

log = logging.getLogger(__name__)

TEACHER_ANSWERS = "teacher_answers.json"


@dataclass
class Prompts:
    train: list[list[int]]  # token ids of the training prompts (the drawn train_prompts of them)
    held_out: list[list[int]]  # token ids of held-out prompts (val/loss; the stage's KL where no gold judge applies)
    source: str  # the data's name, for messages


def settings(section) -> dict:
    return OmegaConf.to_container(section, resolve=True) if isinstance(section, DictConfig) else dict(section)


def distill_prompts(cfg: DictConfig, section, tokenizer, block_size: int, stage: str) -> Prompts:
    """Training and held-out prompts: the embedded task's (its train and validation splits) or data.path's, in TRL's prompt formats.

    Prompt-only, prompt-completion and preference data give their prompts (rl.load_prompts, with its
    checks: explicit prompts, no empty rows, each training prompt short enough to leave room for
    `max_new_tokens` in `block_size`). `train_prompts` of them are drawn at random with the run's seed.
    """
    s = settings(section)
    max_prompt = block_size - int(s["max_new_tokens"])
    if max_prompt < 1:
        raise UserError(f"{stage}.max_new_tokens={s['max_new_tokens']} leaves no room for a prompt in the context of {block_size} tokens (the smaller of the student's and the teacher's)")
    train, _, held_out_rows, source = load_prompts(cfg, tokenizer, max_prompt, stage, eval_count=int(s["val_prompts"]), held_out=("validation", "test"))
    if s.get("train_prompts") is not None and s["train_prompts"] < len(train):
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(int(cfg.seed)))[: int(s["train_prompts"])]
        train = [train[i] for i in sorted(order.tolist())]
    held_out = [fitting_prompt_ids(tokenizer, p, max_prompt, f"{source} [held out], row {i}", stage) for i, p in enumerate(held_out_rows)]
    if not held_out:
        raise UserError(f"{source} has no held-out prompts for val/loss: give it a validation split, or raise data.val_fraction")
    check_prompt_count(len(train), int(s["batch_size"]), planned_world_size(cfg), source, f"{stage}.batch_size")
    return Prompts(train, held_out, source)


# ---------------------------------------------------------------------------------------------
# The teacher's answers, made once


def model_digest(model: torch.nn.Module) -> str:
    """sha256 of a model's weights (names, dtypes, bytes): what its answers depend on."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@torch.no_grad()
def answer(model: GPT, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float, eos_id: int, pad_id: int, seed: int, batch_size: int, device, context=nullcontext) -> list[list[int]]:
    """Each prompt's answer (token ids up to and including EOS), in prompt order; batches of similar lengths, one seeded generator.

    `context` is the precision context of the training forwards (autocast under bf16-mixed).
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths together: less left padding
    out: list[list[int] | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        ids, mask = left_pad([prompts[i] for i in rows], pad_id, device)
        with context():
            gen = generate(model, ids, mask, max_new_tokens=max_new_tokens, temperature=temperature, eos_id=eos_id, pad_id=pad_id, generator=generator)
        response, rmask = truncate_after_eos(gen.tokens, gen.mask, eos_id, pad_id)
        for i, r, m in zip(rows, response, rmask):
            out[i] = r[m.bool()].tolist()
    return out  # type: ignore[return-value]


def teacher_answers(
    path: Path, teacher: GPT, splits: dict[str, list[list[int]]], s: dict, eos_id: int, pad_id: int, seed: int, device, context=nullcontext, precision: str = ""
) -> tuple[dict[str, list[list[int]]], float]:
    """{split: the teacher's answer to each prompt}, read from `path` when it was made for the same teacher, prompts and settings; and the seconds spent.

    Otherwise generated (`generate_batch_size` at a time, at `teacher_temperature`, under `context`: the
    Trainer's `precision`) and written there atomically.
    """
    made_of = {"teacher": model_digest(teacher), "prompts": splits, "max_new_tokens": s["max_new_tokens"], "temperature": s["teacher_temperature"], "seed": seed, "precision": precision}
    key = hashlib.sha256(json.dumps(made_of).encode()).hexdigest()
    if path.is_file():
        saved = read_json(path)
        if saved.get("key") == key:
            log.info("distill: the teacher's answers to %s read from %s", ", ".join(f"{len(v)} {k}" for k, v in saved["answers"].items()), path)
            return saved["answers"], 0.0
        log.info("distill: %s was made for another teacher, other prompts or settings: answering again", path)
    started = time.time()
    was = next(teacher.parameters()).device
    teacher.to(device)
    answers = {
        split: answer(teacher, prompts, int(s["max_new_tokens"]), float(s["teacher_temperature"]), eos_id, pad_id, seed + i, int(s["generate_batch_size"]), device, context)
        for i, (split, prompts) in enumerate(splits.items())
    }
    teacher.to(was)
    write_json(path, {"key": key, "answers": answers})
    seconds = time.time() - started
    log.info("distill: the teacher answered %s in %.1f s (cached in %s)", ", ".join(f"{len(v)} {k}" for k, v in answers.items()), seconds, path)
    return answers, seconds


# ---------------------------------------------------------------------------------------------
# Batches and the module


class DistillCollator:
    """Rows {"prompt", "answer", "index"} -> input_ids / attention_mask (B, P + N): the prompts left-padded to P, the answers right-padded to N.

    Every answer then starts at column P (`prompt_len`), so the positions that predict answer tokens are
    the same columns in every row; `index` (B,) holds the rows' places in the training set.
    """

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict:
        prompt, prompt_mask = left_pad([r["prompt"] for r in rows], self.pad_id)
        answers = [torch.as_tensor(r["answer"], dtype=torch.long) for r in rows]
        answer = torch.nn.utils.rnn.pad_sequence(answers, batch_first=True, padding_value=self.pad_id)
        answer_mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(a) for a in answers], batch_first=True, padding_value=0)
        return {
            "input_ids": torch.cat([prompt, answer], 1),
            "attention_mask": torch.cat([prompt_mask, answer_mask], 1),
            "prompt_len": torch.tensor(prompt.size(1)),
            "index": torch.tensor([r["index"] for r in rows]),
        }


class DistillModule(pl.LightningModule):
    """The student (trained) and the frozen teacher, kept off the module tree: checkpoints and the optimiser hold the student alone.

    The student is `self.model`, as in the language-model stages, so a checkpoint of this module reads as
    a model (runs.load_model_payload: hyper-parameter model_config, keys under "model.").
    """

    def __init__(self, student: GPT, teacher: GPT, section: dict, optim: dict, max_steps: int, eos_id: int, pad_id: int, seed: int):
        super().__init__()
        self.save_hyperparameters(ignore=["student", "teacher"])
        self.hparams["model_config"] = student.config.to_dict()  # what resume_checkpoint compares, and load_model_payload reads
        self.model = student
        object.__setattr__(self, "teacher", teacher.requires_grad_(False).eval())  # not a submodule: nothing of it is saved or optimised
        self.val_metrics = torch.nn.ModuleDict({k: MeanMetric() for k in ("loss", "kd", "nll")})
        self.on_policy_batches = 0

    def on_fit_start(self) -> None:
        self.teacher.to(self.device)

    def on_validation_start(self) -> None:
        self.teacher.to(self.device)

    def is_on_policy(self, batch: dict) -> bool:
        """Whether this batch's answers are the student's own: probability lmbda, from (seed, step, the first row) alone."""
        lmbda = float(self.hparams.section["lmbda"])
        if lmbda <= 0:
            return False
        seed = (self.hparams.seed * 1_000_003 + self.global_step * 104_729 + int(batch["index"][0]) * 7919) % (2**63)
        return float(torch.rand((), generator=torch.Generator().manual_seed(seed))) < lmbda

    @torch.no_grad()
    def with_student_answers(self, batch: dict) -> dict:
        """The batch with its answers replaced by the student's samples to its prompts (EOS-truncated)."""
        s, P = self.hparams.section, int(batch["prompt_len"])
        prompt, prompt_mask = batch["input_ids"][:, :P], batch["attention_mask"][:, :P]
        rank = self.trainer.global_rank if self._trainer is not None else 0
        seed = (self.hparams.seed * 15_485_863 + rank * 7919 + self.global_step * 104_729 + int(batch["index"][0])) % (2**63)
        gen = generate(
            self.model, prompt, prompt_mask, max_new_tokens=int(s["max_new_tokens"]), temperature=float(s["sampling_temperature"]),
            eos_id=self.hparams.eos_id, pad_id=self.hparams.pad_id, generator=torch.Generator(device=self.device).manual_seed(seed),
        )
        response, mask = truncate_after_eos(gen.tokens, gen.mask, self.hparams.eos_id, self.hparams.pad_id)
        return {**batch, "input_ids": torch.cat([prompt, response], 1), "attention_mask": torch.cat([prompt_mask, mask.to(prompt_mask.dtype)], 1)}

    def step(self, batch: dict) -> dict[str, torch.Tensor]:
        """The loss and its parts on a batch: the divergence over the answer tokens, plus nll_weight x the student's next-token loss there."""
        s, P = self.hparams.section, int(batch["prompt_len"])
        ids, mask = batch["input_ids"], batch["attention_mask"]
        inputs, input_mask = ids[:, :-1], mask[:, :-1]  # the last answer token predicts nothing
        answer, answer_mask = ids[:, P:], mask[:, P:]  # (B, N): column P - 1 + t predicts answer token t
        student = self.model.lm_head(self.model.hidden_states(inputs, attention_mask=input_mask)[:, P - 1 :])  # (B, N, V)
        with torch.no_grad():
            teacher = self.teacher.lm_head(self.teacher.hidden_states(inputs, attention_mask=input_mask)[:, P - 1 :])
        kd = distill_loss(student, teacher, answer_mask, float(s["beta"]), float(s["temperature"]))
        nll = next_token_loss(student, answer.masked_fill(answer_mask == 0, IGNORE))
        weight = float(s["nll_weight"])
        loss = kd + weight * nll if weight else kd
        return {"loss": loss, "kd": kd.detach(), "nll": nll.detach(), "tokens": answer_mask.sum()}

    def training_step(self, batch, batch_idx):
        on_policy = self.is_on_policy(batch)
        if on_policy:
            batch = self.with_student_answers(batch)
            self.on_policy_batches += 1
        out = self.step(batch)
        self.log("train/loss", out["loss"], prog_bar=True)
        self.log_dict({"train/kd": out["kd"], "train/nll": out["nll"], "train/on_policy": float(on_policy), "train/answer_tokens": out["tokens"].float() / batch["input_ids"].size(0)})
        return out["loss"]

    def validation_step(self, batch, batch_idx):
        out = self.step(batch)
        for name in ("loss", "kd", "nll"):
            self.val_metrics[name].update(out[name].detach(), weight=out["tokens"])  # a mean over answer tokens, whatever the batch widths

    def on_validation_epoch_end(self):
        figures = {}
        for name, metric in self.val_metrics.items():
            if metric.update_called:
                figures[f"val/{name}"] = metric.compute()
            metric.reset()
        self.log("val/loss", figures["val/loss"], prog_bar=True)
        self.log_dict({k: v for k, v in figures.items() if k != "val/loss"})

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["distill_state"] = {"on_policy_batches": self.on_policy_batches}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.on_policy_batches = int(checkpoint.get("distill_state", {}).get("on_policy_batches", 0))

    def configure_optimizers(self):
        return adamw_with_schedule(self.model, OmegaConf.create(self.hparams.optim), schedule_steps(self, self.hparams.max_steps))


def check_pair(student: GPT, teacher: GPT, student_name: str, teacher_name: str) -> None:
    """The student reads and predicts the teacher's tokens: the same vocabulary rows (the caller checks the tokenizers)."""
    if student.config.vocab_size != teacher.config.vocab_size:
        raise UserError(
            f"the student {student_name} has vocab_size={student.config.vocab_size} and the teacher {teacher_name} vocab_size={teacher.config.vocab_size}: "
            f"a student learns the teacher's next-token distributions, so both must have the same vocabulary"
        )


def train_student(cfg: DictConfig, section, run_dir: Path, student: GPT, teacher: GPT, tokenizer, prompts: Prompts, parents: Sequence[Path], stage: str) -> tuple[pl.Trainer, dict]:
    """Distil `teacher` into `student` on `prompts` (module docstring); resumes this run's last checkpoint. (trainer, figures)."""
    s = settings(section)
    check_pair(student, teacher, "student", "teacher")
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    student.train()
    module = DistillModule(student, teacher, s, OmegaConf.to_container(cfg.optim, resolve=True), int(cfg.trainer.max_steps), eos, pad, int(cfg.seed))
    longest = max(len(p) for p in prompts.train) + int(s["max_new_tokens"])
    throughput = Throughput(student.flops_per_token(longest))
    trainer, checkpoint = build_trainer(cfg, run_dir, monitor="val/loss", mode="min", callbacks=[throughput, ExactResume()], parents=list(parents))
    answers, answer_s = teacher_answers(
        run_dir / TEACHER_ANSWERS, teacher, {"train": prompts.train, "validation": prompts.held_out}, s, eos, pad, int(cfg.seed),
        trainer.strategy.root_device, trainer.precision_plugin.forward_context, str(trainer.precision),
    )
    rows = {split: [{"prompt": p, "answer": a, "index": i} for i, (p, a) in enumerate(zip(ids, answers[split]))] for split, ids in (("train", prompts.train), ("validation", prompts.held_out))}
    log.info(
        "%s: distilling %s (%d parameters) into a student of %d parameters on %d prompts of %s; lmbda %s, beta %s, temperature %s, nll_weight %s",
        stage, "the teacher", teacher.num_params(), student.num_params(), len(prompts.train), prompts.source, s["lmbda"], s["beta"], s["temperature"], s["nll_weight"],
    )
    datamodule = Batches(rows["train"], rows["validation"], int(s["batch_size"]), DistillCollator(pad), int(cfg.data.get("num_workers", 0)), seed=int(cfg.seed))
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_checkpoint(cfg, run_dir, module.hparams.model_config), weights_only=True)

    load_best(module, checkpoint)  # the student now holds the best weights by val/loss
    trainer.limit_val_batches = 1.0  # the final figures cover every held-out prompt
    final = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    student.eval()
    if not trainer.is_global_zero:
        return trainer, {}
    figures = {
        "val/loss": final["val/loss"],
        "val/kd": final["val/kd"],
        "val/nll": final["val/nll"],
        "train/steps": trainer.global_step,
        "train/prompts": len(prompts.train),
        "train/on_policy_batches": module.on_policy_batches,
        "time/teacher_answers_s": answer_s,
        **throughput.figures(trainer),
    }
    return trainer, figures


def held_out_figures(cfg: DictConfig, student: GPT, teacher: GPT, tokenizer, gold: list | None, kl_prompts: list[list[int]], when: str) -> dict:
    """kl/<when>: the student's KL to the teacher in nats per answer, on its own samples to `kl_prompts` (temperature 1, each
    position's exact KL: evaluate.sampled_kl(exact=True)); gold/<when> and rows/<when>: the gold judge's score of its greedy
    answers to `gold` (TRL prompts; none where no judge applies). Answers are at most eval.max_new_tokens long."""
    max_new, batch = int(cfg.eval.max_new_tokens), int(cfg.eval.batch_size)
    kl = sampled_kl(
        student, teacher, kl_prompts, max_new_tokens=max_new, temperature=1.0, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
        seed=int(cfg.seed) * 1_000_003 + 12_345, batch_size=batch, exact=True,
    )
    figures: dict = {f"kl/{when}": float(kl.mean())}
    if gold:
        figures[f"gold/{when}"], figures[f"rows/{when}"] = gold_eval(student, tokenizer, gold, max_new, batch)
    return figures
