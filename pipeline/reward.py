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

import hashlib
import json
import logging
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from torchmetrics import MeanMetric

from pipeline import data as data_lib
from pipeline import runs
from pipeline.errors import UserError
from pipeline.evaluate import complete, left_pad, prompt_ids, prompt_text
from pipeline.model import GPT, GPTConfig, ScalarGPT, last_token_index
from pipeline.sft import encode_ids, render
from pipeline.training import Batches, Throughput, adamw_with_schedule, build_trainer, datasets_cache, finish, resume_checkpoint

log = logging.getLogger(__name__)


def sequence_ids(tokenizer, prompt, response, conversational: bool) -> list[int]:
    """Ids of prompt + response as the policy would produce them, ending with EOS."""
    if conversational:
        return encode_ids(tokenizer, render(tokenizer, list(prompt or []) + list(response)))
    return [tokenizer.bos_token_id] + encode_ids(tokenizer, (prompt or "") + response) + [tokenizer.eos_token_id]


def _prompt_key(prompt_json: str) -> int:
    """A stable 63-bit key of a prompt (its JSON), so the sampler can keep a prompt's pairs together."""
    return int.from_bytes(hashlib.blake2b(prompt_json.encode("utf-8"), digest_size=8).digest(), "big") >> 1


def encode_pairs(ds, tokenizer, fmt: data_lib.DataFormat, max_len: int, source: str):
    """Tokenise chosen and rejected sequences; keep a margin and the gold ordering where the data has them."""
    has_margin = "margin" in ds.column_names
    has_gold = {"chosen_gold", "rejected_gold"} <= set(ds.column_names)
    memo: dict[tuple, list[int]] = {}  # K-wise rows repeat each prompt and answer: render and tokenise each once

    def once(key: tuple, make) -> list[int]:
        if key not in memo:
            if len(memo) >= 200_000:  # bounded memory on large datasets
                memo.clear()
            memo[key] = make()
        return memo[key]

    def encode(row, index):
        prompt = row["prompt"] if not fmt.implicit_prompt else None
        head = json.dumps(prompt, sort_keys=True, ensure_ascii=False)
        chosen = once((head, json.dumps(row["chosen"])), lambda: sequence_ids(tokenizer, prompt, row["chosen"], fmt.conversational))
        rejected = once((head, json.dumps(row["rejected"])), lambda: sequence_ids(tokenizer, prompt, row["rejected"], fmt.conversational))
        if prompt is not None:
            prompt_len = len(once((head,), lambda: prompt_ids(tokenizer, prompt)))
            if prompt_len >= max_len:
                raise UserError(f"{source}: row {index} has a prompt of {prompt_len} tokens, longer than the model's context of {max_len}")
        gold = 0.0
        if has_gold:
            gold = float((row["chosen_gold"] > row["rejected_gold"]) - (row["chosen_gold"] < row["rejected_gold"]))
        return {
            "prompt_key": _prompt_key(head) if prompt is not None else -1 - index,  # rows of one prompt share it
            "chosen_ids": chosen[:max_len],
            "rejected_ids": rejected[:max_len],
            "margin": float(row["margin"]) if has_margin else 0.0,
            "gold_sign": gold,  # +1 the label agrees with the noise-free judge, -1 it disagrees, 0 a tie / unknown
        }

    return ds.map(encode, with_indices=True, remove_columns=ds.column_names, desc="tokenising pairs")


class PairCollator:
    """The distinct sequences of a batch of pairs, and where each pair's two sit.

    A response that appears in several pairs of the batch (InstructGPT's K-wise comparisons: every
    two of K answers to a prompt) is scored once; `chosen_index` and `rejected_index` (B,) pick
    each pair's sequences, so one forward scores every comparison.

    With share_prompts, the sequences of one prompt (same `prompt_key`; each row's own two where it
    has none) are packed in one row: their common prefix once, then each answer, which sees the
    prefix and itself only, at the positions it would have alone. The batch then carries
    `positions` and `packed_mask` for the model and `score_index`, each sequence's last token in
    the flattened rows; the scores equal those of separate rows. A batch where nothing is shared
    keeps the plain layout: sequences right-padded to (N, T).
    """

    def __init__(self, pad_id: int, share_prompts: bool = False, max_row: int = 1024):
        self.pad_id = pad_id
        self.share_prompts = share_prompts
        self.max_row = max_row  # a longer packed row is split (each part repeats the prefix)

    def __call__(self, rows: list[dict]) -> dict:
        slots: dict[tuple, int] = {}
        groups: list = []

        def slot(ids, group) -> int:
            key = tuple(ids)
            if key not in slots:
                slots[key] = len(slots)
                groups.append(group)
            return slots[key]

        keys = [r.get("prompt_key", -1 - i) for i, r in enumerate(rows)]
        chosen = [slot(r["chosen_ids"], k) for r, k in zip(rows, keys)]
        rejected = [slot(r["rejected_ids"], k) for r, k in zip(rows, keys)]
        seqs = list(slots)
        batch = {
            "chosen_index": torch.tensor(chosen, dtype=torch.long),
            "rejected_index": torch.tensor(rejected, dtype=torch.long),
            "margin": torch.tensor([r["margin"] for r in rows], dtype=torch.float32),
            "gold_sign": torch.tensor([r["gold_sign"] for r in rows], dtype=torch.float32),
        }
        layout = self._pack(seqs, groups) if self.share_prompts else None
        if layout is None:
            ids, mask = self._pad([[s] for s in seqs])
            return {"input_ids": ids, "attention_mask": mask, **batch}
        return {**self._packed(seqs, layout), **batch}

    def _pack(self, seqs: list[tuple], groups: list) -> list[list[tuple[int, int]]] | None:
        """Rows of units (shared prefix length, sequence indices); None when no two sequences share a prefix.

        A unit is one prompt's sequences: their common prefix once, then what follows it in each. Units
        are packed first-fit, longest first, into rows as wide as the longest unit (or max_row).
        """
        members: dict = {}
        for i, g in enumerate(groups):
            members.setdefault(g, []).append(i)
        units, shared = [], False
        for group in members.values():
            prefix = 0
            if len(group) > 1:
                first = seqs[group[0]]
                prefix = min(len(seqs[i]) for i in group) - 1  # every sequence keeps its last token, where it is scored
                for i in group[1:]:
                    prefix = next((k for k in range(prefix) if seqs[i][k] != first[k]), prefix)
            if prefix == 0:
                units += [(0, [i]) for i in group]
                continue
            shared = True
            part, used = [], prefix
            for i in group:  # a unit longer than max_row is split, each part repeating the prefix
                if part and used + len(seqs[i]) - prefix > self.max_row:
                    units.append((prefix, part))
                    part, used = [], prefix
                part.append(i)
                used += len(seqs[i]) - prefix
            units.append((prefix, part))
        if not shared:
            return None

        def size(unit) -> int:
            return unit[0] + sum(len(seqs[i]) - unit[0] for i in unit[1])

        width = max(size(u) for u in units)
        rows: list[list] = []
        free: list[int] = []
        for unit in sorted(units, key=size, reverse=True):
            r = next((r for r, room in enumerate(free) if room >= size(unit)), None)
            if r is None:
                rows.append([])
                free.append(width)
                r = len(rows) - 1
            rows[r].append(unit)
            free[r] -= size(unit)
        return rows

    def _pad(self, rows: list[list[tuple]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(sum(len(p) for p in row) for row in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            tokens = [t for piece in row for t in piece]
            ids[r, : len(tokens)] = torch.as_tensor(tokens)
            mask[r, : len(tokens)] = 1
        return ids, mask

    def _packed(self, seqs: list[tuple], rows: list[list[tuple[int, int]]]) -> dict:
        """Token ids, positions and the mask of packed rows: a piece sees itself (causally) and its prompt's prefix."""
        pieces, piece_rows, starts, parents, score_at = [], [], [], [], {}
        for r, row in enumerate(rows):
            line, offset = [], 0
            for prefix, members in row:
                parent = len(pieces) if prefix else -1
                if prefix:
                    line.append(len(pieces))
                    pieces.append(seqs[members[0]][:prefix])
                    starts.append(0)
                    parents.append(parent)
                    offset += prefix
                for i in members:
                    line.append(len(pieces))
                    pieces.append(seqs[i][prefix:])
                    starts.append(prefix)  # positions continue after the prefix, as in the sequence alone
                    parents.append(parent if prefix else len(pieces) - 1)
                    offset += len(seqs[i]) - prefix
                    score_at[i] = (r, offset - 1)
            piece_rows.append(line)
        ids, mask = self._pad([[pieces[p] for p in line] for line in piece_rows])
        width = ids.size(1)
        piece_id = torch.full((len(rows), width), -1, dtype=torch.long)  # -1: padding
        parent_id = torch.full((len(rows), width), -1, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        for r, line in enumerate(piece_rows):
            at = 0
            for p in line:
                n = len(pieces[p])
                piece_id[r, at : at + n] = p
                parent_id[r, at : at + n] = parents[p]
                positions[r, at : at + n] = torch.arange(starts[p], starts[p] + n)
                at += n
        order = torch.arange(width)
        causal = order[None, :] <= order[:, None]  # (T, T): key <= query
        keys, queries = piece_id[:, None, :], piece_id[:, :, None]
        visible = (keys == queries) | (keys == parent_id[:, :, None])  # its own piece, or the prefix it follows
        packed_mask = (causal & visible) | torch.eye(width, dtype=torch.bool)  # padding sees itself: no NaN rows
        index = torch.tensor([score_at[i][0] * width + score_at[i][1] for i in range(len(seqs))], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "positions": positions, "packed_mask": packed_mask[:, None], "score_index": index}


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: torch.Tensor | None = None, center_coef: float = 0.0) -> torch.Tensor:
    """Bradley-Terry negative log-likelihood of the preferred response, with optional margin and centring."""
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_coef:
        loss = loss + center_coef * ((chosen + rejected) ** 2).mean()
    return loss


class RewardModule(pl.LightningModule):
    def __init__(self, model_config: dict, optim: dict, max_steps: int, center_coef: float = 0.0, use_margin: bool = True, model_kind: str = "scalar"):
        super().__init__()
        self.save_hyperparameters()
        self.model = ScalarGPT(GPTConfig.from_dict(model_config))
        self.val_metrics = torch.nn.ModuleDict({k: MeanMetric() for k in ("loss", "accuracy", "chosen_reward", "rejected_reward", "margin", "accuracy_gold")})

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
        return adamw_with_schedule(self.model, OmegaConf.create(self.hparams.optim), self.hparams.max_steps)


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
        sft_val = data_lib.load_data(str(data_lib.embedded_task(Path(cfg.paths.cache_dir), "sft")), cache_dir=datasets_cache(cfg))["validation"]
        seqs = [encode_ids(tokenizer, render(tokenizer, row["messages"]))[:max_len] for row in sft_val]
        return seqs, "embedded task reference answers (sft validation)"
    return [list(s) for s in pairs_val["chosen_ids"]], "chosen responses of the validation split"


def policy_pairs(cfg: DictConfig, model, tokenizer, split: str, n: int, path: Path) -> list[dict]:
    """Two samples of the starting (SFT) policy for each of n embedded-task prompts, labelled by the simulated annotator.

    These are the comparisons InstructGPT's labellers made: between the policy's own answers, so the
    reward model learns the distinctions that PPO's rollouts will present to it. Kept in the run
    directory, so a resumed run trains on the same pairs.
    """
    from pipeline.task import labelled_pairs

    if path.is_file():
        return [json.loads(line) for line in path.read_text().splitlines()]
    prompts_path = data_lib.embedded_task(Path(cfg.paths.cache_dir), "prompts")
    prompts = data_lib.load_data(str(prompts_path), cache_dir=datasets_cache(cfg))[split]["prompt"][:n]
    generator = torch.Generator().manual_seed(cfg.seed * 7919 + len(split))
    answers = complete(
        model, tokenizer, prompts + prompts, max_new_tokens=cfg.reward.policy_max_new_tokens,
        temperature=cfg.reward.policy_temperature, batch_size=256, generator=generator,
    )
    texts = [prompt_text(p) for p in prompts]
    rows = labelled_pairs(texts, answers[: len(prompts)], answers[len(prompts) :], seed=cfg.seed)
    runs.atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in rows).encode())
    log.info("reward: %d %s pairs of the starting policy's samples (of %d prompts; ties dropped)", len(rows), split, len(prompts))
    return rows


def run(cfg: DictConfig, run_dir: Path) -> dict:
    started = time.time()
    pl.seed_everything(cfg.seed, workers=True)
    base, tokenizer, payload, start_path = runs.load_start(cfg.init_from, "reward", Path(cfg.paths.root), cls=ScalarGPT, dropout=cfg.model.dropout)
    source = str(cfg.data.path) if cfg.data.path else str(data_lib.embedded_task(Path(cfg.paths.cache_dir), "preference"))
    columns = OmegaConf.to_container(cfg.data.columns) if cfg.data.columns else None
    ds = data_lib.load_data(source, columns=columns, val_fraction=cfg.data.val_fraction, seed=cfg.seed, cache_dir=datasets_cache(cfg))
    fmt = data_lib.require_format(ds["train"], {"preference"}, "reward", source)
    for split in ds:
        data_lib.validate_rows(ds[split], fmt, f"{source} [{split}]")
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
        optim=OmegaConf.to_container(cfg.model, resolve=True),
        max_steps=cfg.trainer.max_steps,
        center_coef=cfg.reward.center_coef,
        use_margin=cfg.reward.use_margin,
    )
    module.model.load_state_dict(base.state_dict())
    seq_len = max(len(s) for s in pairs["train"]["chosen_ids"][:256])
    throughput = Throughput(module.model.flops_per_token(seq_len))
    trainer, checkpoint = build_trainer(cfg, run_dir, monitor="val/accuracy", mode="max", callbacks=[throughput])
    lengths = None
    if cfg.data.get("group_by_length", False):
        lengths = [max(len(c), len(r)) for c, r in zip(pairs["train"]["chosen_ids"], pairs["train"]["rejected_ids"])]
    collate = PairCollator(tokenizer.pad_token_id, share_prompts=cfg.data.get("share_prompts", False), max_row=max_len)
    datamodule = Batches(
        pairs["train"], pairs["validation"], cfg.data.batch_size, collate, cfg.data.num_workers,
        lengths=lengths, groups=pairs["train"]["prompt_key"], seed=cfg.seed,  # a prompt's pairs share a batch: each answer scored once
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_checkpoint(cfg, run_dir, module.hparams.model_config))

    best = checkpoint.best_model_path
    if best and Path(best).is_file():
        module.load_state_dict(torch.load(best, map_location="cpu", weights_only=False)["state_dict"])
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
    finish(run_dir, module.model, tokenizer, metrics, trainer, kind="scalar", stage="reward", extra=normaliser)
    return metrics
