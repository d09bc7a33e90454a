"""Pretraining throughput of the configured model on this device: our Lightning stage vs a plain PyTorch loop.

    python -m pipeline.bench                                   # the tiny default on CPU
    python -m pipeline.bench model=gpt2 tokenizer.vocab_size=50257 trainer.precision=bf16-mixed bench.batch_size=16
    python -m pipeline.bench model=gpt2 tokenizer.vocab_size=50257 model.compile=true trainer.precision=bf16-mixed

Both sides train the same model config on the same random token blocks with the same optimiser;
the first steps (allocation, compilation) are not timed. Prints tokens/s, MFU where the GPU's peak
is known, and the ratio ours / plain loop (Lightning's overhead); writes outputs/bench/bench.json.
Any config override of `python -m pipeline stage=pretrain` applies.
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from pipeline.model import GPT
from pipeline.pretrain import PretrainModule, model_config_from
from pipeline.training import Batches, Throughput, adamw_with_schedule, device_peak_flops

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
BENCH_DEFAULTS = {"batch_size": None, "steps": 20, "warmup": 5}


def compose_config(overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        bench = {k: v for k, v in (o.split("=", 1) for o in overrides if o.startswith("bench."))}
        rest = [o for o in overrides if not o.startswith("bench.")]
        cfg = compose("config", overrides=["stage=pretrain", "paths.run_dir=outputs/bench", *rest])
    with open_dict(cfg):
        cfg.bench = {**BENCH_DEFAULTS, **{k[len("bench.") :]: int(v) for k, v in bench.items()}}
    return cfg


def random_blocks(n: int, seq_len: int, vocab: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, seq_len + 1), generator=g)
    return [{"input_ids": row} for row in ids]


def device_of(cfg) -> torch.device:
    wants_gpu = cfg.trainer.accelerator in ("gpu", "cuda") or (cfg.trainer.accelerator == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if wants_gpu else "cpu")


def autocast(cfg, device):
    precision = str(cfg.trainer.precision)
    if precision.startswith("bf16"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision.startswith("16"):
        return torch.autocast(device.type, dtype=torch.float16)
    return nullcontext()


def plain_loop(cfg, model_config, blocks, batch_size: int, steps: int, warmup: int) -> float:
    """Tokens/s of a bare training loop: forward, loss, backward, clip, AdamW step."""
    device = device_of(cfg)
    torch.manual_seed(0)
    model = GPT(model_config).to(device)
    if cfg.model.get("compile"):
        model.compile()
    optim = adamw_with_schedule(model, cfg.model, cfg.trainer.max_steps)["optimizer"]
    data = torch.stack([b["input_ids"] for b in blocks]).to(device)
    seconds = 0.0
    for step in range(warmup + steps):
        batch = data[(step * batch_size) % len(data) :][:batch_size]
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast(cfg, device):
            logits = model(batch[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.gradient_clip_val)
        optim.step()
        optim.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            seconds += time.perf_counter() - start
    return steps * batch_size * (data.size(1) - 1) / seconds


def lightning_stage(cfg, model_config, blocks, batch_size: int, steps: int, warmup: int) -> tuple[float, float]:
    """Tokens/s of our pretraining LightningModule under a real Trainer (no logger, no checkpoints)."""
    pl.seed_everything(0, verbose=False)
    module = PretrainModule(model_config.to_dict(), OmegaConf.to_container(cfg.model, resolve=True), cfg.trainer.max_steps, compile=bool(cfg.model.get("compile")))
    seq_len = blocks[0]["input_ids"].numel() - 1
    throughput = Throughput(module.model.flops_per_token(seq_len), skip_steps=warmup)
    trainer = pl.Trainer(
        accelerator=cfg.trainer.accelerator,
        devices=1,
        precision=cfg.trainer.precision,
        max_steps=warmup + steps,
        gradient_clip_val=cfg.trainer.gradient_clip_val,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[throughput],
    )
    trainer.fit(module, datamodule=Batches(blocks, blocks[:batch_size], batch_size))
    figures = throughput.figures(trainer)
    return figures["perf/tokens_per_s"], module.model.flops_per_token(seq_len)


def main(argv: list[str]) -> dict:
    cfg = compose_config(argv)
    model_config = model_config_from(cfg.model, cfg.tokenizer.vocab_size)
    seq_len = cfg.data.seq_len
    batch_size = cfg.bench.batch_size or cfg.data.batch_size
    steps, warmup = cfg.bench.steps, cfg.bench.warmup
    blocks = random_blocks(batch_size * 8, seq_len, model_config.vocab_size)
    plain_loop(cfg, model_config, blocks, batch_size, 2, warmup)  # the process's first-touch costs, paid by neither side
    ours, flops_per_token = lightning_stage(cfg, model_config, blocks, batch_size, steps, warmup)
    plain = plain_loop(cfg, model_config, blocks, batch_size, steps, warmup)
    device = device_of(cfg)
    peak = device_peak_flops() if device.type == "cuda" else None
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "model": {k: v for k, v in model_config.to_dict().items()},
        "params": GPT(model_config).num_params(),
        "precision": str(cfg.trainer.precision),
        "batch_size": batch_size,
        "seq_len": seq_len,
        "compile": bool(cfg.model.get("compile")),
        "ours_tokens_per_s": ours,
        "plain_loop_tokens_per_s": plain,
        "ratio_ours_over_plain": ours / plain,
    }
    if peak:
        result["ours_mfu"] = ours * flops_per_token / peak
        result["plain_loop_mfu"] = plain * flops_per_token / peak
    print(f"\npretraining throughput on {result['device']}: {result['params'] / 1e6:.1f}M parameters, batch {batch_size} x {seq_len} tokens, {result['precision']}")
    print(f"{'':24}{'tokens/s':>12}{'MFU':>8}")
    for name, key in (("pipeline (Lightning)", "ours"), ("plain PyTorch loop", "plain_loop")):
        mfu = f"{result[key + '_mfu']:.1%}" if peak else "-"
        print(f"{name:24}{result[key + '_tokens_per_s']:>12,.0f}{mfu:>8}")
    print(f"ratio ours / plain loop: {result['ratio_ours_over_plain']:.3f}")
    out = Path(cfg.paths.root) / "bench" / "bench.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {out}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
