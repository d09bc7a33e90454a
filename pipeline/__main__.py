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
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from pipeline import CONF_DIR, console, runs
from pipeline.errors import UserError
from pipeline.files import read_json, write_json
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
    from pipeline import timing
    from pipeline.training import is_global_zero

    timing.mark_run_start()  # what came before (imports, composition, checks) is the run's start-up
    run_dir = Path(cfg.paths.run_dir)
    if runs.is_finished(run_dir) and not cfg.rerun:
        metrics = read_json(run_dir / runs.METRICS_FILE)
        log.info("%s already holds a finished %s run; its metrics: %s (pass rerun=true to train it again)", run_dir, cfg.stage, metrics)
        return objective(cfg, metrics)
    if cfg.rerun and run_dir.is_dir() and is_global_zero():  # DDP's other ranks start later, into rank 0's fresh run
        # Everything but this command's own config goes: checkpoints, history, and every cache made from
        # the parents (the reward stage's policy pairs, the starting gold score), which may have changed.
        for target in run_dir.iterdir():
            if target.name != ".hydra":
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


def can_fork() -> bool:
    """Stage processes are forked from the recipe's (which has imported what they need) where that is safe.

    Forking needs Linux and a parent that has not initialised CUDA (checked here) nor run torch's thread
    pool (the recipe's process computes nothing); PIPELINE_SPAWN=1 asks for fresh interpreters anyway.
    """
    if not hasattr(os, "fork") or sys.platform != "linux" or os.environ.get("PIPELINE_SPAWN") == "1":
        return False
    torch = sys.modules.get("torch")
    return torch is None or not torch.cuda.is_initialized()


def preload(stages: list[str]) -> None:
    """Import the recipe's stage modules (torch, Lightning, transformers, datasets, W&B with them) once, in the
    recipe's process: a forked stage process then starts in a fraction of a second instead of several."""
    for stage in stages:
        STAGES[stage].module  # noqa: B018 (the import is the point)
    import datasets  # noqa: F401
    import wandb  # noqa: F401


def run_forked(args: list[str], env: dict) -> int:
    """`python -m pipeline ARGS` as a fork of this process: the same as a fresh interpreter, less its imports.

    The child gets the stage's environment and command line, a Hydra with no state of the recipe's, and
    composes, logs and runs as a child process would; its exit code is what `cli` exits with.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the stage's process
        from pipeline import timing

        timing.PROCESS_STARTED = time.time()  # its start-up is counted from here
        code = 1
        try:
            import atexit
            import weakref

            from hydra.core.global_hydra import GlobalHydra

            # The recipe's exit handlers and finalizers stay the recipe's: run at the stage's exit they would
            # delete folders the recipe and the next stages still use (W&B's media folder, made at its import).
            atexit._clear()
            for finalizer in list(weakref.finalize._registry):
                finalizer.detach()
            atexit.register(weakref.finalize._exitfunc)  # the stage's own finalizers still run at its exit
            os.environ.clear()
            os.environ.update(env)
            GlobalHydra.instance().clear()
            sys.argv = [sys.argv[0], *args]
            try:
                cli()
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            atexit._run_exitfuncs()  # W&B's and logging's own shutdown, as at a normal interpreter exit
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def run_child(stage: str, command: list[str], env: dict) -> None:
    """One stage run as its own process; a failure stops the recipe (rerunning the same command resumes it)."""
    log.info("pipeline: %s", " ".join(command[2:]))
    code = run_forked(command[3:], env) if can_fork() else subprocess.run(command, env=env).returncode
    if code != 0:
        raise UserError(f"stage '{stage}' failed (exit code {code}); rerun the same command to resume it")


def parent_overrides(stage: str, done: dict[str, Path], user: dict[str, str | None]) -> list[str]:
    """init_from and the other inputs (reward_from) of a stage: the latest finished recipe stage it takes each from, else the user's value.

    `user` holds what the command gave for those keys (init_from=, reward_from=): a recipe's first
    stage starts from the user's model, and a comparison of methods uses the user's reward model
    when the recipe trained none.
    """
    spec = STAGES[stage]
    out = []
    for key, sources in (("init_from", spec.starts_from), *spec.inputs.items()):
        parent = next((d for s, d in reversed(list(done.items())) if s in sources), None)
        if parent is not None:
            out.append(f"{key}={parent}")
        elif user.get(key) and sources:
            out.append(f"{key}={user[key]}")
    return out


def run_recipe(cfg: DictConfig) -> None:
    """The recipe's stages in order, each a child process with the same overrides, chained by init_from.

    A stage's directory is <root>/<stage>/<this pipeline run's name>, so rerunning the same command
    skips the finished stages and resumes the interrupted one. Each stage starts from the latest
    earlier stage of the recipe that the registry lists in its `starts_from` (and likewise for its
    other inputs, PPO's reward_from); `recipe.overrides.<stage>` adds overrides for one stage only.
    A recipe with `compare.methods` (recipe=compare) then runs each method over its seeds from the
    stages trained once, and writes compare.md (pipeline/tools/compare.py).
    """
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    inputs = {"init_from", *(key for s in STAGES.values() for key in s.inputs)}
    passed = [o for o in hc.overrides.task if not o.startswith(("stage=", "recipe=", "compare.")) and o.split("=", 1)[0] not in inputs]
    name = Path(cfg.paths.run_dir).name
    root = Path(cfg.paths.root)
    trainable = [s.name for s in training_stages()]
    unknown = [s for s in cfg.recipe.stages if s not in trainable]
    if unknown:
        raise UserError(f"recipe {cfg.recipe.name}: {unknown} are not training stages; stages are {trainable}")
    methods = None
    if cfg.get("compare") is not None:
        from pipeline.tools.compare import plan_methods

        methods = plan_methods(cfg, name, root, passed, overrides_for)  # bad methods fail before the first stage trains
    done: dict[str, Path] = {}
    user_inputs = {key: cfg.get(key) for key in inputs}  # what the command named: the fallback where the recipe trains no parent
    env = {**os.environ, "PIPELINE_GROUP": f"pipeline-{name}"}
    wall: dict[str, float] = {}  # each stage process's wall time: the report's time breakdown (timing.json)
    imports = 0.0
    if can_fork():
        started = time.perf_counter()
        preload(list(cfg.recipe.stages) + sorted({run.stage for run in methods or []}))
        imports = time.perf_counter() - started  # paid once here, not by every stage process
    for stage in cfg.recipe.stages:
        stage_dir = root / stage / name
        own = list((cfg.recipe.get("overrides") or {}).get(stage) or [])
        command = [sys.executable, "-m", "pipeline", f"stage={stage}", *overrides_for(stage, passed), *own, f"hydra.run.dir={stage_dir}"]
        started = time.perf_counter()
        run_child(stage, command + parent_overrides(stage, done, user_inputs), env)
        wall[stage] = time.perf_counter() - started
        done[stage] = stage_dir
    if methods is not None:
        from pipeline.tools.compare import write_comparison

        for run in methods:  # each from the recipe's SFT run (and its reward run, for the stages that take one) or the user's
            command = [sys.executable, "-m", "pipeline", f"stage={run.stage}", *run.overrides, f"hydra.run.dir={run.run_dir}"]
            run_child(run.stage, command + parent_overrides(run.stage, done, user_inputs), env)
        out = write_comparison(root, name, methods, Path(cfg.paths.run_dir))
        log.info("comparison: %s", out)
    log.info("pipeline finished: runs under %s/*/%s", root, name)
    if not done:  # a comparison of the user's own SFT and reward models (recipe.stages=[]): compare.md is the report
        return
    from pipeline.tools.report import TIMING_FILE, write_report

    timing_file = Path(cfg.paths.run_dir) / TIMING_FILE
    write_json(timing_file, {"stages": wall, "imports": imports})
    started = time.perf_counter()
    use_wandb = cfg.logger.name == "wandb"
    report = write_report(
        Path(cfg.paths.run_dir),
        max_new_tokens=int(cfg.eval.max_new_tokens),
        wandb_project=cfg.logger.project if use_wandb else None,
        wandb_entity=cfg.logger.entity if use_wandb else None,
        wandb_group=cfg.logger.group if use_wandb else None,  # null: pipeline-<name>, the stages' group
    )
    write_json(timing_file, {"stages": wall, "imports": imports, "report": time.perf_counter() - started})
    log.info("report: %s (%.1f s; the stages took %.1f s)", report, time.perf_counter() - started, sum(wall.values()))


# An absolute path: the installed copy of the configs or the checkout's conf/ (pipeline/__init__.py).
@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    console.setup()  # after Hydra set up logging; in every process: recipe stages and DDP ranks start here too
    try:
        from pipeline.checks import check_config

        check_config(cfg)  # bad values fail here, before any work (a recipe: before its first stage starts)
        if cfg.stage == RECIPE_RUNNER:
            return run_recipe(cfg)
        value = run_stage(cfg)
        log.info("%s run directory: %s", cfg.stage, cfg.paths.run_dir)
        return value
    except UserError as e:
        log.error("%s", e, extra={console.FILE_ONLY: True})  # the console gets the one line below
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def one_line(message: str) -> str:
    """Hydra's multi-line message as one line: options listed with commas, its search path and key details left out."""
    message = message.split("\nConfig search path:")[0]
    parts = []
    for line in message.splitlines():
        if line.startswith("\t"):
            parts.append((" " if parts and parts[-1].endswith(":") else ", ") + line.strip())
        elif line.strip() and not line.startswith("    "):  # '    full_key: ...' repeats what the message says
            parts.append(" " + line.strip())
    return "".join(parts).strip()


def cli() -> None:
    """`python -m pipeline`: Hydra's own refusals (an unknown key, group or option, a malformed override) also
    end as one `error:` line and exit code 2, like every other bad input, instead of Hydra's exit 1."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # Hydra then raises its errors instead of printing and exiting 1
    try:
        main()
    except (HydraException, OmegaConfBaseException) as e:
        print(f"error: {one_line(str(e)) or type(e).__name__}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
