"""`python -m pipeline`: every stage in order, chained by init_from, W&B lineage, the report, and a rerun that skips finished stages."""

from __future__ import annotations

import json
import re

import pytest
from console_lines import noise
from helpers import run_pipeline
from wandb_records import artifacts, logged_metrics, read_records, run_file

TINY_ALL = [
    "model.n_layer=1",
    "model.n_head=2",
    "model.n_embd=32",
    "model.block_size=128",
    "tokenizer.vocab_size=400",
    "trainer.max_steps=4",
    "trainer.val_check_interval=2",
    "trainer.limit_val_batches=2",
    "data.batch_size=4",
    "samples.num_prompts=1",
    "eval.num_prompts=4",
    "eval.max_new_tokens=8",
    "reward.policy_pairs=16",
    "reward.policy_pairs_test=8",
    "reward.policy_max_new_tokens=8",
    "ppo.iterations=2",
    "ppo.rollout_batch_size=4",
    "ppo.minibatch_size=2",
    "ppo.eval_prompts=4",
    "ppo.max_new_tokens=8",
    "ppo.eval_every=1",
    "ppo.save_every=1",  # PPO's own checkpoint saves, whose console notices tests/console_lines.py rules out
    "trainer.log_every_n_steps=1",
    'recipe.overrides.reward=["trainer.max_steps=5"]',  # reaches the reward stage alone
]


@pytest.mark.slow
def test_whole_pipeline_chains_the_stages_records_lineage_writes_its_report_and_resumes_by_skipping(outputs_root):
    first = run_pipeline(*TINY_ALL, root=outputs_root, timeout=900)
    assert noise(first.stdout + first.stderr) == []  # every stage, PPO's checkpoint saves and frozen models too
    names = {stage: [d for d in (outputs_root / stage).iterdir() if d.is_dir()] for stage in ("pretrain", "sft", "reward", "ppo")}
    assert all(len(dirs) == 1 for dirs in names.values()), names
    name = names["pretrain"][0].name
    assert all(dirs[0].name == name for dirs in names.values())
    metrics = {stage: json.loads((outputs_root / stage / name / "metrics.json").read_text()) for stage in names}
    assert metrics["sft"]["init_from"] == str(outputs_root / "pretrain" / name / "model.pt")
    assert metrics["reward"]["init_from"] == str(outputs_root / "sft" / name / "model.pt")
    assert metrics["ppo"]["init_from"] == str(outputs_root / "sft" / name / "model.pt")
    assert metrics["ppo"]["reward_from"] == str(outputs_root / "reward" / name / "model.pt")
    assert "gold/start" in metrics["ppo"] and "gold/final" in metrics["ppo"] and metrics["ppo"]["train/iterations"] == 2
    assert (metrics["reward"]["train/steps"], metrics["sft"]["train/steps"], metrics["pretrain"]["train/steps"]) == (5, 4, 4)
    assert_lineage(outputs_root, name)
    assert_report(outputs_root / "all" / name, metrics)

    again = run_pipeline(*TINY_ALL, root=outputs_root, timeout=300)
    assert (again.stdout + again.stderr).count("already holds a finished") == 4


def assert_lineage(root, name):
    """Each stage is a W&B run of the pipeline's group, typed by its stage, that logs its model and
    declares the models it started from as inputs (the same artifact: same name, same digest)."""
    records = {stage: read_records(run_file(root / stage / name)) for stage in ("pretrain", "sft", "reward", "ppo")}
    logged, used = {}, {}
    for stage, recs in records.items():
        (run,) = [r.run for r in recs if r.WhichOneof("record_type") == "run"][:1]
        assert (run.run_group, run.job_type) == (f"pipeline-{name}", stage)
        for a in artifacts(recs):
            (used if a.use_after_commit else logged).setdefault(stage, {})[a.name] = a.digest
    model = {stage: f"{stage}-model-{name}" for stage in records}
    assert all(model[stage] in logged[stage] for stage in records), logged
    assert "pretrain" not in used
    assert used["sft"] == {model["pretrain"]: logged["pretrain"][model["pretrain"]]}
    assert used["reward"] == {model["sft"]: logged["sft"][model["sft"]]}
    assert used["ppo"] == {model["sft"]: logged["sft"][model["sft"]], model["reward"]: logged["reward"][model["reward"]]}


def assert_report(pipeline_dir, metrics):
    """report.md: a row of figures per stage (read from its metrics.json), the plots, the answers side by side."""
    import matplotlib.image

    report = (pipeline_dir / "report.md").read_text()
    figures = report[report.index("## Figures") : report.index("## Where the time went")]
    rows = {line.split("|")[1].strip(): line for line in figures.splitlines() if re.match(r"\| (pretrain|sft|reward|ppo) \|", line)}
    assert set(rows) == {"pretrain", "sft", "reward", "ppo"}, report
    assert f"val loss {metrics['pretrain']['val/loss']:.3f}" in rows["pretrain"]
    assert f"gold score {metrics['sft']['gold/start']:.3f} -> {metrics['sft']['gold/final']:.3f}" in rows["sft"]
    assert f"test accuracy {metrics['reward']['test/accuracy']:.3f}, against the gold judge {metrics['reward']['test/accuracy_gold']:.3f}" in rows["reward"]
    assert f"KL {metrics['ppo']['final/kl']:.3f}" in rows["ppo"] and "2 iterations" in rows["ppo"]
    assert all(re.search(r"\| [\d,.]+ \| [\d,.]+( \(generation\))? \|$", row) for row in rows.values()), rows  # time and tokens/s
    # Where the time went: each stage process's wall time (the runner's timing.json) beside the phases it timed itself.
    timing = json.loads((pipeline_dir / "timing.json").read_text())
    assert set(timing["stages"]) == {"pretrain", "sft", "reward", "ppo"} and timing["report"] > 0
    times = report[report.index("## Where the time went") : report.index("## Curves")]
    for stage, wall in timing["stages"].items():
        phases = metrics[stage]["time/phases"]
        assert wall > sum(phases.values()) and phases["train steps"] > 0, (stage, wall, phases)
        assert f"| {stage} | {wall:.1f} | {phases['start']:.1f} |" in times, times
    assert "| all |" in times
    for png in ("loss.png", "ppo.png", "overoptimisation.png"):
        assert f"]({png})" in report
        assert (pipeline_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        height, width, _ = matplotlib.image.imread(pipeline_dir / png).shape
        assert height > 100 and width > 100
    answers = report[report.index("## The same prompts"):]
    assert answers.count("(gold ") == 8 * 3 and "| prompt | pretrain | sft | ppo |" in answers
    # The report is a W&B run of the pipeline's group too, with its tables and plots.
    records = read_records(run_file(pipeline_dir))
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"][:1]
    assert (run.run_group, run.job_type) == (f"pipeline-{pipeline_dir.name}", "report")
    logged = logged_metrics(records)
    assert logged["report/figures/_type"] == ["table-file"] and logged["report/loss/_type"] == ["image-file"]
