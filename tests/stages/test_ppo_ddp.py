"""PPO under 2-process DDP is the algorithm of one process: one kl_coef, one set of weights, exact resume, a clean stop."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

JOB = Path(__file__).with_name("ppo_ddp_job.py")


def job(out: Path, iterations: int, *flags: str, timeout: int = 240) -> subprocess.CompletedProcess:
    # Its own session: --die-after kills the job's process group, never pytest.
    return subprocess.run([sys.executable, str(JOB), str(out), str(iterations), *flags], capture_output=True, text=True, timeout=timeout, start_new_session=True)


def ranks(out: Path) -> list[dict]:
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


def assert_same_weights(a: dict, b: dict) -> None:
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


@pytest.mark.slow
def test_ranks_agree_and_a_killed_job_resumes_to_the_uninterrupted_result(tmp_path):
    straight = job(tmp_path / "straight", 6)
    assert straight.returncode == 0, straight.stderr[-3000:]
    r0, r1 = ranks(tmp_path / "straight")
    assert r0["iteration"] == r1["iteration"] == 6
    assert r0["kl_coef"] == r1["kl_coef"] != 0.1  # the controller moved, by the same global KL on both ranks
    assert_same_weights(r0["actor"], r1["actor"])
    assert_same_weights(r0["critic"], r1["critic"])

    killed = job(tmp_path / "resumed", 6, "--die-after", "3")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not (tmp_path / "resumed" / "rank0.pt").exists()
    resumed = job(tmp_path / "resumed", 6)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for straight_rank, resumed_rank in zip(ranks(tmp_path / "straight"), ranks(tmp_path / "resumed")):
        assert resumed_rank["kl_coef"] == straight_rank["kl_coef"]
        assert_same_weights(straight_rank["actor"], resumed_rank["actor"])
        assert_same_weights(straight_rank["critic"], resumed_rank["critic"])


@pytest.mark.slow
def test_a_divergence_on_one_rank_stops_both_with_one_message(tmp_path):
    result = job(tmp_path / "nan", 6, "--nan-rank", "1", "--nan-at", "2", timeout=180)  # before the fix: rank 0 hung in the next collective
    assert result.returncode == 2, result.stderr[-3000:]
    assert "PPO diverged at iteration 2" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "nan" / "rank0.pt").exists()
