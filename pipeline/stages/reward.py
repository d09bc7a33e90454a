"""Stage 3, the reward model: the SFT backbone with a scalar head, trained on preference pairs.

    python -m pipeline stage=reward                               # embedded pairs, newest SFT run
    python -m pipeline stage=reward data.path=prefs.jsonl init_from=outputs/sft/default

Takes TRL's preference formats: explicit prompt (`prompt`, `chosen`, `rejected`) or implicit prompt
(`chosen`, `rejected` holding the whole exchange), standard or conversational. The loss is
Bradley-Terry, -log sigmoid(r_chosen - r_rejected - margin), plus an optional centring term
coef * (r_chosen + r_rejected)^2; the score is read at the last real token. After training the
scores are normalised so that reference responses score mean 0; the mean and standard deviation
travel with the model (model.pt `extra`) for PPO.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric

from pipeline import runs
from pipeline.data import datasets_cache, load_data, load_stage_data, validate_splits
from pipeline.data.chat import encode_ids, encode_pairs, prompt_text, render
from pipeline.data.collators import PairCollator
from pipeline.data.corpus import embedded_task
from pipeline.data.samplers import column_values, row_lengths
from pipeline.evaluate import complete
from pipeline.files import atomic_write_bytes
from pipeline.losses.pairwise import pairwise_loss
from pipeline.model import GPT, GPTConfig, ScalarGPT, last_token_index, left_pad
from pipeline.stages import STAGES
from pipeline.tasks import default_task
from pipeline.training import Batches, ExactResume, Throughput, adamw_with_schedule, apply_peft, build_trainer, finish, load_best, memory_levers, resume_checkpoint, schedule_steps

log = logging.getLogger(__name__)


class RewardModule(pl.LightningModule):
    def __init__(self, model_config: dict, optim: dict, max_steps: int, center_coef: float = 0.0, use_margin: bool = True, model_kind: str = "scalar", compile: bool = False):
        super().__init__()
        self.save_hyperparameters()
        self.model = ScalarGPT(GPTConfig.from_dict(model_config))
        self.val_metrics = torch.nn.ModuleDict({k: MeanMetric() for k in ("loss", "accuracy", "chosen_reward", "rejected_reward", "margin", "accuracy_gold")})

    def configure_model(self) -> None:
        # In-place compile keeps parameter names, so checkpoints load with or without it. The RM never samples (no KV cache).
        if self.hparams.compile and not getattr(self, "_compiled", False):
            self.model.compile()
            self._compiled = True

    def scores(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Reward of chosen (B,) and rejected (B,) at each sequence's last real token."""
        if "packed_mask" in batch:  # answers packed after their shared prompt
            values = self.model(batch["input_ids"], packed=(batch["positions"], batch["packed_mask"]))
            rewards = values.flatten()[batch["score_index"]].float()
        else:
            values = self.model(batch["input_ids"])  # (N, T); right padding: causal attention needs no mask
            last = last_token_index(batch["attention_mask"])
            rewards = values.gather(1, last[:, None]).squeeze(1).float()
        return rewards[batch["chosen_index"]], rewards[batch["rejected_index"]]

    def training_step(self, batch, batch_idx):
        chosen, rejected = self.scores(batch)
        loss = pairwise_loss(chosen, rejected, batch["margin"] if self.hparams.use_margin else None, self.hparams.center_coef)
        self.log_dict({"train/loss": loss, "train/accuracy": (chosen > rejected).float().mean()}, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        chosen, rejected = self.scores(batch)
        m = self.val_metrics
        m["loss"].update(pairwise_loss(chosen, rejected, batch["margin"] if self.hparams.use_margin else None, self.hparams.center_coef))
        m["accuracy"].update((chosen > rejected).float())
        m["chosen_reward"].update(chosen)
        m["rejected_reward"].update(rejected)
        m["margin"].update(chosen - rejected)
        gold = batch["gold_sign"]
        known = gold != 0
        if known.any():
            # Agreement with the noise-free judge: the RM ranks the gold-better response higher.
            m["accuracy_gold"].update(((chosen - rejected) * gold > 0).float()[known])

    def on_validation_epoch_end(self):
        out = {}
        for name, metric in self.val_metrics.items():
            if metric.update_called:
                out[f"val/{name}"] = metric.compute()
            metric.reset()
        self.log_dict(out, prog_bar=True)

    def configure_optimizers(self):
        return adamw_with_schedule(self.model, OmegaConf.create(self.hparams.optim), schedule_steps(self, self.hparams.max_steps))


@torch.no_grad()
def score_sequences(model: ScalarGPT, sequences: list[list[int]], pad_id: int, batch_size: int = 64) -> torch.Tensor:
    """Raw reward of each full sequence at its last real token (sequences padded on the left)."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(sequences), batch_size):
        ids, mask = left_pad(sequences[start : start + batch_size], pad_id, device)
        out.append(model(ids, attention_mask=mask)[:, -1].float().cpu())
    return torch.cat(out)


def reference_sequences(cfg: DictConfig, tokenizer, pairs_val, fmt, max_len: int) -> tuple[list[list[int]], str]:
    """Sequences whose mean score becomes the RM's zero: reference answers of the embedded task, else chosen responses."""
    if not cfg.data.path:
        sft_val = load_data(str(embedded_task(Path(cfg.paths.cache_dir), "sft")), cache_dir=datasets_cache(cfg))["validation"]
        seqs = [encode_ids(tokenizer, render(tokenizer, row["messages"]))[:max_len] for row in sft_val]
        return seqs, "embedded task reference answers (sft validation)"
    return [list(s) for s in pairs_val["chosen_ids"]], "chosen responses of the validation split"


def policy_pairs(cfg: DictConfig, model, tokenizer, split: str, n: int, path: Path) -> list[dict]:
    """Two samples of the starting (SFT) policy for each of n embedded-task prompts, labelled by the simulated annotator.

    These are the comparisons InstructGPT's labellers made: between the policy's own answers, so the
    reward model learns the distinctions that PPO's rollouts will present to it. Kept in the run
    directory, so a resumed run trains on the same pairs.
    """
    if path.is_file():
        return [json.loads(line) for line in path.read_text().splitlines()]
    prompts_path = embedded_task(Path(cfg.paths.cache_dir), "prompts")
    prompts = load_data(str(prompts_path), cache_dir=datasets_cache(cfg))[split]["prompt"][:n]
    generator = torch.Generator().manual_seed(cfg.seed * 7919 + len(split))
    answers = complete(
        model, tokenizer, prompts + prompts, max_new_tokens=cfg.reward.policy_max_new_tokens,
        temperature=cfg.reward.policy_temperature, batch_size=256, generator=generator,
    )
    texts = [prompt_text(p) for p in prompts]
    rows = default_task().labelled_pairs(texts, answers[: len(prompts)], answers[len(prompts) :], seed=cfg.seed)
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in rows).encode())
    log.info("reward: %d %s pairs of the starting policy's samples (of %d prompts; ties dropped)", len(rows), split, len(prompts))
    return rows


def run(cfg: DictConfig, run_dir: Path) -> dict:
    started = time.time()
    pl.seed_everything(cfg.seed, workers=True)
    base, tokenizer, payload, start_path = runs.load_start(cfg.init_from, STAGES["reward"].starts_from, Path(cfg.paths.root), "reward", cls=ScalarGPT, run_name=run_dir.name, dropout=cfg.model.dropout)
    parents = runs.parent_record(init_from=start_path)
    runs.check_parents(run_dir, parents)
    ds, fmt, source = load_stage_data(cfg, "reward", {"preference"}, lambda: embedded_task(Path(cfg.paths.cache_dir), "preference"))
    validate_splits(ds, fmt, source)
    max_len = base.config.block_size
    pairs = {split: encode_pairs(ds[split], tokenizer, fmt, max_len, f"{source} [{split}]") for split in ds}
    policy_test = None
    if not cfg.data.path and (cfg.reward.policy_pairs or cfg.reward.policy_pairs_test):
        import datasets

        def encoded(rows, name):
            return encode_pairs(datasets.Dataset.from_list(rows), tokenizer, fmt, max_len, name).cast(pairs["train"].features)

        policy_lm = runs.build_model(payload, GPT, start_path)  # the starting model as a language model, to sample from
        if cfg.reward.policy_pairs:
            train_rows = policy_pairs(cfg, policy_lm, tokenizer, "train", int(cfg.reward.policy_pairs), run_dir / "policy_pairs_train.jsonl")
            pairs["train"] = datasets.concatenate_datasets([pairs["train"], encoded(train_rows, "policy pairs [train]")]).shuffle(seed=cfg.seed)
        if cfg.reward.policy_pairs_test:
            test_rows = policy_pairs(cfg, policy_lm, tokenizer, "test", int(cfg.reward.policy_pairs_test), run_dir / "policy_pairs_test.jsonl")
            policy_test = encoded(test_rows, "policy pairs [test]") if test_rows else None
    log.info("reward: %s, %d train pairs, starting from %s", source, len(pairs["train"]), start_path)

    module = RewardModule(
        model_config=base.config.to_dict(),
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        max_steps=cfg.trainer.max_steps,
        center_coef=cfg.reward.center_coef,
        use_margin=cfg.reward.use_margin,
        compile=bool(cfg.model.get("compile", False)),
    )
    module.model.load_state_dict(base.state_dict())
    peft_callbacks = apply_peft(cfg, module)  # peft=lora / qlora: adapters on the SFT base, the score head trained in full
    memory_levers(cfg, module.model)
    seq_len = max(len(s) for s in pairs["train"]["chosen_ids"][:256])
    throughput = Throughput(module.model.flops_per_token(seq_len))
    trainer, checkpoint = build_trainer(cfg, run_dir, monitor="val/accuracy", mode="max", callbacks=[throughput, ExactResume(), *peft_callbacks], parents=[start_path])
    lengths = None
    if cfg.data.get("group_by_length", False):
        lengths = row_lengths(pairs["train"], "chosen_ids", "rejected_ids")
    collate = PairCollator(tokenizer.pad_token_id, share_prompts=cfg.data.get("share_prompts", False), max_row=max_len)
    datamodule = Batches(
        pairs["train"], pairs["validation"], cfg.data.batch_size, collate, cfg.data.num_workers,
        lengths=lengths, groups=column_values(pairs["train"], "prompt_key"), seed=cfg.seed,  # a prompt's pairs share a batch: each answer scored once
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_checkpoint(cfg, run_dir, module.hparams.model_config), weights_only=True)

    load_best(module, checkpoint)
    trainer.limit_val_batches = 1.0  # the final figures cover every held-out pair, not the sample that steered checkpointing
    final = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    held_out = "test" if "test" in pairs else "validation"
    test = trainer.validate(module, dataloaders=DataLoader(pairs[held_out], batch_size=cfg.data.batch_size, collate_fn=collate), verbose=False)[0]
    policy = None
    if policy_test is not None:
        loader = DataLoader(policy_test, batch_size=cfg.data.batch_size, collate_fn=collate)
        policy = trainer.validate(module, dataloaders=loader, verbose=False)[0]
    if not trainer.is_global_zero:
        return {}
    module.model.to(module.device)
    refs, ref_name = reference_sequences(cfg, tokenizer, pairs["validation"], fmt, max_len)
    ref_scores = score_sequences(module.model, refs, tokenizer.pad_token_id)
    normaliser = {"reward_mean": float(ref_scores.mean()), "reward_std": float(ref_scores.std().clamp_min(1e-6)), "reference": ref_name}
    metrics = {
        "stage": "reward",
        "data": source,
        "init_from": str(start_path),
        "parents": parents,
        "peft": cfg.peft.method,
        "val/accuracy": final["val/accuracy"],
        f"{held_out}/accuracy": test["val/accuracy"],
        f"{held_out}/chosen_reward": test["val/chosen_reward"],
        f"{held_out}/rejected_reward": test["val/rejected_reward"],
        f"{held_out}/margin": test["val/margin"],
        "train/steps": trainer.global_step,
        "train/pairs": len(pairs["train"]),
        **{f"normalise/{k}": v for k, v in normaliser.items() if k != "reference"},
        "time/total_s": time.time() - started,
        **throughput.figures(trainer),
    }
    if "val/accuracy_gold" in test:
        metrics[f"{held_out}/accuracy_gold"] = test["val/accuracy_gold"]
    if policy is not None:  # pairs of the SFT policy's own samples to held-out prompts: what PPO will ask of the RM
        metrics.update({"policy_test/accuracy": policy["val/accuracy"], "policy_test/accuracy_gold": policy["val/accuracy_gold"], "policy_test/pairs": len(policy_test)})
    finish(run_dir, module.model, tokenizer, metrics, trainer, kind="scalar", stage="reward", extra=normaliser, base=start_path)
    return metrics
