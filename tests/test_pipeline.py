"""`python -m pipeline`: every stage in order, chained by init_from, and a rerun that skips finished stages."""

from __future__ import annotations

import json

from test_pretrain import run_pipeline
from wandb_records import artifacts, read_records, run_file

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
    "ppo.iterations=2",
    "ppo.rollout_batch_size=4",
    "ppo.minibatch_size=2",
    "ppo.eval_prompts=4",
    "ppo.max_new_tokens=8",
    "ppo.eval_every=1",
    "trainer.log_every_n_steps=1",
]


def test_whole_pipeline_chains_the_stages_and_resumes_by_skipping(outputs_root):
    run_pipeline(*TINY_ALL, root=outputs_root, timeout=900)
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
    assert_lineage(outputs_root, name)

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
