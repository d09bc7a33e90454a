"""`python -m pipeline stage=quantize`: a finished policy quantised with torchao for the CPU, measured against its float self.

    python -m pipeline stage=quantize                                  # int8, the newest finished ppo, else grpo, dpo, sft, pretrain run
    python -m pipeline stage=quantize quantize.method=int4 quantize.group_size=32
    python -m pipeline stage=generate init_from=outputs/quantize/default prompt="Reverse the list: a b c"
    python -m pipeline stage=serve init_from=outputs/quantize/default
    python -m pipeline stage=export init_from=outputs/quantize/default  # transformers gets the weights dequantised

`quantize.method=int8`: int8 weights and int8 activations quantised per token at every call;
`int4`: int4 weight-only, in groups of `quantize.group_size` (the methods, the layers they cover
and the file format: pipeline/model/quant.py). The run directory holds model.pt (quantised),
tokenizer/ and metrics.json with what the choice costs and gains, all on this machine's CPU:

- file/float_bytes, file/quant_bytes: model.pt as a float32 file of the source, and the quantised one;
- perf/{float,quant}_tokens_per_s_b{B}: engine.generate's tokens per second at each batch size of
  quantize.bench.batch_sizes (greedy, the same prompts, a fixed number of new tokens, prefill
  included), after quantize.bench.warmup calls, the median of quantize.bench.repeats calls, the two
  models timed in turn so that a busy machine slows both alike; perf/speedup_b{B} = quant / float;
- gold/float, gold/quant: the gold judge's score of greedy answers to the held-out prompts
  (eval.num_prompts; as the SFT stage scores), and gold/agreement, the share of identical answers.

The figures are of the model as read back from the written file (check/reload_max_abs_logit_diff
says it computes what was quantised). The float model stays the default of generate, export and
serve: a quantised run is used by naming it (init_from=outputs/quantize/<name>). Its model.pt
records the source's stage, so generate and serve still send chat prompts to an instruction-tuned model.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from pipeline import runs
from pipeline.errors import UserError
from pipeline.evaluate import bench_prompts, gold_eval, gold_prompts, tokens_per_s
from pipeline.files import write_json
from pipeline.model import GPT, quant
from pipeline.stages import STAGES
from pipeline.tokenizer import save_tokenizer

log = logging.getLogger(__name__)

ANSWERS_FILE = "gold_answers.json"


def load_float(cfg: DictConfig, run_dir: Path):
    """(model, tokenizer, payload, path) of the float policy to quantise; a reward model or a quantised file is refused."""
    model, tokenizer, payload, path = runs.load_start(cfg.init_from, STAGES["quantize"].starts_from, Path(cfg.paths.root), "quantize", run_name=run_dir.name)
    if payload.get("kind") == "scalar":
        raise UserError(f"init_from={path} is a reward model (a scalar head), not a policy: quantise an sft, ppo or pretrain run")
    if quant.is_quantized(model):
        source = payload.get("extra", {}).get("source", "its float source")
        raise UserError(f"init_from={path} is quantised already ({model.quant_settings.method}): quantise {source} instead")
    return model.eval(), tokenizer, payload, path


def max_logit_diff(a: GPT, b: GPT, vocab_size: int, block_size: int) -> float:
    """The largest logit difference of two models on a fixed probe batch (seeded, so every run probes alike)."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (2, min(16, block_size)), generator=generator)
    with torch.no_grad():
        return float((a(ids).float() - b(ids).float()).abs().max())


def change(quantised: float, floating: float) -> str:
    """'1.8x faster' / '35% slower': how the quantised figure compares, in the words of the log line."""
    if floating <= 0:
        return "n/a"
    ratio = quantised / floating
    return f"{ratio:.2f}x faster" if ratio >= 1 else f"{(1 - ratio) * 100:.0f}% slower"


def run(cfg: DictConfig, run_dir: Path) -> dict:
    started = time.time()
    q = cfg.quantize
    model, tokenizer, payload, path = load_float(cfg, run_dir)
    source_stage = payload.get("stage")
    settings = quant.settings_for(str(q.method), int(q.group_size), str(q.dtype), tied=model.lm_head.weight is model.wte.weight)
    if not quant.targets(model, settings)[0]:
        raise UserError(
            f"quantize.group_size={settings.group_size}: no Linear layer of {path} fits int4 with it (input widths must be multiples "
            f"of the group size, output widths of {quant.INT4_ROWS}): try quantize.group_size=32 or quantize.method=int8"
        )
    float_bytes = len(runs.encode_model(model, "lm", source_stage)[0])  # the source as a float32 model.pt (a LoRA run's own file holds its adapter only)

    quantised = quant.quantize_model(copy.deepcopy(model), settings)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_tokenizer(tokenizer, run_dir / runs.TOKENIZER_DIR)
    # The source's stage, not "quantize": generate and serve decide chat prompts by it (an SFT model answers through the template).
    runs.save_model(run_dir / runs.MODEL_FILE, quantised, kind="lm", stage=source_stage, extra={"source": str(path)})
    quant_bytes = (run_dir / runs.MODEL_FILE).stat().st_size
    # From here on, the model as read back from the file: the figures are those of what generate and serve will load.
    reloaded = runs.build_model(runs.load_model_payload(run_dir / runs.MODEL_FILE), GPT, run_dir / runs.MODEL_FILE)
    reload_diff = max_logit_diff(quantised, reloaded, model.config.vocab_size, model.config.block_size)
    del quantised
    record = quant.record(reloaded)
    metrics: dict = {
        "stage": "quantize",
        "method": settings.method,
        "source": str(path),
        "source_stage": source_stage,
        "parents": runs.parent_record(init_from=path),
        "quant/settings": settings.to_dict(),
        "quant/modules": len(record["modules"]),
        "quant/float_modules": record["float_modules"],
        "quant/torchao": record["torchao"],
        "model/params": model.num_params(),
        "file/float_bytes": float_bytes,
        "file/quant_bytes": quant_bytes,
        "file/ratio": float_bytes / quant_bytes,
        "check/reload_max_abs_logit_diff": reload_diff,
        "check/max_abs_logit_diff": max_logit_diff(model, reloaded, model.config.vocab_size, model.config.block_size),
        "perf/threads": torch.get_num_threads(),
        "perf/new_tokens": int(q.bench.new_tokens),
    }
    log.info(
        "%s: %d layers quantised (%s), model.pt %.2f MB against %.2f MB float32 (%.2fx smaller)",
        settings.method, len(record["modules"]), settings.dtype, quant_bytes / 1e6, float_bytes / 1e6, float_bytes / quant_bytes,
    )

    batch_sizes = [int(b) for b in q.bench.batch_sizes]
    prompts = bench_prompts(tokenizer, max(batch_sizes), model.config.block_size, int(q.bench.new_tokens))
    models = {"float": model, "quant": reloaded}
    for b in batch_sizes:
        speed = tokens_per_s(models, prompts, tokenizer.pad_token_id, b, int(q.bench.new_tokens), int(q.bench.warmup), int(q.bench.repeats))
        metrics[f"perf/float_tokens_per_s_b{b}"], metrics[f"perf/quant_tokens_per_s_b{b}"] = speed["float"], speed["quant"]
        metrics[f"perf/speedup_b{b}"] = speed["quant"] / speed["float"]
        log.info("batch %d: %.0f tokens/s quantised, %.0f float (%s, %d threads)", b, speed["quant"], speed["float"], change(speed["quant"], speed["float"]), torch.get_num_threads())

    gold = gold_prompts(cfg)
    if gold:
        max_new, batch = int(cfg.eval.max_new_tokens), int(cfg.eval.batch_size)
        metrics["gold/float"], float_rows = gold_eval(model, tokenizer, gold, max_new, batch)
        metrics["gold/quant"], quant_rows = gold_eval(reloaded, tokenizer, gold, max_new, batch)
        metrics["gold/diff"] = metrics["gold/quant"] - metrics["gold/float"]
        metrics["gold/agreement"] = sum(f["response"] == r["response"] for f, r in zip(float_rows, quant_rows)) / len(gold)
        rows = [
            {"prompt": f["prompt"], "float": f["response"], "float_gold": f["gold"], "quant": r["response"], "quant_gold": r["gold"]}
            for f, r in zip(float_rows, quant_rows)
        ]
        write_json(run_dir / ANSWERS_FILE, rows)
        log.info(
            "gold score on %d held-out prompts: %.4f quantised, %.4f float; %.0f%% of the answers identical",
            len(gold), metrics["gold/quant"], metrics["gold/float"], 100 * metrics["gold/agreement"],
        )
    metrics["time/total_s"] = time.time() - started
    write_json(run_dir / runs.METRICS_FILE, metrics)
    return metrics
