"""The pretraining stage through the real entry point: Hydra, Lightning, W&B offline, resume, DDP, bad input."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from helpers import REPO, TINY, run_pipeline
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


def test_killed_run_resumes_with_the_same_command(corpus, outputs_root):
    args = ["stage=pretrain", f"data.path={corpus}", "trainer.max_steps=400", "trainer.val_check_interval=5", "logger=csv", *TINY]
    env = {**os.environ, "PIPELINE_OUTPUTS": str(outputs_root)}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    last = None
    while time.time() < deadline:
        found = list(outputs_root.glob("pretrain/*/checkpoints/last.ckpt"))
        if found:
            last = found[0]
            time.sleep(1.0)
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert last is not None, "no checkpoint appeared before the deadline"
    import torch

    step_at_kill = torch.load(last, map_location="cpu", weights_only=False)["global_step"]
    assert 0 < step_at_kill < 400
    assert not (last.parents[1] / "metrics.json").exists()

    resumed = run_pipeline(*args, root=outputs_root, timeout=600)
    assert "Restoring states from the checkpoint" in resumed.stdout + resumed.stderr
    metrics = json.loads((last.parents[1] / "metrics.json").read_text())
    assert metrics["train/steps"] == 400


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


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.path=/no/such/corpus.jsonl"], "/no/such/corpus.jsonl"),
        (["data.seq_len=512"], "data.seq_len=512 is longer than the model's context model.block_size=64"),
    ],
)
def test_bad_input_exits_with_one_clear_message(corpus, outputs_root, overrides, message):
    result = run_pipeline("stage=pretrain", f"data.path={corpus}", *TINY, *overrides, root=outputs_root, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_mistyped_key_is_named(outputs_root):
    result = run_pipeline("stage=pretrain", "trainer.max_stepz=3", root=outputs_root, check=False)
    assert result.returncode != 0
    assert "max_stepz" in result.stderr


def test_empty_file_and_missing_column(tmp_path, outputs_root):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = run_pipeline("stage=pretrain", f"data.path={empty}", *TINY, root=outputs_root, check=False)
    assert result.returncode == 2 and str(empty) in result.stderr
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text("".join(json.dumps({"body": f"row {i}"}) + "\n" for i in range(20)))
    result = run_pipeline("stage=pretrain", f"data.path={wrong}", *TINY, root=outputs_root, check=False)
    assert result.returncode == 2 and "body" in result.stderr and "text" in result.stderr


def test_checkpoint_of_another_architecture_is_refused(corpus, outputs_root):
    run_pipeline("stage=pretrain", f"data.path={corpus}", "trainer.max_steps=2", "trainer.val_check_interval=2", "logger=csv", *TINY, root=outputs_root)
    ckpt = only_run_dir(outputs_root, "pretrain") / "checkpoints" / "last.ckpt"
    result = run_pipeline(
        "stage=pretrain", f"data.path={corpus}", "trainer.max_steps=4", "logger=csv", *TINY, "model.n_layer=3", f"ckpt_path={ckpt}", root=outputs_root, check=False
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "n_layer" in result.stderr and str(ckpt) in result.stderr
