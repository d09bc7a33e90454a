"""Exact resume: a run killed mid-epoch and started again with the same command trains as if never stopped.

The data position (epoch and batches already trained on), every random generator, the optimiser and the
schedule come back from last.ckpt; the resumed run's per-step losses equal an uninterrupted run's.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from pydoc_data.topics import topics

from helpers import TINY, kill_when, run_pipeline, start_pipeline
from pipeline.data.samplers import GroupedSampler, ResumableSampler, ShuffledSampler
from pipeline.training import Batches, ExactResume, history_series, read_history

# ---------------------------------------------------------------------------------------------
# The mechanism, in process: a small module with dropout and draws from Python's and NumPy's generators


class Stop(Exception):
    pass


class Noisy(pl.LightningModule):
    """Records, per step, the batch's rows, the loss (through dropout) and one draw of each global generator."""

    def __init__(self, stop_at: int | None = None, estimated: bool = False):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.3), torch.nn.Linear(16, 1))
        self.stop_at, self.estimated, self.steps = stop_at, estimated, []

    def training_step(self, batch, batch_idx):
        if self.global_step == self.stop_at:
            raise Stop
        loss = (self.net(batch["x"]).squeeze(-1) - batch["y"]).pow(2).mean()
        self.steps.append((self.global_step + 1, batch["i"].tolist(), loss.item(), random.random(), float(np.random.rand())))
        return loss

    def validation_step(self, batch, batch_idx):
        pass

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2)
        # estimated_stepping_batches builds the train loader before the checkpoint is restored (Lightning #20550)
        total = self.trainer.estimated_stepping_batches if self.estimated else 40
        schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / (total + 1))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def fit(ckpt_dir: Path, every: int, grouped: bool, estimated: bool, stop_at: int | None = None, ckpt_path: str | None = None) -> list:
    pl.seed_everything(0, verbose=False)
    module = Noisy(stop_at, estimated)
    x = torch.randn(45, 4, generator=torch.Generator().manual_seed(0))
    rows = [{"x": x[i], "y": x[i].sum(), "i": i} for i in range(45)]  # 11 batches of 4 an epoch
    data = Batches(rows, rows[:8], 4, lengths=[i % 7 for i in range(45)] if grouped else None, seed=0)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=-1 if estimated else 40, max_epochs=4 if estimated else -1,
        val_check_interval=every, check_val_every_n_epoch=None, limit_val_batches=1, num_sanity_val_steps=0,
        logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=ckpt_dir, save_last=True), ExactResume()],
    )
    try:
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
    except Stop:
        pass
    return module.steps


@pytest.mark.parametrize(
    "resume_step, every, grouped, estimated",
    [
        (10, 5, False, False),  # mid-epoch 0, plain shuffling
        (15, 5, True, False),  # mid-epoch 1, grouped by length
        (22, 11, False, True),  # at the end of epoch 1; the schedule reads estimated_stepping_batches
        (21, 7, True, True),  # mid-epoch 1, grouped, estimated_stepping_batches
    ],
)
def test_resumed_fit_draws_the_same_batches_and_random_numbers(tmp_path, resume_step, every, grouped, estimated):
    whole = fit(tmp_path / "whole", every, grouped, estimated)
    fit(tmp_path / "killed", every, grouped, estimated, stop_at=resume_step + 2)
    last = tmp_path / "killed" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)  # tensors and plain types only
    assert checkpoint["global_step"] == resume_step
    epoch, done = divmod(resume_step, 11)
    assert {k: checkpoint["Batches"][k] for k in ("epoch", "batches")} == {"epoch": epoch, "batches": done}
    # Plain shuffling draws each epoch's seed from torch's generator, as RandomSampler does; the running epoch's is kept.
    assert ("seed" in checkpoint["Batches"]) == (not grouped and done > 0)
    resumed = fit(tmp_path / "killed", every, grouped, estimated, ckpt_path=str(last))
    assert resumed == [s for s in whole if s[0] > resume_step]


def test_resumable_sampler_deals_whole_batches_to_ranks_and_skips_what_was_trained():
    rng = random.Random(0)
    lengths = [rng.randint(5, 80) for _ in range(203)]
    source = GroupedSampler(4, lengths, seed=2)
    full = source.order(3)
    batches = [full[i : i + 4] for i in range(0, 200, 4)]  # 50 full batches; the 3 rows left over are dropped
    alone = ResumableSampler(source, 4)
    alone.set_epoch(3)
    assert list(alone) == full[:200] and len(alone) == 200  # one process: the source's order
    ranks = [ResumableSampler(source, 4, num_replicas=3, rank=r) for r in range(3)]
    for r, sampler in enumerate(ranks):
        sampler.set_epoch(3)
        assert list(sampler) == [i for b in batches[r:48:3] for i in b]  # batch k goes whole to rank k % 3; 16 each
        assert len(sampler) == 16 * 4
        sampler.resume(3, 5 * 3)  # each rank trained on 5 batches of epoch 3
        assert list(sampler) == [i for b in batches[15 + r : 48 : 3] for i in b]
    # Under DDP plain shuffling is a function of (seed, epoch); on one process it is RandomSampler's order.
    assert ShuffledSampler(10, seed=1, draw=False).order(0) == ShuffledSampler(10, seed=1, draw=False).order(0) != ShuffledSampler(10, seed=1, draw=False).order(1)
    torch.manual_seed(5)
    ours = ShuffledSampler(10)
    ours_orders = [ours.order(0), ours.order(1), ours.order(0)]
    torch.manual_seed(5)
    theirs = torch.utils.data.RandomSampler(range(10))
    assert ours_orders == [list(theirs), list(theirs), ours_orders[0]]  # an epoch's order, once drawn, is kept


# ---------------------------------------------------------------------------------------------
# Each stage through `python -m pipeline`: uninterrupted, and killed with SIGKILL then rerun

STEPS, EVERY, KILL_AFTER = 25, 5, 10
# Every stage with dropout on, so that torch's generator matters; SFT and reward take the model from their parent.
COMMON = [f"trainer.max_steps={STEPS}", f"trainer.val_check_interval={EVERY}", "logger=csv", "model.dropout=0.1", "data.batch_size=8", "trainer.limit_val_batches=2", "trainer.log_every_n_steps=1"]


def count_to(n: int) -> str:
    return " ".join(str(k) for k in range(1, n + 1))


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def stage_run(root: Path, stage: str) -> Path:
    [run_dir] = [d for d in (root / stage).iterdir() if d.is_dir()]
    return run_dir


def saved_step(root: Path, stage: str) -> int | None:
    for path in root.glob(f"{stage}/*/checkpoints/last.ckpt"):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)["global_step"]
        except Exception:  # being written
            return None
    return None


def stderr_of(root: Path) -> str:
    return (root / "stderr.txt").read_text()[-5000:]


def killed_and_rerun(args: list[str], root: Path, stage: str) -> dict:
    """Run the command, SIGKILL it once last.ckpt holds step KILL_AFTER or later, run it again; the checkpoint resumed from."""
    proc = start_pipeline(args, root)
    kill_when(proc, lambda: (saved_step(root, stage) or 0) >= KILL_AFTER, root / "stderr.txt")
    run_dir = stage_run(root, stage)
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert KILL_AFTER <= checkpoint["global_step"] < STEPS and not (run_dir / "metrics.json").exists()
    resumed = run_pipeline(*args, root=root)
    assert "Restoring states from the checkpoint" in resumed.stdout + resumed.stderr
    assert "not resumable" not in resumed.stdout + resumed.stderr  # Lightning's warning would be wrong here
    return checkpoint


def both(tmp_path_factory, stage: str, args: list[str]) -> tuple[Path, Path, dict]:
    """(uninterrupted run dir, killed-and-resumed run dir, the checkpoint it resumed from): one command under two roots.

    The uninterrupted run goes on beside the killed one: CPU results do not depend on what else runs.
    """
    whole, killed = tmp_path_factory.mktemp(f"{stage}_whole"), tmp_path_factory.mktemp(f"{stage}_killed")
    proc = start_pipeline(args, whole)
    try:
        checkpoint = killed_and_rerun(args, killed, stage)
    finally:
        proc.wait(timeout=300)
    assert proc.returncode == 0, stderr_of(whole)
    return stage_run(whole, stage), stage_run(killed, stage), checkpoint


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Small data in each stage's format (the embedded task's 20,000 SFT rows and 108,000 pairs take minutes to tokenise), a shared cache."""
    d = tmp_path_factory.mktemp("data")
    sft = [{"prompt": f"Count to {n} ({i}):", "completion": count_to(n)} for i in range(16) for n in range(1, 21)]  # lengths vary: grouped batches
    prefs = [{"prompt": f"Count to {n} ({i}):", "chosen": count_to(n), "rejected": count_to(n + k)} for i in range(6) for n in range(1, 21) for k in (1, 2, 3)]
    return {
        "corpus": jsonl(d / "corpus.jsonl", [{"text": topics[k]} for k in sorted(topics)[:2]]),  # about 14 batches an epoch
        "sft": jsonl(d / "sft.jsonl", sft),  # 38 batches an epoch
        "prefs": jsonl(d / "prefs.jsonl", prefs),  # 3 pairs a prompt, kept in one batch; 42 batches an epoch
        "cache": tmp_path_factory.mktemp("cache"),
    }


@pytest.fixture(scope="module")
def pretrain(tmp_path_factory, files):
    return both(tmp_path_factory, "pretrain", ["stage=pretrain", f"data.path={files['corpus']}", f"paths.cache_dir={files['cache']}", *[o for o in TINY if o not in COMMON], *COMMON])


@pytest.fixture(scope="module")
def sft(tmp_path_factory, files, pretrain):
    return both(tmp_path_factory, "sft", ["stage=sft", f"data.path={files['sft']}", f"init_from={pretrain[0]}", f"paths.cache_dir={files['cache']}", *COMMON])


@pytest.fixture(scope="module")
def reward(tmp_path_factory, files, sft):
    return both(tmp_path_factory, "reward", ["stage=reward", f"data.path={files['prefs']}", f"init_from={sft[0]}", f"paths.cache_dir={files['cache']}", *COMMON])


@pytest.fixture(scope="module")
def dpo(tmp_path_factory, files, sft):
    # The reference's log-probs are computed before training and cached; the resumed process reads them back.
    evaluation = ["eval.num_prompts=8", "eval.max_new_tokens=8"]
    return both(tmp_path_factory, "dpo", ["stage=dpo", f"data.path={files['prefs']}", f"init_from={sft[0]}", f"paths.cache_dir={files['cache']}", *COMMON, *evaluation])


def assert_same_training(whole: Path, resumed: Path, checkpoint: dict, final_keys: list[str]) -> None:
    assert checkpoint["Batches"]["batches"] > 0, checkpoint["Batches"]  # killed mid-epoch
    assert "ExactResume" in checkpoint["callbacks"]
    a, b = read_history(whole / "history.jsonl"), read_history(resumed / "history.jsonl")
    keys = {k for row in a for k in row if k != "step" and not k.startswith("perf/")}
    assert "train/loss" in keys and "val/loss" in keys
    for key in sorted(keys):
        steps, values = history_series(a, key)
        assert history_series(b, key) == (steps, values), key  # steps after the kill come from the resumed process
    assert history_series(b, "train/loss")[0][-1] == STEPS - 1  # the loggers count steps from 0
    ma, mb = json.loads((whole / "metrics.json").read_text()), json.loads((resumed / "metrics.json").read_text())
    for key in final_keys:
        assert mb[key] == ma[key], key


def test_pretrain_resumes_exactly(pretrain):
    whole, resumed, checkpoint = pretrain
    assert_same_training(whole, resumed, checkpoint, ["val/loss", "train/steps"])


def test_sft_resumes_exactly(sft):
    whole, resumed, checkpoint = sft
    assert_same_training(whole, resumed, checkpoint, ["val/loss", "val/ppl"])


def test_reward_resumes_exactly(reward):
    whole, resumed, checkpoint = reward
    assert_same_training(whole, resumed, checkpoint, ["val/accuracy", "validation/margin", "normalise/reward_mean"])


def test_dpo_resumes_exactly(dpo):
    whole, resumed, checkpoint = dpo
    assert (resumed / "reference_logps.pt").is_file()
    assert_same_training(whole, resumed, checkpoint, ["val/loss", "val/rewards/accuracies", "val/rewards/margins", "final/kl"])


@pytest.mark.slow
def test_sft_under_two_process_ddp_resumes_exactly(tmp_path_factory, files, pretrain):
    """Each rank trains on its own whole batches with its own dropout draws; the checkpoint holds both ranks' generators."""
    args = ["stage=sft", f"data.path={files['sft']}", f"init_from={pretrain[0]}", f"paths.cache_dir={files['cache']}", *COMMON]
    whole, resumed, checkpoint = both(tmp_path_factory, "sft", [*args, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"])
    assert len(checkpoint["callbacks"]["ExactResume"]["ranks"]) == 2
    assert_same_training(whole, resumed, checkpoint, ["val/loss", "val/ppl"])
