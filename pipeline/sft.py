"""Stage 2, instruction finetuning (SFT): teach the pretrained model to answer, loss on the answers only.

    python -m pipeline stage=sft                                  # embedded task, newest pretrain run
    python -m pipeline stage=sft data.path=chats.jsonl init_from=outputs/pretrain/default

Takes TRL's formats: language modelling (`text`, or conversational `messages`), prompt-completion
(standard strings or conversational message lists). Conversations go through the chat template.
By default the loss covers only completion / assistant tokens (`sft.loss_on=all` trains on all).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from pipeline import data as data_lib
from pipeline import runs
from pipeline.errors import UserError
from pipeline.evaluate import gold_eval
from pipeline.pretrain import PretrainModule
from pipeline.training import Batches, Throughput, build_trainer, datasets_cache, finish, is_global_zero, log_table, resume_checkpoint

log = logging.getLogger(__name__)

IGNORE = -100  # label of tokens that carry no loss


def render(tokenizer, messages, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)


def encode_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_conversation(tokenizer, messages, train_from: int, loss_on: str) -> tuple[list[int], list[int]]:
    """Ids of a whole conversation and labels that keep assistant turns from message `train_from` on.

    Each assistant turn's tokens are found by rendering the conversation up to it: the chat template
    renders every prefix of a conversation as a prefix of the whole, so token counts of the prefixes
    mark where each answer starts and ends.
    """
    ids = encode_ids(tokenizer, render(tokenizer, messages))
    if loss_on == "all":
        return ids, list(ids)
    labels = [IGNORE] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < train_from:
            continue
        start = len(encode_ids(tokenizer, render(tokenizer, messages[:i], add_generation_prompt=True)))
        end = len(encode_ids(tokenizer, render(tokenizer, messages[: i + 1])))
        labels[start:end] = ids[start:end]
    return ids, labels


def encode_example(tokenizer, row: dict, fmt: data_lib.DataFormat, loss_on: str) -> tuple[list[int], list[int], int]:
    """(input ids, labels, prompt length) of one SFT row in any of the formats SFT takes."""
    if fmt.kind == "language_modeling":
        if fmt.conversational:
            ids, labels = encode_conversation(tokenizer, row["messages"], 0, loss_on)
            return ids, labels, 0
        ids = [tokenizer.bos_token_id] + encode_ids(tokenizer, row["text"]) + [tokenizer.eos_token_id]
        return ids, list(ids), 0
    # prompt-completion
    if fmt.conversational:
        prompt, completion = list(row["prompt"]), list(row["completion"])
        ids, labels = encode_conversation(tokenizer, prompt + completion, len(prompt), loss_on)
        prompt_len = len(encode_ids(tokenizer, render(tokenizer, prompt, add_generation_prompt=True)))
        return ids, labels, prompt_len
    prompt = [tokenizer.bos_token_id] + encode_ids(tokenizer, row["prompt"])
    completion = encode_ids(tokenizer, row["completion"]) + [tokenizer.eos_token_id]
    labels = ([IGNORE] * len(prompt) if loss_on == "completion" else list(prompt)) + completion
    return prompt + completion, labels, len(prompt)


def tokenize(ds, tokenizer, fmt, loss_on: str, max_len: int, source: str):
    """datasets.map over the rows (cached on disk for file-backed data); rows longer than the context are cut.

    A prompt that alone fills the context cannot be trained on and is an error naming the row.
    """

    def encode(row, index):
        ids, labels, prompt_len = encode_example(tokenizer, row, fmt, loss_on)
        if prompt_len >= max_len:
            raise UserError(
                f"{source}: row {index} has a prompt of {prompt_len} tokens, which leaves no room for the answer "
                f"in the model's context of {max_len - 1} tokens"
            )
        return {"input_ids": ids[:max_len], "labels": labels[:max_len], "truncated": len(ids) > max_len}

    out = ds.map(encode, with_indices=True, remove_columns=ds.column_names, desc="tokenising")
    cut = sum(out["truncated"])
    if cut:
        log.warning("%s: %d of %d rows are longer than the context and were cut to %d tokens", source, cut, len(out), max_len)
    if not any(any(l != IGNORE for l in labels) for labels in out["labels"][:1000]):
        raise UserError(f"{source}: no tokens to train on (every label is masked); check the format and sft.loss_on")
    return out.remove_columns("truncated")


def pack(ds, block: int):
    """Concatenate tokenised examples and cut them into rows of exactly `block` tokens (optional packing)."""

    def chunk(batch):
        ids = [t for row in batch["input_ids"] for t in row]
        labels = [t for row in batch["labels"] for t in row]
        n = len(ids) // block * block
        return {"input_ids": [ids[i : i + block] for i in range(0, n, block)], "labels": [labels[i : i + block] for i in range(0, n, block)]}

    return ds.map(chunk, batched=True, batch_size=1000, remove_columns=ds.column_names, desc="packing")


class PadCollator:
    """Right-pad ids with the pad token and labels with IGNORE; right padding needs no attention mask in a causal model."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, rows: list[dict]) -> dict:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r["input_ids"])] = torch.as_tensor(r["input_ids"])
            labels[i, : len(r["labels"])] = torch.as_tensor(r["labels"])
        return {"input_ids": ids, "labels": labels}


class SFTModule(PretrainModule):
    """The language model trained on labelled tokens only (labels IGNORE elsewhere)."""

    def loss(self, batch: dict) -> torch.Tensor:
        logits = self.model(batch["input_ids"][:, :-1])  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE)


SFT_FORMATS = {"language_modeling", "prompt_completion"}


def load_sft_data(cfg: DictConfig):
    source = str(cfg.data.path) if cfg.data.path else str(data_lib.embedded_task(Path(cfg.paths.cache_dir), "sft"))
    columns = OmegaConf.to_container(cfg.data.columns) if cfg.data.columns else None
    ds = data_lib.load_data(source, columns=columns, val_fraction=cfg.data.val_fraction, seed=cfg.seed, cache_dir=datasets_cache(cfg))
    fmt = data_lib.require_format(ds["train"], SFT_FORMATS, "sft", source)
    for split in ds:
        data_lib.validate_rows(ds[split], fmt, f"{source} [{split}]")
    return ds, fmt, source


def gold_prompts(cfg: DictConfig) -> list | None:
    """Held-out prompts of the embedded task (its test split), when the gold judge applies."""
    use = cfg.eval.gold
    if use == "auto":
        use = not cfg.data.path
    if not use:
        return None
    path = data_lib.embedded_task(Path(cfg.paths.cache_dir), "prompts")
    test = data_lib.load_data(str(path), cache_dir=datasets_cache(cfg))["test"]
    return [row["prompt"] for row in test.select(range(min(cfg.eval.num_prompts, len(test))))]


def run(cfg: DictConfig, run_dir: Path) -> dict:
    started = time.time()
    pl.seed_everything(cfg.seed, workers=True)
    model, tokenizer, payload, start_path = runs.load_start(cfg.init_from, "sft", Path(cfg.paths.root), dropout=cfg.model.dropout)
    ds, fmt, source = load_sft_data(cfg)
    max_len = model.config.block_size + 1  # inputs [:-1] and targets [1:] of block_size each
    loss_on = cfg.sft.loss_on
    if loss_on not in ("completion", "all"):
        raise UserError(f"sft.loss_on must be 'completion' or 'all', not {loss_on!r}")
    train = tokenize(ds["train"], tokenizer, fmt, loss_on, max_len, f"{source} [train]")
    val = tokenize(ds["validation"], tokenizer, fmt, loss_on, max_len, f"{source} [validation]")
    if cfg.data.packing:
        train, val = pack(train, max_len), pack(val, max_len)
    log.info("sft: %s (%s%s), %d train rows, starting from %s", source, fmt.kind, ", conversational" if fmt.conversational else "", len(train), start_path)

    module = SFTModule(
        model_config=model.config.to_dict(),
        optim=OmegaConf.to_container(cfg.model, resolve=True),
        max_steps=cfg.trainer.max_steps,
        compile=bool(cfg.model.get("compile", False)),
    )
    module.model.load_state_dict(model.state_dict())
    prompts = gold_prompts(cfg)
    metrics: dict = {"stage": "sft", "data": source, "init_from": str(start_path)}
    if prompts and is_global_zero() and not resume_checkpoint(cfg, run_dir):
        metrics["gold/start"], start_rows = gold_eval(module.model, tokenizer, prompts, cfg.eval.max_new_tokens, cfg.eval.batch_size)
        runs.write_json(run_dir / "gold_start.json", {"gold": metrics["gold/start"], "rows": start_rows})
        log.info("gold score of the starting model: %.4f", metrics["gold/start"])

    throughput = Throughput(module.model.flops_per_token(max_len - 1))
    trainer, checkpoint = build_trainer(cfg, run_dir, monitor="val/loss", mode="min", callbacks=[throughput])
    lengths = [len(ids) for ids in train["input_ids"]] if cfg.data.get("group_by_length", False) and not cfg.data.packing else None
    datamodule = Batches(train, val, cfg.data.batch_size, PadCollator(tokenizer.pad_token_id), cfg.data.num_workers, lengths=lengths, seed=cfg.seed)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_checkpoint(cfg, run_dir, module.hparams.model_config))

    best = checkpoint.best_model_path
    if best and Path(best).is_file():
        module.load_state_dict(torch.load(best, map_location="cpu", weights_only=False)["state_dict"])
    final = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    if not trainer.is_global_zero:
        return {}
    metrics.update({"val/loss": final["val/loss"], "val/ppl": final["val/ppl"], "train/steps": trainer.global_step, "train/rows": len(train)})
    if prompts:
        if "gold/start" not in metrics and (run_dir / "gold_start.json").is_file():
            metrics["gold/start"] = runs.read_json(run_dir / "gold_start.json")["gold"]
        module.model.to(module.device)
        metrics["gold/final"], rows = gold_eval(module.model, tokenizer, prompts, cfg.eval.max_new_tokens, cfg.eval.batch_size)
        start_rows = runs.read_json(run_dir / "gold_start.json")["rows"] if (run_dir / "gold_start.json").is_file() else [{}] * len(rows)
        log_table(
            trainer.logger,
            "samples/sft",
            ["prompt", "start response", "start gold", "sft response", "sft gold"],
            [[r["prompt"], s.get("response", ""), s.get("gold", float("nan")), r["response"], r["gold"]] for r, s in zip(rows[:50], start_rows[:50])],
        )
        runs.write_json(run_dir / "gold_final.json", {"gold": metrics["gold/final"], "rows": rows})
    metrics.update({"time/total_s": time.time() - started, **throughput.figures(trainer)})
    finish(run_dir, module.model, tokenizer, metrics, trainer, kind="lm", stage="sft")
    return metrics
