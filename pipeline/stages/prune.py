"""`python -m pipeline stage=prune`: a finished policy made smaller by structured pruning, then recovered by distillation from itself.

    python -m pipeline stage=prune                                   # the newest finished ppo (else grpo, dpo, sft, pretrain) run, to 70% of its parameters
    python -m pipeline stage=prune prune.ratio=0.5 prune.method=magnitude
    python -m pipeline stage=prune prune.targets.blocks=0.5 prune.targets.heads=0 prune.targets.channels=0.5
    python -m pipeline stage=prune prune.recover.steps=0             # pruning alone: no recovery
    python -m pipeline stage=generate init_from=outputs/prune/default prompt="Spell hill letter by letter"
    python -m pipeline stage=export init_from=outputs/prune/default  # a transformers Llama with head_dim (GPT-2 style: heads are kept)

What goes and how it is chosen (head groups, MLP channels, whole blocks; `prune.method` magnitude or
wanda; `prune.targets`, the shares of the removed parameters) is pipeline/model/prune.py's; the ratio
counts GPT.num_params() (the token embedding included, which is never pruned). The activation
statistics come from `prune.calibration.prompts` training prompts followed by the source's own greedy
answers. The pruned model is an ordinary smaller GPTConfig, written as run_dir/pruned.pt; with
`prune.recover.steps` > 0 it then learns the unpruned model's distributions for that many steps
(pipeline/distillation.py; `prune.recover` holds the keys of stage=distill's `distill` section, and
`optim`/`trainer` are this stage's), and model.pt is the recovered model; with 0, model.pt is the
pruned one. Either records its source's stage, so generate and serve send chat prompts to a pruned
instruction-tuned model.

metrics.json: params/{source,pruned,ratio} (and params/non_embedding_ratio), the plan (prune/*),
file/{source,pruned}_bytes (the source as a float32 model.pt), on the held-out prompts gold/source,
gold/pruned and gold/final (eval.num_prompts, greedy, as SFT scores) and kl/pruned, kl/final (KL to the
unpruned model in nats per answer: the pruned model's samples at temperature 1, each position's exact
KL); perf/{source,pruned}_tokens_per_s_b{B} and perf/speedup_b{B} (evaluate.tokens_per_s at each
prune.bench.batch_sizes); the recovery's figures (val/loss, train/steps, ...); time/prune_s, time/total_s.
A killed run resumes: the pruned model is read back from pruned.pt (when its settings are this
command's) and the recovery from its last checkpoint.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, OmegaConf

from pipeline import runs
from pipeline.data.chat import prompt_ids
from pipeline.distillation import answer, distill_prompts, held_out_figures, train_student
from pipeline.errors import UserError
from pipeline.evaluate import gold_eval, gold_prompts, speed_figures
from pipeline.files import read_json, write_json
from pipeline.model import GPT, prune
from pipeline.rl import load_prompts
from pipeline.stages import STAGES
from pipeline.tokenizer import save_tokenizer
from pipeline.training import finish, is_global_zero, lora_settings

log = logging.getLogger(__name__)

PRUNED_FILE = "pruned.pt"  # the model straight after pruning, before any recovery
START_FILE = "prune_start.json"  # the held-out figures of the source and the pruned model, kept for a resumed run
ANSWERS_FILE = "gold_answers.json"


def load_source(cfg: DictConfig, run_dir: Path):
    """(model, tokenizer, payload, path) of the float policy to prune; a reward model is refused (a quantised one by load_start)."""
    model, tokenizer, payload, path = runs.load_start(cfg.init_from, STAGES["prune"].starts_from, Path(cfg.paths.root), "prune", run_name=run_dir.name, dropout=0.0)
    if payload.get("kind") == "scalar":
        raise UserError(f"init_from={path} is a reward model (a scalar head), not a policy: prune an sft, ppo or pretrain run")
    return model.eval(), tokenizer, payload, path


def settings(cfg: DictConfig) -> dict:
    """Everything the pruned model depends on besides its source (whose digest parents.json holds)."""
    p = cfg.prune
    try:
        targets = prune.check_targets(OmegaConf.to_container(p.targets, resolve=True))
    except ValueError as e:
        raise UserError(f"prune.targets: {e}") from None
    calibration = OmegaConf.to_container(p.calibration, resolve=True)
    return {"ratio": float(p.ratio), "method": str(p.method), "targets": targets, "calibration": calibration, "seed": int(cfg.seed), "data": cfg.data.path}


def calibration_sequences(cfg: DictConfig, model: GPT, tokenizer) -> list[list[int]]:
    """`prune.calibration.prompts` training prompts drawn with the run's seed, each followed by the model's own greedy answer."""
    c = cfg.prune.calibration
    max_prompt = model.config.block_size - int(c.max_new_tokens)
    if max_prompt < 1:
        raise UserError(f"prune.calibration.max_new_tokens={c.max_new_tokens} leaves no room for a prompt in the context of {model.config.block_size} tokens")
    train, _, _, source = load_prompts(cfg, tokenizer, max_prompt, "prune.calibration", eval_count=0)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(int(cfg.seed)))[: int(c.prompts)]
    prompts = [train[i] for i in order.tolist()]
    device = next(model.parameters()).device
    answers = answer(model, prompts, int(c.max_new_tokens), 0.0, tokenizer.eos_token_id, tokenizer.pad_token_id, int(cfg.seed), int(c.batch_size), device)
    log.info("prune: calibrating on %d prompts of %s with the source's answers", len(prompts), source)
    return [p + a for p, a in zip(prompts, answers)]


def pruned_model(cfg: DictConfig, source: GPT, tokenizer, path: Path, source_stage: str | None, run_dir: Path) -> tuple[GPT, dict]:
    """The pruned model and its plan: read back from run_dir/pruned.pt when it was made with this command's settings, else made (and written there)."""
    wanted = settings(cfg)
    file = run_dir / PRUNED_FILE
    if file.is_file():
        payload = runs.load_model_payload(file)
        if payload.get("extra", {}).get("settings") == wanted:
            log.info("prune: the pruned model read back from %s", file)
            return runs.build_model(payload, GPT, file).eval(), payload["extra"]["plan"]
        log.info("prune: %s was pruned with other settings: pruning again", file)
    try:
        prune.unit_counts(source, wanted["ratio"], wanted["targets"])  # an unreachable ratio fails before the calibration's work
    except ValueError as e:
        raise UserError(f"prune: {e}") from None
    started = time.time()
    calibration = prune.calibrate(source, calibration_sequences(cfg, source, tokenizer), tokenizer.pad_token_id, batch_size=int(cfg.prune.calibration.batch_size))
    try:
        model, plan = prune.prune_model(source, wanted["ratio"], wanted["targets"], wanted["method"], calibration)
    except ValueError as e:
        raise UserError(f"prune: {e}") from None
    record = {**plan.to_dict(), "calibration_tokens": calibration.tokens, "seconds": time.time() - started}
    if is_global_zero():  # every rank prunes alike (greedy answers, fixed draws); one writes
        run_dir.mkdir(parents=True, exist_ok=True)
        runs.save_model(file, model, kind="lm", stage=source_stage, extra={"source": str(path), "settings": wanted, "plan": record})
    return model.eval(), record


def start_figures(cfg: DictConfig, run_dir: Path, pruned: GPT, source: GPT, tokenizer, gold: list | None, kl_prompts: list[list[int]]) -> dict:
    """gold/source, gold/pruned and kl/pruned (and their rows), once: a resumed run reads the ones it had."""
    file = run_dir / START_FILE
    if file.is_file():
        return read_json(file)
    figures = held_out_figures(cfg, pruned, source, tokenizer, gold, kl_prompts, "pruned")
    if gold:
        figures["gold/source"], figures["rows/source"] = gold_eval(source, tokenizer, gold, int(cfg.eval.max_new_tokens), int(cfg.eval.batch_size))
    if is_global_zero():
        write_json(file, figures)
    return figures


def recovery_config(cfg: DictConfig, steps: int) -> DictConfig:
    """cfg with trainer.max_steps = prune.recover.steps: the recovery's length is the stage's own key (0: none)."""
    out = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    out.trainer.max_steps = steps
    return out


def run(cfg: DictConfig, run_dir: Path) -> dict:
    started = time.time()
    pl.seed_everything(cfg.seed, workers=True)
    if lora_settings(cfg) is not None:
        raise UserError(f"stage=prune changes the model's shapes and recovers the whole model: peft={cfg.peft.method} is not supported here; pass peft=none")
    p = cfg.prune
    source, tokenizer, payload, path = load_source(cfg, run_dir)
    source_stage = payload.get("stage")
    parents = runs.parent_record(init_from=path)
    runs.check_parents(run_dir, parents)
    run_dir.mkdir(parents=True, exist_ok=True)

    model, plan = pruned_model(cfg, source, tokenizer, path, source_stage, run_dir)
    embedding = source.wte.weight.numel()
    metrics: dict = {
        "stage": "prune",
        "source": str(path),
        "source_stage": source_stage,
        "parents": parents,
        "method": str(p.method),
        "prune/target_ratio": float(p.ratio),
        "prune/targets": settings(cfg)["targets"],
        "prune/blocks_removed": plan["counts"]["blocks"],
        "prune/head_groups_removed": plan["counts"]["heads"],  # in every kept block
        "prune/channels_removed": plan["counts"]["channels"],  # in every kept block
        "prune/kept_blocks": plan["blocks"],
        "prune/config": model.config.to_dict(),
        "params/source": source.num_params(),
        "params/pruned": model.num_params(),
        "params/ratio": model.num_params() / source.num_params(),
        "params/non_embedding_ratio": (model.num_params() - embedding) / (source.num_params() - embedding),
        "time/prune_s": plan["seconds"],
    }
    log.info(
        "prune (%s): %d of %d blocks kept, %d of %d head groups and %d of %d MLP channels in each: %d of %d parameters (%.3f)",
        p.method, model.config.n_layer, source.config.n_layer, model.config.n_kv_head, source.config.n_kv_head, model.config.mlp_hidden,
        source.config.mlp_hidden, model.num_params(), source.num_params(), metrics["params/ratio"],
    )

    gold = gold_prompts(cfg)
    kl_prompts = [prompt_ids(tokenizer, q) for q in gold] if gold else [prompt_ids(tokenizer, r) for r in load_prompts(cfg, tokenizer, model.config.block_size, "prune", eval_count=int(cfg.eval.num_prompts))[2]]
    start = start_figures(cfg, run_dir, model, source, tokenizer, gold, kl_prompts)
    log.info("prune: before recovery, gold %s (unpruned %s), KL to the unpruned model %.3f nats", start.get("gold/pruned"), start.get("gold/source"), start["kl/pruned"])

    steps = int(p.recover.steps)
    trainer = None
    if steps > 0:
        recover_cfg = recovery_config(cfg, steps)
        block = model.config.block_size
        prompts = distill_prompts(recover_cfg, p.recover, tokenizer, block, "prune.recover")
        trainer, figures = train_student(recover_cfg, p.recover, run_dir, model, source, tokenizer, prompts, [path], "prune")
        if not trainer.is_global_zero:
            return {}
        metrics.update(figures)
        final = held_out_figures(cfg, model.eval(), source, tokenizer, gold, kl_prompts, "final")
    else:
        final = {"kl/final": start["kl/pruned"], **({"gold/final": start["gold/pruned"], "rows/final": start["rows/pruned"]} if gold else {})}
    metrics.update({k: v for k, v in {**start, **final}.items() if not k.startswith("rows/")})
    if gold:
        rows = [
            {"prompt": s["prompt"], "source": s["response"], "source_gold": s["gold"], "pruned": q["response"], "pruned_gold": q["gold"], "final": f["response"], "final_gold": f["gold"]}
            for s, q, f in zip(start["rows/source"], start["rows/pruned"], final["rows/final"])
        ]
        write_json(run_dir / ANSWERS_FILE, rows)
        log.info("prune: gold %.4f unpruned, %.4f pruned, %.4f %s", metrics["gold/source"], metrics["gold/pruned"], metrics["gold/final"], "recovered" if steps else "(no recovery)")

    model.eval()
    source.to(next(model.parameters()).device)
    metrics.update(speed_figures({"source": source.eval(), "pruned": model}, tokenizer, model.config.block_size, p.bench))

    extra = {"source": str(path), "prune": {"settings": settings(cfg), "plan": plan, "recover_steps": steps}}
    data, _ = runs.encode_model(model, "lm", source_stage, extra)
    metrics["file/source_bytes"] = len(runs.encode_model(source, "lm", source_stage)[0])  # the source as a float32 model.pt
    metrics["file/pruned_bytes"] = len(data)
    metrics["file/ratio"] = metrics["file/pruned_bytes"] / metrics["file/source_bytes"]
    metrics["time/total_s"] = time.time() - started
    if trainer is not None:
        finish(run_dir, model, tokenizer, metrics, trainer, kind="lm", stage="prune", extra=extra, model_stage=source_stage)
    else:
        save_tokenizer(tokenizer, run_dir / runs.TOKENIZER_DIR)
        runs.save_model(run_dir / runs.MODEL_FILE, model, kind="lm", stage=source_stage, extra=extra)
        write_json(run_dir / runs.METRICS_FILE, metrics)
        log.info("prune finished: %s", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items() if not isinstance(v, (dict, list))})
    return metrics
