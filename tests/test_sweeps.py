"""Hydra multirun: one run directory and one W&B run per job; the Optuna and SLURM configs compose."""

from __future__ import annotations

import json

import pytest
from helpers import REPO, TINY, run_pipeline
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from wandb_records import read_records, run_file

import pipeline.__main__  # noqa: F401  (registers the run_name resolver the config uses)

# The embedded preference pairs need more context than helpers.TINY's 64 tokens.
TINY_128 = [o for o in TINY if not o.startswith("model.block_size=")] + ["model.block_size=128"]


@pytest.mark.slow
def test_sweep_jobs_get_their_own_directories_and_wandb_runs_and_optuna_ranks_the_objective(corpus, outputs_root):
    result = run_pipeline(
        "-m", "stage=pretrain", "optim.lr=1e-3,3e-3", f"data.path={corpus}", "trainer.max_steps=2", "trainer.val_check_interval=2", *TINY_128,
        root=outputs_root, timeout=400,
    )
    jobs = sorted(d for d in (outputs_root / "pretrain").iterdir() if d.is_dir())
    assert len(jobs) == 2, jobs
    lrs, run_ids = [], set()
    for job in jobs:
        metrics = json.loads((job / "metrics.json").read_text())
        assert metrics["train/steps"] == 2
        lrs.append(OmegaConf.load(job / ".hydra" / "config.yaml").optim.lr)
        (run,) = [r.run for r in read_records(run_file(job)) if r.WhichOneof("record_type") == "run"][:1]
        assert run.job_type == "pretrain" and run.display_name == f"pretrain/{job.name}"
        run_ids.add(run.run_id)
    assert sorted(lrs) == [1e-3, 3e-3] and len(run_ids) == 2, result.stdout[-2000:]

    # A real Optuna study of two trials over the reward model, from the first job's model: the
    # objective each trial returns (val/accuracy) is what Optuna ranks.
    run_pipeline(
        "-m", "hparams_search=reward_optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.n_startup_trials=1", f"init_from={jobs[0]}",
        "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=2", "data.batch_size=4", "logger=csv",
        root=outputs_root, timeout=400,
    )
    trials = [d for d in (outputs_root / "reward").iterdir() if d.is_dir()]
    accuracies = [json.loads((d / "metrics.json").read_text())["val/accuracy"] for d in trials]
    assert len(trials) == 2
    best = OmegaConf.load(outputs_root / "reward" / "optimization_results.yaml")
    assert best.best_value == max(accuracies) and set(best.best_params) == {"optim.lr", "optim.warmup_steps", "reward.center_coef"}


def compose_with(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("search, stage, objective", [("reward_optuna", "reward", "val/accuracy"), ("ppo_optuna", "ppo", "gold/final")])
def test_optuna_search_composes_and_searches_keys_the_stage_has(search, stage, objective):
    cfg = compose_with(f"hparams_search={search}")
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "maximize"
    assert cfg.stage == stage and cfg.objective == objective
    missing = object()
    for key in sweeper.params:
        assert OmegaConf.select(cfg, key, default=missing) is not missing, f"{search} searches {key}, which stage={stage} does not have"


def test_slurm_launcher_allocates_what_the_trainer_uses():
    cfg = compose_with("stage=sft", "hydra/launcher=slurm", "trainer=ddp", "trainer.num_nodes=2", "trainer.devices=4")
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
    assert cfg.trainer.strategy == "ddp"
