"""stage=prune through `python -m pipeline`: a pruned and recovered run that generate, export and every stage's loader read;
pruning alone (a GPT-2-style source keeps its heads and still exports) and a finished run skipped; resume after a SIGKILL mid-recovery.

The pruning itself (exactness on zeroed units, the planner, save/load/export of a pruned model) is tests/model/test_prune_model.py.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import ARCHS, checkpoint_step, finished_run, kill_when, roots_sharing, run_pipeline, start_pipeline, tiny_model
from pipeline import runs
from pipeline.data.corpus import embedded_task_dir, materialize
from pipeline.model import GPT
from pipeline.stages import STAGES
from pipeline.stages import prune as prune_stage
from pipeline.tasks import default_task

BLOCK = 128
FAST = [
    "logger=csv", "prune.calibration.prompts=16", "prune.calibration.max_new_tokens=8", "prune.recover.max_new_tokens=8", "prune.recover.val_prompts=8",
    "prune.recover.batch_size=8", "trainer.log_every_n_steps=1", "eval.num_prompts=8", "eval.max_new_tokens=8", "prune.bench.batch_sizes=[1,4]",
    "prune.bench.new_tokens=4", "prune.bench.repeats=1", "prune.bench.warmup=0",
]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer):
    """An outputs root with a finished 'ppo' policy (a tiny random model of 3 blocks of 4 heads) and a stand-in embedded task of real task prompts."""
    root = tmp_path_factory.mktemp("outputs")
    source = finished_run(root, "ppo", "default", tiny_model(seed=3, block_size=BLOCK, n_layer=3, n_head=4), tokenizer)
    task = default_task()
    rows = {split: task.prompt_rows(split, n) for split, n in (("train", 96), ("validation", 16), ("test", 16))}
    materialize(rows, embedded_task_dir(root / "cache", "prompts"))  # the real task's files take most of a minute to build
    return root, source


def probe(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(1))


def test_prune_and_recover_then_generate_export_and_the_stages_read_it(world):
    root, source = world
    run_dir = root / "prune" / "e2e"
    run_pipeline("stage=prune", *FAST, "prune.targets.heads=0.25", "prune.targets.channels=0.75", "prune.recover.steps=12", "trainer.val_check_interval=6", "optim.warmup_steps=0", f"hydra.run.dir={run_dir}", root=root)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["source"] == str(source / "model.pt") and metrics["source_stage"] == "ppo"  # the newest finished policy
    for key in (
        "gold/source", "gold/pruned", "gold/final", "kl/pruned", "kl/final", "val/loss", "perf/source_tokens_per_s_b1", "perf/pruned_tokens_per_s_b4",
        "perf/speedup_b1", "perf/speedup_b4", "file/ratio", "time/total_s",
    ):
        assert math.isfinite(metrics[key]), key
    assert abs(metrics["params/ratio"] - 0.7) < 0.02 and metrics["params/pruned"] < metrics["params/source"]
    assert metrics["prune/head_groups_removed"] >= 1 and metrics["prune/channels_removed"] >= 1 and metrics["train/steps"] == 12
    assert metrics["kl/final"] < metrics["kl/pruned"]  # the recovery moved the pruned model towards the unpruned one
    assert metrics["file/pruned_bytes"] == (run_dir / "model.pt").stat().st_size < metrics["file/source_bytes"]

    payload = torch.load(run_dir / "model.pt", weights_only=True)
    config = payload["config"]
    assert payload["stage"] == "ppo"  # the source's: generate and serve send it chat prompts, as to the source
    assert config["n_head"] < 4 and config["head_dim"] == 8 and config["mlp_hidden_size"] < 128 and config == metrics["prune/config"]
    pruned = torch.load(run_dir / prune_stage.PRUNED_FILE, weights_only=True)
    assert pruned["config"] == config and not torch.equal(pruned["state_dict"]["wte.weight"], payload["state_dict"]["wte.weight"])  # recovered since

    # Every stage's loader (what init_from= does) builds the smaller model; generate answers through the chat template.
    model, tokenizer, _, _ = runs.load_start(str(run_dir), STAGES["sft"].starts_from, root, "sft")
    assert model.num_params() == metrics["params/pruned"]
    gen_dir = root / "generate" / "pruned"
    run_pipeline("stage=generate", f"init_from={run_dir}", "prompt=Spell hill letter by letter", "max_new_tokens=6", f"hydra.run.dir={gen_dir}", root=root)
    (row,) = [json.loads(line) for line in (gen_dir / "generations.jsonl").read_text().splitlines()]
    assert row["prompt"] == [{"role": "user", "content": "Spell hill letter by letter"}]

    export_dir = root / "export" / "pruned"
    run_pipeline("stage=export", f"init_from={run_dir}", f"hydra.run.dir={export_dir}", root=root)
    hf = AutoModelForCausalLM.from_pretrained(export_dir / "hf").eval()
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.head_dim == 8 and hf.config.num_attention_heads == config["n_head"]
    ids = probe(config["vocab_size"])
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, model.eval()(ids), atol=1e-5, rtol=1e-5)


def test_pruning_alone_keeps_a_gpt2_models_heads_exports_it_and_a_finished_run_is_skipped(world, tokenizer):
    root, _ = world
    gpt2 = finished_run(root, "sft", "gpt2", tiny_model(seed=4, block_size=BLOCK, n_layer=3, n_head=4, **ARCHS["gpt2"]), tokenizer)
    run_dir = root / "prune" / "alone"
    command = ["stage=prune", f"init_from={gpt2}", *FAST, "prune.recover.steps=0", "prune.method=magnitude", f"hydra.run.dir={run_dir}"]
    first = run_pipeline(*command, root=root)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["source_stage"] == "sft" and abs(metrics["params/ratio"] - 0.7) < 0.02
    assert metrics["prune/head_groups_removed"] == 0 and metrics["prune/config"]["n_head"] == 4  # GPT2Config cannot say head_dim
    assert metrics["gold/final"] == metrics["gold/pruned"] and metrics["kl/final"] == metrics["kl/pruned"] and "train/steps" not in metrics
    assert not (run_dir / "checkpoints").exists()
    saved, pruned = (runs.build_model(runs.load_model_payload(run_dir / name), GPT, name) for name in ("model.pt", prune_stage.PRUNED_FILE))
    ids = probe(saved.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(saved.eval()(ids), pruned.eval()(ids))  # no recovery: model.pt is the pruned model
    assert "Traceback" not in first.stderr

    written = (run_dir / "metrics.json").stat().st_mtime_ns
    again = run_pipeline(*command, root=root)
    assert "already holds a finished prune run" in again.stdout + again.stderr and (run_dir / "metrics.json").stat().st_mtime_ns == written

    export_dir = root / "export" / "alone"
    run_pipeline("stage=export", f"init_from={run_dir}", f"hydra.run.dir={export_dir}", root=root)
    hf = AutoModelForCausalLM.from_pretrained(export_dir / "hf").eval()
    assert type(hf).__name__ == "GPT2LMHeadModel" and hf.config.n_inner == saved.config.mlp_hidden < 128
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, saved(ids), atol=1e-5, rtol=1e-5)


# -- resume after SIGKILL mid-recovery: one command under two roots, one left alone, one killed and run again --------

STEPS, EVERY, KILL_AFTER = 24, 4, 8


def test_prune_resumes_after_a_kill_mid_recovery(world, tmp_path):
    source, _ = world
    roots = roots_sharing(source, tmp_path, ("whole", "killed"))
    args = ["stage=prune", *FAST, f"prune.recover.steps={STEPS}", f"trainer.val_check_interval={EVERY}", "optim.warmup_steps=5", "hydra.run.dir=RUN"]
    command = lambda root: [a.replace("RUN", str(root / "prune" / "run")) for a in args]  # noqa: E731
    whole = start_pipeline(command(roots["whole"]), roots["whole"])
    killed = start_pipeline(command(roots["killed"]), roots["killed"])
    run_dir = roots["killed"] / "prune" / "run"
    kill_when(killed, lambda: checkpoint_step(run_dir) >= KILL_AFTER, roots["killed"] / "stderr.txt")
    assert KILL_AFTER <= checkpoint_step(run_dir) < STEPS and not (run_dir / "metrics.json").exists()
    assert (run_dir / prune_stage.PRUNED_FILE).is_file() and (run_dir / prune_stage.START_FILE).is_file()
    resumed = run_pipeline(*command(roots["killed"]), root=roots["killed"])
    logs = resumed.stdout + resumed.stderr
    assert "Restoring states from the checkpoint" in logs and "the pruned model read back from" in logs and "calibrating" not in logs
    assert whole.wait(timeout=300) == 0, (roots["whole"] / "stderr.txt").read_text()[-4000:]
    ma, mb = (json.loads((r / "prune" / "run" / "metrics.json").read_text()) for r in (roots["whole"], roots["killed"]))
    for key in ("params/pruned", "prune/config", "val/loss", "gold/pruned", "gold/final", "kl/pruned", "kl/final", "train/steps"):
        assert mb[key] == ma[key], key
