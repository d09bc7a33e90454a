"""Stage 5 (beside PPO), Direct Preference Optimisation: the SFT policy trained on preference pairs, no reward model.

    python -m pipeline stage=dpo                                  # embedded pairs, newest SFT run
    python -m pipeline stage=dpo data.path=prefs.jsonl init_from=outputs/sft/default
    python -m pipeline stage=dpo dpo.loss_type=ipo dpo.beta=0.5   # IPO; dpo.label_smoothing=0.1: cDPO
    python -m pipeline stage=dpo dpo.reference=online             # reference log-probs in every step

Takes TRL's preference formats: explicit prompt (`prompt`, `chosen`, `rejected`) or implicit prompt
(`chosen`, `rejected` holding the whole exchange), standard or conversational. The loss
(pipeline/losses/dpo.py) compares the policy's log-probabilities of the chosen and rejected answers
with those of the frozen starting model, the reference. With `dpo.reference=precompute` (default)
the reference scores every train and validation pair once before training, into the run directory
(`reference_logps.pt`, reused on resume), and leaves the device; `online` keeps it beside the policy.
A prompt's answers (K-wise: several pairs per prompt) are read after a single copy of the prompt.
Logged as TRL logs them: rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins,
logps/chosen, logps/rejected (train/ and val/), and at the end the gold score and the KL to the reference.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import random
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric

from pipeline import runs
from pipeline.data import load_stage_data, validate_splits
from pipeline.data.chat import encode_pairs, prompt_ids
from pipeline.data.collators import PairCollator
from pipeline.data.corpus import embedded_task
from pipeline.data.samplers import column_values, row_lengths
from pipeline.evaluate import gold_eval, gold_prompts, sampled_kl
from pipeline.files import atomic_write_bytes, load_tensors, read_json, write_json
from pipeline.losses.dpo import chosen_nll, dpo_loss
from pipeline.model import GPT, GPTConfig, sequence_logprobs
from pipeline.stages import STAGES
from pipeline.training import Batches, ExactResume, Throughput, adamw_with_schedule, apply_peft, build_trainer, lora_settings, finish, is_global_zero, load_best, log_table, memory_levers, resume_checkpoint, schedule_steps

log = logging.getLogger(__name__)

REFERENCE_FILE = "reference_logps.pt"
PAIR_FIGURES = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected")


class DPOCollator(PairCollator):
    """PairCollator's batch plus each pair's cached reference log-probs (`ref_chosen`, `ref_rejected` (B,)) where the rows carry them."""

    def __call__(self, rows: list[dict]) -> dict:
        batch = super().__call__(rows)
        if rows and "ref_chosen" in rows[0]:
            batch["ref_chosen"] = torch.tensor([r["ref_chosen"] for r in rows], dtype=torch.float32)
            batch["ref_rejected"] = torch.tensor([r["ref_rejected"] for r in rows], dtype=torch.float32)
        return batch


def pair_logprobs(model: GPT, batch: dict) -> dict[str, torch.Tensor]:
    """Summed answer log-probs of each pair's chosen and rejected (B,), their token counts (B,), from one forward."""
    _, sums = sequence_logprobs(model, batch)
    tokens = torch.bincount(batch["target_seq"], minlength=sums.numel())  # scored tokens per distinct sequence
    c, r = batch["chosen_index"], batch["rejected_index"]
    # index_select, not sums[c]: an answer in several pairs repeats in c, and the backward of indexing with repeats
    # accumulates in a thread-dependent order on CPU (runs would differ in the last bits and not resume exactly).
    pick = lambda values, at: values.index_select(0, at)  # noqa: E731
    return {"chosen": pick(sums, c), "rejected": pick(sums, r), "chosen_tokens": pick(tokens, c), "rejected_tokens": pick(tokens, r)}


class DPOModule(pl.LightningModule):
    """The policy (trained) and, with dpo.reference=online, the frozen reference; the DPO loss on pairs of answers.

    Dropout is off in both (as TRL's DPOConfig.disable_dropout does by default): the implicit reward is a
    difference of the policy's and the reference's log-probs of the same tokens, and dropout would add
    noise to one side of it and make the precomputed and online references disagree.
    """

    def __init__(self, model_config: dict, optim: dict, max_steps: int, dpo: dict, compile: bool = False, model_kind: str = "lm", shared_reference: bool = False):
        super().__init__()
        self.save_hyperparameters()
        config = GPTConfig.from_dict({**model_config, "dropout": 0.0})
        self.model = GPT(config)
        self.reference = None
        # shared_reference (LoRA): the reference is the policy with its adapters off, not a second copy
        if dpo["reference"] == "online" and not shared_reference:
            self.reference = GPT(config).requires_grad_(False).eval()
        self.val_metrics = torch.nn.ModuleDict({k.replace("/", "_"): MeanMetric() for k in ("loss", *PAIR_FIGURES)})

    def configure_model(self) -> None:
        if self.hparams.compile and not getattr(self, "_compiled", False):
            self.model.compile()
            self._compiled = True

    def step(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The batch loss and the per-pair figures TRL logs."""
        cfg = self.hparams.dpo
        policy = pair_logprobs(self.model, batch)
        if "ref_chosen" in batch:
            ref_chosen, ref_rejected = batch["ref_chosen"], batch["ref_rejected"]
        elif self.reference is not None:
            with torch.no_grad():
                ref = pair_logprobs(self.reference, batch)
            ref_chosen, ref_rejected = ref["chosen"], ref["rejected"]
        elif self.hparams.shared_reference:
            from pipeline.model.lora import adapters_disabled

            with torch.no_grad(), adapters_disabled(self.model):
                ref = pair_logprobs(self.model, batch)
            ref_chosen, ref_rejected = ref["chosen"], ref["rejected"]
        else:
            raise RuntimeError("dpo.reference=precompute, but the batch carries no ref_chosen / ref_rejected columns")
        losses, chosen_rewards, rejected_rewards = dpo_loss(
            policy["chosen"], policy["rejected"], ref_chosen, ref_rejected, cfg["beta"], cfg["loss_type"], cfg["label_smoothing"],
            chosen_tokens=policy["chosen_tokens"], rejected_tokens=policy["rejected_tokens"],
        )
        loss = losses.mean()
        if cfg["sft_coef"]:
            loss = loss + cfg["sft_coef"] * chosen_nll(policy["chosen"], policy["chosen_tokens"])
        figures = {
            "rewards/chosen": chosen_rewards,
            "rewards/rejected": rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
            "rewards/margins": chosen_rewards - rejected_rewards,
            "logps/chosen": policy["chosen"].detach(),
            "logps/rejected": policy["rejected"].detach(),
        }
        return loss, figures

    def training_step(self, batch, batch_idx):
        loss, figures = self.step(batch)
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({f"train/{k}": v.mean() for k, v in figures.items()})
        return loss

    def validation_step(self, batch, batch_idx):
        loss, figures = self.step(batch)
        pairs = batch["chosen_index"].numel()
        self.val_metrics["loss"].update(loss, weight=pairs)  # a mean over pairs, whatever the batch widths
        for name, values in figures.items():
            self.val_metrics[name.replace("/", "_")].update(values)

    def on_validation_epoch_end(self):
        out = {}
        for name, metric in self.val_metrics.items():
            if metric.update_called:
                out[f"val/{name.replace('_', '/')}"] = metric.compute()
            metric.reset()
        shown = {k: v for k, v in out.items() if k in ("val/loss", "val/rewards/accuracies")}
        self.log_dict(shown, prog_bar=True)
        self.log_dict({k: v for k, v in out.items() if k not in shown})

    def configure_optimizers(self):
        return adamw_with_schedule(self.model, OmegaConf.create(self.hparams.optim), schedule_steps(self, self.hparams.max_steps))


# ---------------------------------------------------------------------------------------------
# Reference log-probabilities, computed once


@contextmanager
def frozen_base(model: GPT, start: GPT | None):
    """The reference model for a block: `start` (full finetuning), or with LoRA the policy itself with its adapters off."""
    if start is not None:
        yield start
        return
    from pipeline.model.lora import adapters_disabled

    with adapters_disabled(model):
        yield model


def pairs_digest(pairs: dict, start_digest: str) -> str:
    """What the cached reference log-probs depend on: the starting model's bytes and every pair's token ids, in order."""
    h = hashlib.sha256(start_digest.encode())
    for split in sorted(pairs):
        h.update(split.encode() + b"\0")
        table = pairs[split].select_columns(["chosen_ids", "rejected_ids", "prompt_len"]).with_format("arrow")[:]  # the selected rows, in order
        for name in ("chosen_ids", "rejected_ids"):
            column = table.column(name).combine_chunks()
            h.update(column.offsets.to_numpy(zero_copy_only=False).tobytes())
            h.update(column.values.to_numpy(zero_copy_only=False).tobytes())
        h.update(table.column("prompt_len").to_numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def reference_logps(reference: GPT, dataset, collate, batch_size: int, device, context=nullcontext) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's summed answer log-probs of every pair's chosen and rejected (len(dataset),) each, in dataset order.

    Batches in dataset order keep a prompt's pairs (adjacent in the data) together, so each prompt is read once.
    `context` is the precision context of the training forwards (autocast under bf16-mixed), so the cached
    figures are those an online reference would compute.
    """
    was_training = reference.training
    reference.eval()
    chosen, rejected = [], []
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate)
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        with context():
            figures = pair_logprobs(reference, batch)
        chosen.append(figures["chosen"].float().cpu())
        rejected.append(figures["rejected"].float().cpu())
    reference.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


def cached_reference(path: Path, key: str, reference: GPT, pairs: dict, collate, batch_size: int, device, context=nullcontext) -> dict:
    """{split: (chosen, rejected)} of the reference, from `path` when it was made for the same `key`, else computed and written there."""
    if path.is_file():
        saved = load_tensors(path)
        if saved.get("key") == key:
            log.info("dpo: reference log-probs of %s read from %s", ", ".join(f"{len(v['chosen'])} {s}" for s, v in saved["splits"].items()), path)
            return {s: (v["chosen"], v["rejected"]) for s, v in saved["splits"].items()}
        log.info("dpo: %s was made for other pairs or another reference: computing them again", path)
    started = time.time()
    reference.to(device)
    out = {split: reference_logps(reference, pairs[split], collate, batch_size, device, context) for split in pairs}
    reference.to("cpu")  # off the device for training: the policy alone trains there
    buffer = io.BytesIO()
    torch.save({"key": key, "splits": {s: {"chosen": c, "rejected": r} for s, (c, r) in out.items()}}, buffer)
    atomic_write_bytes(path, buffer.getvalue())
    log.info("dpo: reference log-probs of %s pairs in %.1f s, cached in %s", sum(len(c) for c, _ in out.values()), time.time() - started, path)
    return out


def with_reference(dataset, chosen: torch.Tensor, rejected: torch.Tensor):
    return dataset.add_column("ref_chosen", chosen.double().tolist()).add_column("ref_rejected", rejected.double().tolist())


# ---------------------------------------------------------------------------------------------
# The data


def sample_prompts(rows, n: int | None, seed: int, implicit_prompt: bool):
    """The rows of whole prompts, drawn at random until at least n pairs (all rows when n is null), in data order.

    Drawn before tokenising, so that only the pairs trained on are tokenised and scored by the reference.
    Rows of one prompt (K-wise pairs) are kept or dropped together; implicit-prompt rows are each their own.
    """
    if n is None or n >= len(rows):
        return rows
    keys = list(range(len(rows))) if implicit_prompt else [json.dumps(p, sort_keys=True) for p in rows["prompt"]]
    counts: dict = {}
    for k in keys:
        counts[k] = counts.get(k, 0) + 1
    prompts = list(counts)
    random.Random(seed).shuffle(prompts)
    taken, total = set(), 0
    for k in prompts:
        if total >= n:
            break
        taken.add(k)
        total += counts[k]
    return rows.select([i for i, k in enumerate(keys) if k in taken])


def kl_prompts(tokenizer, gold: list | None, validation, n: int) -> list[list[int]]:
    """Held-out prompts (token ids) for the final KL: the gold prompts, else the distinct prompts of the validation pairs."""
    if gold:
        return [prompt_ids(tokenizer, p) for p in gold]
    seen: dict[tuple, None] = {}
    for ids, start in zip(validation["chosen_ids"], validation["prompt_len"]):
        if len(seen) >= n:
            break
        seen.setdefault(tuple(ids[: max(1, start)]), None)
    return [list(p) for p in seen]


def run(cfg: DictConfig, run_dir: Path) -> dict:
    started = time.time()
    pl.seed_everything(cfg.seed, workers=True)
    start, tokenizer, payload, start_path = runs.load_start(cfg.init_from, STAGES["dpo"].starts_from, Path(cfg.paths.root), "dpo", run_name=run_dir.name, dropout=0.0)
    parents = runs.parent_record(init_from=start_path)
    runs.check_parents(run_dir, parents)
    ds, fmt, source = load_stage_data(cfg, "dpo", {"preference"}, lambda: embedded_task(Path(cfg.paths.cache_dir), "preference"))
    validate_splits(ds, fmt, source)
    max_len = start.config.block_size
    ds["train"] = sample_prompts(ds["train"], cfg.dpo.train_pairs, cfg.seed, fmt.implicit_prompt)
    pairs = {split: encode_pairs(ds[split], tokenizer, fmt, max_len, f"{source} [{split}]") for split in ("train", "validation")}
    dpo = OmegaConf.to_container(cfg.dpo, resolve=True)
    log.info("dpo: %s, %d train pairs, starting from %s, reference %s", source, len(pairs["train"]), start_path, dpo["reference"])

    module = DPOModule(
        model_config=start.config.to_dict(),
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        max_steps=cfg.trainer.max_steps,
        dpo=dpo,
        compile=bool(cfg.model.get("compile", False)),
        shared_reference=lora_settings(cfg) is not None,
    )
    module.model.load_state_dict(start.state_dict())
    if module.reference is not None:
        module.reference.load_state_dict(start.state_dict())
    peft_callbacks = apply_peft(cfg, module)  # peft=lora / qlora: adapters on the SFT policy; the reference is the adapters switched off
    memory_levers(cfg, module.model)  # the policy; the reference records no gradients
    if peft_callbacks:
        start = None  # no second copy: reference log-probs, the KL and the start's gold come from the base inside the policy
    ckpt = resume_checkpoint(cfg, run_dir, module.hparams.model_config)
    prompts = gold_prompts(cfg)
    metrics: dict = {"stage": "dpo", "data": source, "init_from": str(start_path), "parents": parents, "reference": dpo["reference"], "peft": cfg.peft.method}
    if prompts and is_global_zero() and not ckpt:
        metrics["gold/start"], start_rows = gold_eval(module.model, tokenizer, prompts, cfg.eval.max_new_tokens, cfg.eval.batch_size)
        write_json(run_dir / "gold_start.json", {"gold": metrics["gold/start"], "rows": start_rows})
        log.info("gold score of the starting model: %.4f", metrics["gold/start"])

    seq_len = max(len(s) for s in pairs["train"]["chosen_ids"][:256])
    throughput = Throughput(module.model.flops_per_token(seq_len))
    trainer, checkpoint = build_trainer(cfg, run_dir, monitor="val/loss", mode="min", callbacks=[throughput, ExactResume(), *peft_callbacks], parents=[start_path])
    collate = DPOCollator(tokenizer.pad_token_id, share_prompts=cfg.data.get("share_prompts", True), max_row=max_len)
    if dpo["reference"] == "precompute":
        key = pairs_digest(pairs, parents["init_from"]["sha256"] + trainer.precision_plugin.__class__.__name__ + str(trainer.precision))
        with frozen_base(module.model, start) as reference:
            cached = cached_reference(
                run_dir / REFERENCE_FILE, key, reference, pairs, collate, cfg.data.batch_size, trainer.strategy.root_device, trainer.precision_plugin.forward_context
            )
        pairs = {split: with_reference(pairs[split], *cached[split]) for split in pairs}
    lengths = None
    if cfg.data.get("group_by_length", False):
        lengths = row_lengths(pairs["train"], "chosen_ids", "rejected_ids")
    datamodule = Batches(
        pairs["train"], pairs["validation"], cfg.data.batch_size, collate, cfg.data.num_workers,
        lengths=lengths, groups=column_values(pairs["train"], "prompt_key"), seed=cfg.seed,  # a prompt's pairs share a batch: its prompt read once
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)

    load_best(module, checkpoint)
    trainer.limit_val_batches = 1.0  # the final figures cover every held-out pair, not the sample that steered checkpointing
    final = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    if not trainer.is_global_zero:
        return {}
    metrics.update({f"val/{k}": final[f"val/{k}"] for k in ("loss", *PAIR_FIGURES)})
    metrics.update({"train/steps": trainer.global_step, "train/pairs": len(pairs["train"])})
    device = module.device
    module.model.to(device)
    if module.reference is not None:
        reference = module.reference
    elif start is not None:
        reference = start.to(device)
    else:  # LoRA: a plain copy of the base, made now, after training
        from pipeline.model.lora import adapters_disabled, merge_lora

        with adapters_disabled(module.model):
            reference = merge_lora(module.model).eval()
    kl = sampled_kl(
        module.model, reference, kl_prompts(tokenizer, prompts, pairs["validation"], cfg.eval.num_prompts),
        max_new_tokens=cfg.eval.max_new_tokens, temperature=1.0, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
        seed=cfg.seed * 1_000_003 + 12_345, batch_size=cfg.eval.batch_size,
    )
    metrics["final/kl"] = float(kl.mean())
    if prompts:
        if "gold/start" not in metrics and (run_dir / "gold_start.json").is_file():
            metrics["gold/start"] = read_json(run_dir / "gold_start.json")["gold"]
        metrics["gold/final"], rows = gold_eval(module.model, tokenizer, prompts, cfg.eval.max_new_tokens, cfg.eval.batch_size)
        start_rows = read_json(run_dir / "gold_start.json")["rows"] if (run_dir / "gold_start.json").is_file() else [{}] * len(rows)
        log_table(
            trainer.logger,
            "samples/dpo",
            ["prompt", "start response", "start gold", "dpo response", "dpo gold"],
            [[r["prompt"], s.get("response", ""), s.get("gold", float("nan")), r["response"], r["gold"]] for r, s in zip(rows[:50], start_rows[:50])],
        )
        write_json(run_dir / "gold_final.json", {"gold": metrics["gold/final"], "rows": rows})
    metrics.update({"time/total_s": time.time() - started, **throughput.figures(trainer)})
    finish(run_dir, module.model, tokenizer, metrics, trainer, kind="lm", stage="dpo", base=start_path)
    return metrics
