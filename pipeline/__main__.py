"""Entry point: `python -m pipeline [stage=NAME | recipe=NAME] [overrides...]`.

`stage=NAME` runs one stage of the registry (pipeline/stages/__init__.py). Without it, the recipe
(`conf/recipe/`, default `instructgpt`: pretrain -> sft -> reward -> ppo) runs its stages in order,
each as its own process and run directory, each starting from the stages before it as the registry
says. The return value is the stage's objective (for Hydra sweepers such as Optuna).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from pipeline import runs
from pipeline.errors import UserError
from pipeline.files import read_json
from pipeline.stages import RECIPE_RUNNER, STAGES, training_stages

log = logging.getLogger("pipeline")

# Registered before Hydra composes anything: conf/hydra/default.yaml names run directories with it.
if not OmegaConf.has_resolver("run_name"):
    OmegaConf.register_new_resolver("run_name", runs.run_name)


def objective(cfg: DictConfig, metrics: dict) -> float | None:
    key = cfg.get("objective")
    if key and key in metrics:
        return float(metrics[key])
    return None


def run_stage(cfg: DictConfig) -> float | None:
    run_dir = Path(cfg.paths.run_dir)
    if runs.is_finished(run_dir):
        if not cfg.rerun:
            metrics = read_json(run_dir / runs.METRICS_FILE)
            log.info("%s already holds a finished %s run; its metrics: %s (pass rerun=true to train it again)", run_dir, cfg.stage, metrics)
            return objective(cfg, metrics)
        from pipeline.training import HISTORY_FILE

        for name in ("checkpoints", runs.METRICS_FILE, runs.MODEL_FILE, "wandb_id.txt", HISTORY_FILE):
            target = run_dir / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    metrics = STAGES[cfg.stage].module.run(cfg, run_dir)
    return objective(cfg, metrics)


def overrides_for(stage: str, overrides: list[str]) -> list[str]:
    """The command-line overrides that mean something to a stage: `ppo.kl_coef=0` reaches PPO only.

    Group choices (`model=gpt2`, `trainer=ddp`) and keys every stage has go to all stages; a dotted
    key goes where the stage's composed config has it.
    """
    from hydra import compose

    stage_cfg = compose("config", overrides=[f"stage={stage}"])
    missing = object()
    kept = []
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if "." not in key or OmegaConf.select(stage_cfg, key, default=missing) is not missing:
            kept.append(override)
    return kept


def run_recipe(cfg: DictConfig) -> None:
    """The recipe's stages in order, each a child process with the same overrides, chained by init_from.

    A stage's directory is <root>/<stage>/<this pipeline run's name>, so rerunning the same command
    skips the finished stages and resumes the interrupted one. Each stage starts from the latest
    earlier stage of the recipe that the registry lists in its `starts_from` (and likewise for its
    other inputs, PPO's reward_from); `recipe.overrides.<stage>` adds overrides for one stage only.
    """
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    inputs = {"init_from", *(key for s in STAGES.values() for key in s.inputs)}
    passed = [o for o in hc.overrides.task if not o.startswith(("stage=", "recipe=")) and o.split("=", 1)[0] not in inputs]
    name = Path(cfg.paths.run_dir).name
    root = Path(cfg.paths.root)
    trainable = [s.name for s in training_stages()]
    unknown = [s for s in cfg.recipe.stages if s not in trainable]
    if unknown:
        raise UserError(f"recipe {cfg.recipe.name}: {unknown} are not training stages; stages are {trainable}")
    done: list[str] = []
    env = {**os.environ, "PIPELINE_GROUP": f"pipeline-{name}"}
    for stage in cfg.recipe.stages:
        spec = STAGES[stage]
        stage_dir = root / stage / name
        own = list((cfg.recipe.get("overrides") or {}).get(stage) or [])
        command = [sys.executable, "-m", "pipeline", f"stage={stage}", *overrides_for(stage, passed), *own, f"hydra.run.dir={stage_dir}"]
        for key, sources in (("init_from", spec.starts_from), *spec.inputs.items()):
            parent = next((d for d in reversed(done) if d in sources), None)
            if parent is not None:
                command.append(f"{key}={root / parent / name}")
            elif key == "init_from" and cfg.init_from and sources:
                command.append(f"init_from={cfg.init_from}")  # the recipe's first stage starts from the user's model
        log.info("pipeline: %s", " ".join(command[2:]))
        result = subprocess.run(command, env=env)
        if result.returncode != 0:
            raise UserError(f"stage '{stage}' failed (exit code {result.returncode}); rerun the same command to resume it")
        done.append(stage)
    log.info("pipeline finished: runs under %s/*/%s", root, name)
    from pipeline.tools.report import write_report

    use_wandb = cfg.logger.name == "wandb"
    report = write_report(
        Path(cfg.paths.run_dir),
        max_new_tokens=int(cfg.eval.max_new_tokens),
        wandb_project=cfg.logger.project if use_wandb else None,
        wandb_entity=cfg.logger.entity if use_wandb else None,
        wandb_group=cfg.logger.group if use_wandb else None,  # null: pipeline-<name>, the stages' group
    )
    log.info("report: %s", report)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        if cfg.stage == RECIPE_RUNNER:
            return run_recipe(cfg)
        return run_stage(cfg)
    except UserError as e:
        log.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
