"""GRPO under 2-process DDP: disjoint prompts, one set of weights, and a reward function failing on one rank stops both."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

JOB = Path(__file__).with_name("grpo_ddp_job.py")


@pytest.mark.slow
def test_ranks_draw_disjoint_prompts_keep_one_set_of_weights_and_stop_together(tmp_path):
    out = tmp_path / "job"
    out.mkdir()
    result = subprocess.run([sys.executable, str(JOB), str(out), "5", "--fail-rank", "1", "--fail-at", "3"], capture_output=True, text=True, timeout=240)
    r0, r1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["iteration"] == r1["iteration"] == 3, result.stderr[-3000:]  # three iterations done, the fourth's reward failed
    for name in r0["actor"]:
        assert torch.equal(r0["actor"][name], r1["actor"][name]), name
    for mine, theirs in zip(r0["drawn"], r1["drawn"]):
        assert len(mine) == len(theirs) == 4 and not set(mine) & set(theirs)  # groups never span ranks
    # Rank 1 names the function; rank 0, whose own rewards were fine, stops at the same all-reduce instead of hanging.
    assert result.returncode == 2, result.stderr[-3000:]
    assert "reward function graded raised RuntimeError: the grader is down on rank 1" in result.stderr
    assert "a reward function failed on another process" in result.stderr and "Traceback" not in result.stderr
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["grpo_state"]["iteration"] == 3
