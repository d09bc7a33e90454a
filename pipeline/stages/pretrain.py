"""Stage 1, pretraining: next-token prediction on packed blocks of plain text.

    python -m pipeline stage=pretrain                      # the embedded corpus, tiny model, CPU
    python -m pipeline stage=pretrain model=gpt2 trainer=gpu data.path=my_corpus.jsonl
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
from omegaconf import DictConfig, OmegaConf

from pipeline.data.corpus import load_corpus
from pipeline.data.packing import tokenize_and_pack
from pipeline.tokenizer import cached_tokenizer, load_tokenizer
from pipeline.training import Batches, ExactResume, LanguageModelModule, Throughput, build_trainer, finish, load_best, memory_levers, model_config_from, resume_checkpoint

log = logging.getLogger(__name__)


def unigram_cross_entropy(train_ids: np.ndarray, val_ids: np.ndarray, vocab_size: int) -> float:
    """Nats per token of the best context-free model (train unigram frequencies, add-one smoothed) on validation.

    The floor a language model must beat to show it learnt anything beyond token frequencies.
    """
    counts = np.bincount(train_ids, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[val_ids].mean())


def prepare(cfg: DictConfig, run_dir: Path):
    """Tokenizer, packed datasets and model config: everything the Trainer needs."""
    ds, source = load_corpus(cfg)
    if cfg.tokenizer.path:
        tokenizer = load_tokenizer(cfg.tokenizer.path)
    else:
        key = f"{source}|{ds['train']._fingerprint}"
        tokenizer = cached_tokenizer(Path(cfg.paths.cache_dir), key, lambda: ds["train"]["text"], cfg.tokenizer.vocab_size)
    seq_len = int(cfg.data.seq_len)  # at most model.block_size (pipeline/checks.py)
    model_config = model_config_from(cfg.model, len(tokenizer))
    train = tokenize_and_pack(ds["train"], tokenizer, seq_len, num_proc=cfg.data.num_proc).with_format("torch")
    val = tokenize_and_pack(ds["validation"], tokenizer, seq_len, num_proc=cfg.data.num_proc).with_format("torch")
    return tokenizer, train, val, model_config, ds, source


def run(cfg: DictConfig, run_dir: Path) -> dict:
    started = time.time()
    pl.seed_everything(cfg.seed, workers=True)
    tokenizer, train, val, model_config, ds, source = prepare(cfg, run_dir)
    module = LanguageModelModule(
        model_config=model_config.to_dict(),
        optim=OmegaConf.to_container(cfg.optim, resolve=True),
        max_steps=cfg.trainer.max_steps,
        compile=bool(cfg.model.get("compile", False)),
    )
    memory_levers(cfg, module.model)
    module.tokenizer = tokenizer
    module.max_new_tokens = cfg.samples.max_new_tokens
    module.sample_prompts = [
        [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"][:8]
        for text in ds["validation"]["text"][: cfg.samples.num_prompts]
    ]
    log.info("pretrain: %s, %.2fM parameters, %d train blocks of %d tokens", source, module.model.num_params() / 1e6, len(train), model_config.block_size)
    seq_len = train[0]["input_ids"].numel() - 1
    throughput = Throughput(module.model.flops_per_token(seq_len))
    trainer, checkpoint = build_trainer(cfg, run_dir, monitor="val/loss", mode="min", callbacks=[throughput, ExactResume()])
    datamodule = Batches(train, val, cfg.data.batch_size, num_workers=cfg.data.num_workers, seed=cfg.seed)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_checkpoint(cfg, run_dir, module.hparams.model_config), weights_only=True)

    load_best(module, checkpoint)  # final figures on the best weights, which are also what the next stage starts from
    final = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    if not trainer.is_global_zero:
        return {}
    train_ids = np.asarray(train.select(range(min(len(train), 4000))).with_format("numpy")["input_ids"]).reshape(-1)
    val_ids = np.asarray(val.with_format("numpy")["input_ids"]).reshape(-1)
    perf = throughput.figures(trainer)
    metrics = {
        "stage": "pretrain",
        "data": source,
        "val/loss": final["val/loss"],
        "val/ppl": final["val/ppl"],
        "baseline/unigram_xent": unigram_cross_entropy(train_ids, val_ids, model_config.vocab_size),
        "train/steps": trainer.global_step,
        "train/tokens": trainer.global_step * cfg.data.batch_size * seq_len * cfg.trainer.accumulate_grad_batches * trainer.world_size,
        "model/params": module.model.num_params(),
        "time/total_s": time.time() - started,
        **perf,
    }
    finish(run_dir, module.model, tokenizer, metrics, trainer, kind="lm", stage="pretrain")
    return metrics

