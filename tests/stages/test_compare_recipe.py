"""`python -m pipeline recipe=compare` at toy size: every method from one SFT model, on one budget, in one table."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import finished_run, run_pipeline, tiny_model
from pipeline import runs
from pipeline.model import ScalarGPT

TOY = [
    "~compare.methods.grpo_rm",  # the two online stages (DPO's run alone: tests/stages/test_dpo.py; the plan of all five: tests/tools/test_compare.py)
    "~compare.methods.rloo_rm",
    "~compare.methods.dpo",
    "compare.seeds=1",
    "compare.completions=8",  # PPO: 8 / 4 prompts = 2 iterations; GRPO: 8 / (2 prompts x 2 samples) = 2
    "ppo.rollout_batch_size=4",
    "ppo.minibatch_size=2",
    "ppo.max_new_tokens=6",
    "ppo.eval_prompts=4",
    "ppo.eval_every=1",
    "grpo.prompts_per_rollout=2",
    "grpo.group_size=2",
    "grpo.minibatch_size=2",
    "grpo.max_new_tokens=6",
    "grpo.eval_prompts=4",
    "grpo.eval_every=1",
    "trainer.max_steps=2",
    "trainer.val_check_interval=1",
    "trainer.limit_val_batches=1",
    "data.batch_size=4",
    "eval.num_prompts=4",
    "eval.max_new_tokens=6",
    "logger=csv",
]


@pytest.mark.slow
def test_compare_runs_every_method_from_one_sft_model_on_one_budget_and_writes_the_table(tmp_path, tokenizer):
    root = tmp_path / "outputs"
    sft = finished_run(root, "sft", "given", tiny_model(block_size=128), tokenizer)
    torch.manual_seed(0)
    reward = root / "reward" / "given"
    runs.save_model(reward / runs.MODEL_FILE, ScalarGPT(tiny_model(block_size=128).config), kind="scalar", stage="reward", extra={"reward_mean": 0.0, "reward_std": 1.0})
    (reward / runs.METRICS_FILE).write_text(json.dumps({"stage": "reward"}))
    (reward / runs.TOKENIZER_DIR).symlink_to(sft / runs.TOKENIZER_DIR)
    run_pipeline("recipe=compare", "recipe.stages=[]", f"init_from={sft}", f"reward_from={reward}", *TOY, "hydra.run.dir=" + str(root / "all" / "toy"), root=root, timeout=900)

    methods = {"ppo": "ppo", "grpo_gold": "grpo"}
    metrics = {m: json.loads((root / stage / f"toy-{m}-s0" / "metrics.json").read_text()) for m, stage in methods.items()}
    assert all(m["init_from"] == str(sft / runs.MODEL_FILE) for m in metrics.values())
    assert metrics["ppo"]["reward_from"] == str(reward / runs.MODEL_FILE) and "reward_from" not in metrics["grpo_gold"]
    assert metrics["ppo"]["train/iterations"] == 2 and metrics["grpo_gold"]["train/episodes"] == 8
    assert all("gold/final" in m and "final/kl" in m for m in metrics.values())

    page = (root / "all" / "toy" / "compare.md").read_text()
    table = [line for line in page.split("## Every run")[0].splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split("|")[1].strip() for row in table] == list(methods)
    assert all(row.split("|")[3].strip() == "1/1" for row in table)
    assert (root / "all" / "toy" / "compare_kl.png").is_file() and (root / "all" / "toy" / "compare_gold.png").is_file()
