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
from omegaconf import DictConfig, OmegaConf

from pipeline import runs
from pipeline.data import load_stage_data, validate_splits
from pipeline.data.chat import tokenize_sft
from pipeline.data.collators import PadCollator
from pipeline.data.corpus import embedded_task
from pipeline.data.packing import pack_rows
from pipeline.data.samplers import row_lengths
from pipeline.evaluate import gold_eval, gold_prompts
from pipeline.files import read_json, write_json
from pipeline.stages import STAGES
from pipeline.training import Batches, ExactResume, LanguageModelModule, Throughput, apply_peft, build_trainer, finish, is_global_zero, load_best, log_table, memory_levers, resume_checkpoint

log = logging.getLogger(__name__)

SFT_FORMATS = {"language_modeling", "prompt_completion"}


def run(cfg: DictConfig, run_dir: Path) -> dict:
    started = time.time()
    pl.seed_everything(cfg.seed, workers=True)
    model, tokenizer, payload, start_path = runs.load_start(cfg.init_from, STAGES["sft"].starts_from, Path(cfg.paths.root), "sft", run_name=run_dir.name, dropout=cfg.model.dropout)
    parents = runs.parent_record(init_from=start_path)
    runs.check_parents(run_dir, parents)
    ds, fmt, source = load_stage_data(cfg, "sft", SFT_FORMATS, lambda: embedded_task(Path(cfg.paths.cache_dir), "sft"))
    validate_splits(ds, fmt, source)
    max_len = model.config.block_size + 1  # inputs [:-1] and targets [1:] of block_size each
    loss_on = cfg.sft.loss_on  # completion or all (pipeline/checks.py)
    train = tokenize_sft(ds["train"], tokenizer, fmt, loss_on, max_len, f"{source} [train]")
    val = tokenize_sft(ds["validation"], tokenizer, fmt, loss_on, max_len, f"{source} [validation]")
    if cfg.data.packing:
        train, val = pack_rows(train, max_len), pack_rows(val, max_len)
    log.info("sft: %s (%s%s), %d train rows, starting from %s", source, fmt.kind, ", conversational" if fmt.conversational else "", len(train), start_path)

    module = LanguageModelModule(
        model_config=model.config.to_dict(),
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        max_steps=cfg.trainer.max_steps,
        compile=bool(cfg.model.get("compile", False)),
        stage="sft",
    )
    module.model.load_state_dict(model.state_dict())
    peft_callbacks = apply_peft(cfg, module)  # peft=lora / qlora: adapters on the loaded model, the rest frozen
    memory_levers(cfg, module.model)
    prompts = gold_prompts(cfg)
    metrics: dict = {"stage": "sft", "data": source, "init_from": str(start_path), "parents": parents, "peft": cfg.peft.method}
    if prompts and is_global_zero() and not resume_checkpoint(cfg, run_dir):
        metrics["gold/start"], start_rows = gold_eval(module.model, tokenizer, prompts, cfg.eval.max_new_tokens, cfg.eval.batch_size)
        write_json(run_dir / "gold_start.json", {"gold": metrics["gold/start"], "rows": start_rows})
        log.info("gold score of the starting model: %.4f", metrics["gold/start"])

    throughput = Throughput(module.model.flops_per_token(max_len - 1))
    trainer, checkpoint = build_trainer(cfg, run_dir, monitor="val/loss", mode="min", callbacks=[throughput, ExactResume(), *peft_callbacks], parents=[start_path])
    lengths = row_lengths(train, "input_ids") if cfg.data.get("group_by_length", False) and not cfg.data.packing else None
    datamodule = Batches(train, val, cfg.data.batch_size, PadCollator(tokenizer.pad_token_id), cfg.data.num_workers, lengths=lengths, seed=cfg.seed)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_checkpoint(cfg, run_dir, module.hparams.model_config), weights_only=True)

    load_best(module, checkpoint)
    final = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    if not trainer.is_global_zero:
        return {}
    metrics.update({"val/loss": final["val/loss"], "val/ppl": final["val/ppl"], "train/steps": trainer.global_step, "train/rows": len(train)})
    if prompts:
        if "gold/start" not in metrics and (run_dir / "gold_start.json").is_file():
            metrics["gold/start"] = read_json(run_dir / "gold_start.json")["gold"]
        module.model.to(module.device)
        metrics["gold/final"], rows = gold_eval(module.model, tokenizer, prompts, cfg.eval.max_new_tokens, cfg.eval.batch_size)
        start_rows = read_json(run_dir / "gold_start.json")["rows"] if (run_dir / "gold_start.json").is_file() else [{}] * len(rows)
        log_table(
            trainer.logger,
            "samples/sft",
            ["prompt", "start response", "start gold", "sft response", "sft gold"],
            [[r["prompt"], s.get("response", ""), s.get("gold", float("nan")), r["response"], r["gold"]] for r, s in zip(rows[:50], start_rows[:50])],
        )
        write_json(run_dir / "gold_final.json", {"gold": metrics["gold/final"], "rows": rows})
    metrics.update({"time/total_s": time.time() - started, **throughput.figures(trainer)})
    finish(run_dir, module.model, tokenizer, metrics, trainer, kind="lm", stage="sft", base=start_path)
    return metrics
