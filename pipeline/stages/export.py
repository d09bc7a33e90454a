"""`python -m pipeline stage=export`: a finished run as a Hugging Face `transformers` folder with its tokenizer.

    python -m pipeline stage=export                          # the newest finished ppo, else grpo, dpo, sft, pretrain run
    python -m pipeline stage=export init_from=outputs/sft/default export.out_dir=my_model
    python -m pipeline stage=sft init_from=path/to/hf_folder # any stage starts from a transformers folder

The mapping itself (GPT-2 or Llama, both ways) is pipeline/model/hf.py.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from omegaconf import DictConfig

from pipeline import runs
from pipeline.files import write_json
from pipeline.model.hf import export
from pipeline.stages import STAGES

log = logging.getLogger(__name__)


def run(cfg: DictConfig, run_dir: Path) -> dict:
    started = time.time()
    model, tokenizer, payload, path = runs.load_start(cfg.init_from, STAGES["export"].starts_from, Path(cfg.paths.root), "export", run_name=run_dir.name)
    out_dir = Path(cfg.export.out_dir) if cfg.export.out_dir else run_dir / "hf"
    if payload.get("kind") == "scalar":
        # Our score head has a bias; transformers' *ForSequenceClassification heads have none, so only the backbone goes.
        log.warning("%s is a scalar (reward/value) model: exporting its backbone as a causal LM, without the score head", path)
    figures = export(model, tokenizer, out_dir, dtype=str(cfg.export.dtype))
    metrics = {
        "stage": "export",
        "source": str(path),
        "source_stage": payload.get("stage"),
        "parents": runs.parent_record(init_from=path),
        "out_dir": str(out_dir),
        "model/params": model.num_params(),
        "time/total_s": time.time() - started,
        **figures,
    }
    log.info("exported %s to %s as %s (max logit difference %.2g)", path, out_dir, figures["architecture"], figures["check/max_abs_logit_diff"])
    write_json(run_dir / runs.METRICS_FILE, metrics)
    return metrics
