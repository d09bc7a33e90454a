"""Stage 1, pretraining: next-token prediction on packed blocks of plain text.

    python -m pipeline stage=pretrain                      # the embedded corpus, tiny model, CPU
    python -m pipeline stage=pretrain model=gpt2 trainer=gpu data.path=my_corpus.jsonl
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torchmetrics import MeanMetric

from pipeline import data as data_lib
from pipeline import runs
from pipeline.errors import UserError
from pipeline.model import GPT, GPTConfig, generate, pad_vocab
from pipeline.tokenizer import cached_tokenizer, load_tokenizer
from pipeline.training import Batches, Throughput, adamw_with_schedule, build_trainer, datasets_cache, finish, log_table, resume_checkpoint

log = logging.getLogger(__name__)

EMBEDDED_CORPUS = "embedded/pretrain-v2"  # bump the version when the corpus builder changes


def model_config_from(cfg_model: DictConfig, vocab_size: int) -> GPTConfig:
    arch = {k: v for k, v in OmegaConf.to_container(cfg_model, resolve=True).items() if k in GPTConfig.__dataclass_fields__}
    arch["vocab_size"] = pad_vocab(vocab_size)
    try:
        return GPTConfig.from_dict(arch)
    except ValueError as e:
        raise UserError(str(e)) from None


class PretrainModule(pl.LightningModule):
    """A GPT trained on next-token prediction; validation reports loss, perplexity and samples."""

    def __init__(self, model_config: dict, optim: dict, max_steps: int, compile: bool = False, model_kind: str = "lm"):
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
        logits = self.model(ids[:, :-1])  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())

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
        log_table(self.logger, "samples/pretrain", ["step", "prompt", "completion"], rows)
        log.info("sample at step %d: %r -> %r", self.global_step, rows[0][1], rows[0][2])

    def on_save_checkpoint(self, checkpoint):
        checkpoint["best_val_loss"] = self.best_val_loss

    def on_load_checkpoint(self, checkpoint):
        self.best_val_loss = checkpoint.get("best_val_loss", math.inf)

    def configure_optimizers(self):
        return adamw_with_schedule(self.model, OmegaConf.create(self.hparams.optim), self.hparams.max_steps)


def unigram_cross_entropy(train_ids: np.ndarray, val_ids: np.ndarray, vocab_size: int) -> float:
    """Nats per token of the best context-free model (train unigram frequencies, add-one smoothed) on validation.

    The floor a language model must beat to show it learnt anything beyond token frequencies.
    """
    counts = np.bincount(train_ids, minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(-logp[val_ids].mean())


def load_corpus(cfg: DictConfig) -> tuple[object, str]:
    """The pretraining text as a DatasetDict (train/validation) and a name for messages."""
    cache = Path(cfg.paths.cache_dir)
    if cfg.data.path:
        source = str(cfg.data.path)
    else:
        source = str(data_lib.materialize(data_lib.embedded_corpus_rows(seed=0), cache / EMBEDDED_CORPUS))
    columns = OmegaConf.to_container(cfg.data.columns) if cfg.data.columns else None
    ds = data_lib.load_data(source, columns=columns, val_fraction=cfg.data.val_fraction, seed=cfg.seed, cache_dir=datasets_cache(cfg))
    fmt = data_lib.require_format(ds["train"], {"language_modeling"}, "pretrain", source)
    if fmt.conversational:
        raise UserError(f"stage 'pretrain' trains on plain text (a `text` column); {source} holds conversations (`messages`): use stage=sft for those")
    for split in ("train", "validation"):
        data_lib.validate_rows(ds[split], fmt, f"{source} [{split}]")
    return ds, source


def prepare(cfg: DictConfig, run_dir: Path):
    """Tokenizer, packed datasets and model config: everything the Trainer needs."""
    ds, source = load_corpus(cfg)
    if cfg.tokenizer.path:
        tokenizer = load_tokenizer(cfg.tokenizer.path)
    else:
        key = f"{source}|{ds['train']._fingerprint}"
        tokenizer = cached_tokenizer(Path(cfg.paths.cache_dir), key, lambda: ds["train"]["text"], cfg.tokenizer.vocab_size)
    seq_len = int(cfg.data.seq_len)
    if seq_len > cfg.model.block_size:
        raise UserError(f"data.seq_len={seq_len} is longer than the model's context model.block_size={cfg.model.block_size}")
    model_config = model_config_from(cfg.model, len(tokenizer))
    train = data_lib.tokenize_and_pack(ds["train"], tokenizer, seq_len, num_proc=cfg.data.num_proc).with_format("torch")
    val = data_lib.tokenize_and_pack(ds["validation"], tokenizer, seq_len, num_proc=cfg.data.num_proc).with_format("torch")
    return tokenizer, train, val, model_config, ds, source


def run(cfg: DictConfig, run_dir: Path) -> dict:
    started = time.time()
    pl.seed_everything(cfg.seed, workers=True)
    tokenizer, train, val, model_config, ds, source = prepare(cfg, run_dir)
    module = PretrainModule(
        model_config=model_config.to_dict(),
        optim=OmegaConf.to_container(cfg.model, resolve=True),
        max_steps=cfg.trainer.max_steps,
        compile=bool(cfg.model.get("compile", False)),
    )
    module.tokenizer = tokenizer
    module.max_new_tokens = cfg.samples.max_new_tokens
    module.sample_prompts = [
        [tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False)["input_ids"][:8]
        for text in ds["validation"]["text"][: cfg.samples.num_prompts]
    ]
    log.info("pretrain: %s, %.2fM parameters, %d train blocks of %d tokens", source, module.model.num_params() / 1e6, len(train), model_config.block_size)
    seq_len = train[0]["input_ids"].numel() - 1
    throughput = Throughput(module.model.flops_per_token(seq_len))
    trainer, checkpoint = build_trainer(cfg, run_dir, monitor="val/loss", mode="min", callbacks=[throughput])
    datamodule = Batches(train, val, cfg.data.batch_size, num_workers=cfg.data.num_workers)
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_checkpoint(cfg, run_dir, module.hparams.model_config))

    # Final figures on the best weights (lowest validation loss), which are also what the next stage starts from.
    best = checkpoint.best_model_path
    if best and Path(best).is_file():
        state = torch.load(best, map_location="cpu", weights_only=False)["state_dict"]
        module.load_state_dict(state)
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

