"""The pretraining stage through the real entry point: Hydra, Lightning, W&B offline, resume, DDP (bad input: tests/test_bad_input.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers import TINY, run_pipeline
from transformers import AutoTokenizer, PreTrainedTokenizerFast
from wandb_records import artifacts, logged_metrics, read_records, run_file


def only_run_dir(root: Path, stage: str) -> Path:
    dirs = [d for d in (root / stage).iterdir() if d.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def test_pretrain_runs_and_writes_its_run_directory(corpus, outputs_root):
    run_pipeline("stage=pretrain", f"data.path={corpus}", "trainer.max_steps=12", "trainer.val_check_interval=6", *TINY, root=outputs_root)
    run_dir = only_run_dir(outputs_root, "pretrain")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train/steps"] == 12
    assert math.isfinite(metrics["val/loss"]) and metrics["val/ppl"] == pytest.approx(math.exp(metrics["val/loss"]), rel=1e-4)
    # Twelve steps already beat a uniform guess over the vocabulary.
    assert metrics["val/loss"] < math.log(320)
    assert metrics["perf/tokens_per_s"] > 0 and metrics["baseline/unigram_xent"] > 0
    # Where the time went (pipeline/timing.py): every phase that ran holds time, and none overlap.
    phases = metrics["time/phases"]
    assert all(phases[k] > 0 for k in ("start", "data", "train steps", "validation", "checkpoints", "finish")), phases
    assert sum(v for k, v in phases.items() if k != "start") == pytest.approx(metrics["time/total_s"], abs=1.0)
    for name in (".hydra/config.yaml", "checkpoints/last.ckpt", "checkpoints/best.ckpt", "model.pt", "tokenizer/tokenizer.json"):
        assert (run_dir / name).is_file(), name
    tok = AutoTokenizer.from_pretrained(run_dir / "tokenizer")
    assert isinstance(tok, PreTrainedTokenizerFast) and tok.pad_token_id != tok.eos_token_id

    records = read_records(run_file(run_dir))
    history = logged_metrics(records)
    assert len(history["train/loss"]) >= 10 and all(math.isfinite(v) for v in history["train/loss"])
    assert history["val/loss"][-1] == pytest.approx(metrics["val/loss"], rel=1e-4)
    assert history["samples/pretrain/_type"][-1] == "table-file"  # sample generations, as a W&B table
    assert history["samples/pretrain/nrows"][-1] == 2
    logged = artifacts(records)
    assert {a.type for a in logged} >= {"model"}
    names = [a.name for a in logged]
    assert any(n.startswith("pretrain-model") for n in names), names
    assert any(f.path.endswith("model.pt") for a in logged for f in a.manifest.contents)

    # The same command again finds the finished run and leaves it alone.
    again = run_pipeline("stage=pretrain", f"data.path={corpus}", "trainer.max_steps=12", "trainer.val_check_interval=6", *TINY, root=outputs_root)
    assert "already holds a finished pretrain run" in again.stdout + again.stderr
    assert json.loads((run_dir / "metrics.json").read_text()) == metrics


@pytest.mark.slow
def test_two_process_ddp_on_cpu(corpus, outputs_root):
    run_pipeline(
        "stage=pretrain",
        f"data.path={corpus}",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.max_steps=6",
        "trainer.val_check_interval=3",
        "logger=csv",
        *TINY,
        root=outputs_root,
        timeout=400,
    )
    run_dir = only_run_dir(outputs_root, "pretrain")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train/steps"] == 6
    # Two ranks each see data.batch_size blocks a step.
    assert metrics["train/tokens"] == 6 * 8 * 64 * 2
