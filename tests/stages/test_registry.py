"""The registry, conf/stage/ and pipeline/stages/ agree; every recipe names registered stages and merges their configs."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import pipeline.__main__  # noqa: F401  (registers the run_name resolver the config uses)
from pipeline.stages import RECIPE_RUNNER, STAGES

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
STAGES_DIR = ROOT / "pipeline" / "stages"


def test_registry_stage_modules_and_stage_configs_are_the_same_set():
    modules = {p.stem for p in STAGES_DIR.glob("*.py") if p.stem != "__init__"}
    configs = {p.stem for p in (CONF / "stage").glob("*.yaml")} - {RECIPE_RUNNER}
    assert set(STAGES) == modules == configs


@pytest.mark.parametrize("name", sorted(STAGES))
def test_each_stage_has_run_and_its_config_names_it(name):
    module = STAGES[name].module
    assert callable(getattr(module, "run", None))
    assert OmegaConf.load(CONF / "stage" / f"{name}.yaml").stage == name
    for sources in (STAGES[name].starts_from, *STAGES[name].inputs.values()):
        assert all(s in STAGES and STAGES[s].trains for s in sources), sources


def test_no_stage_module_imports_another_stage():
    for path in STAGES_DIR.glob("*.py"):
        if path.stem == "__init__":
            continue
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
        others = {f"pipeline.stages.{s}" for s in STAGES if s != path.stem}
        assert not imported & others, (path.name, imported & others)


@pytest.mark.parametrize("recipe", sorted(p.stem for p in (CONF / "recipe").glob("*.yaml")))
def test_each_recipe_lists_registered_training_stages_and_composes_their_keys(recipe):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"recipe={recipe}"])
        assert cfg.stage == RECIPE_RUNNER and cfg.recipe.name == recipe
        assert cfg.recipe.stages and all(s in STAGES and STAGES[s].trains for s in cfg.recipe.stages)
        # The recipe's defaults bring each of its stages' own keys, so an override of any of them is accepted.
        for stage in cfg.recipe.stages:
            own = compose("config", overrides=[f"stage={stage}"])
            for key in own:
                if key not in ("stage", "objective"):
                    assert key in cfg, (stage, key)
        # A stage run alone composes no recipe.
        assert "recipe" not in compose("config", overrides=[f"stage={cfg.recipe.stages[0]}"])


def test_a_recipe_stage_takes_its_parents_from_the_recipe_else_from_the_command():
    from pipeline.__main__ import parent_overrides

    done = {"pretrain": Path("/r/pretrain/x"), "sft": Path("/r/sft/x"), "reward": Path("/r/reward/x")}
    user = {"init_from": "/mine/sft", "reward_from": "/mine/rm"}
    assert parent_overrides("ppo", done, user) == ["init_from=/r/sft/x", "reward_from=/r/reward/x"]
    assert parent_overrides("dpo", done, user) == ["init_from=/r/sft/x"]  # DPO takes no reward model
    # Nothing trained in the recipe (a comparison of the user's own models): the command's paths.
    assert parent_overrides("grpo", {}, user) == ["init_from=/mine/sft", "reward_from=/mine/rm"]
    assert parent_overrides("ppo", {"sft": Path("/r/sft/x")}, user) == ["init_from=/r/sft/x", "reward_from=/mine/rm"]
    assert parent_overrides("pretrain", {}, user) == []  # starts from nothing
    assert parent_overrides("sft", {}, {"init_from": None, "reward_from": None}) == []  # the stage then finds the newest run itself
