"""pipeline.tools.compare on its own: the equal budget, the plan of runs, and compare.md from finished runs.

The recipe itself, at toy size with real stage runs, is tests/stages/test_compare_recipe.py.
"""

from __future__ import annotations

import json

from omegaconf import OmegaConf

from pipeline.tools import compare
from pipeline.tools.compare import MethodRun


def stage_cfg(**values):
    return OmegaConf.create({"trainer": {"devices": values.pop("devices", 1), "num_nodes": 1}, **values})


def test_budget_gives_each_online_method_the_same_completions():
    ppo = stage_cfg(ppo={"iterations": 120, "rollout_batch_size": 64})
    grpo = stage_cfg(grpo={"iterations": 60, "prompts_per_rollout": 16, "group_size": 8})
    assert compare.budget_overrides("ppo", ppo, 2560) == (["ppo.iterations=40"], 2560)
    assert compare.budget_overrides("grpo", grpo, 2560) == (["grpo.iterations=20"], 2560)
    # Two processes each generate their own batch: half the iterations.
    assert compare.budget_overrides("grpo", stage_cfg(devices=2, grpo={"iterations": 60, "prompts_per_rollout": 16, "group_size": 8}), 2560) == (["grpo.iterations=10"], 2560)
    # A budget that does not divide: the nearest whole number of iterations, and the completions that makes.
    assert compare.budget_overrides("ppo", ppo, 100) == (["ppo.iterations=2"], 128)
    assert compare.budget_overrides("ppo", ppo, None) == ([], 120 * 64)  # null: the stage's own iterations
    assert compare.budget_overrides("dpo", stage_cfg(), 2560) == ([], None)  # offline: no budget of completions


def finished(run_dir, **metrics):
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text(json.dumps(metrics))


def test_write_comparison_reports_mean_and_spread_over_seeds(tmp_path):
    runs = [
        MethodRun("grpo_gold", "grpo", 0, tmp_path / "grpo" / "n-grpo_gold-s0", completions=256),
        MethodRun("grpo_gold", "grpo", 1, tmp_path / "grpo" / "n-grpo_gold-s1", completions=256),
        MethodRun("dpo", "dpo", 0, tmp_path / "dpo" / "n-dpo-s0"),
        MethodRun("dpo", "dpo", 1, tmp_path / "dpo" / "n-dpo-s1"),  # not finished: counted, not shown
    ]
    history = [{"iteration": 0, "eval/kl": 0.0, "eval/gold_score": 0.6, "eval/reward": 0.6}, {"iteration": 2, "eval/kl": 2.0, "eval/gold_score": 0.9, "eval/reward": 0.9}]
    finished(runs[0].run_dir, **{"gold/start": 0.6, "gold/final": 0.9, "final/kl": 2.0, "time/total_s": 10.0, "train/episodes": 256, "history": history})
    finished(runs[1].run_dir, **{"gold/start": 0.6, "gold/final": 0.8, "final/kl": 4.0, "time/total_s": 30.0, "train/episodes": 256, "history": history})
    finished(runs[2].run_dir, **{"gold/start": 0.6, "gold/final": 0.7, "final/kl": 1.0, "time/total_s": 5.0})
    out = compare.write_comparison(tmp_path, "n", runs, tmp_path / "all" / "n")
    page = out.read_text()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]] for line in page.split("## Every run")[0].splitlines() if line.startswith(("| grpo_gold", "| dpo"))}
    assert rows["grpo_gold"][:6] == ["grpo_gold", "grpo", "2/2", "0.850 ± 0.071", "3.00 ± 1.41", "0.900 ± 0.000"]
    assert rows["grpo_gold"][6:] == ["20 ± 14", "17.1 ± 12.1", "256"]  # episodes/s: 25.6 and 8.53, std |25.6 - 8.53| / sqrt 2
    assert rows["dpo"][:5] == ["dpo", "dpo", "1/2", "0.700", "1.00"]
    assert "(gold score 0.600)" in page
    assert (tmp_path / "all" / "n" / "compare_gold.png").stat().st_size > 0
    assert (tmp_path / "all" / "n" / "compare_kl.png").stat().st_size > 0
    saved = json.loads((tmp_path / "all" / "n" / "compare.json").read_text())
    assert [r["seed"] for r in saved["runs"]] == [0, 1, 0]


def test_rewriting_names_what_it_cannot_use(tmp_path, capsys):
    (tmp_path / "all" / "n").mkdir(parents=True)
    (tmp_path / "sft" / "n").mkdir(parents=True)
    assert compare.main([str(tmp_path / "all" / "n")]) == 2
    assert "give the run directory of a `python -m pipeline recipe=compare` run" in capsys.readouterr().err


def test_the_default_plan_runs_five_methods_over_three_seeds_on_one_budget(tmp_path):
    from hydra import compose, initialize_config_dir

    import pipeline.__main__ as entry
    from pipeline import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["recipe=compare"])
        planned = compare.plan_methods(cfg, "n", tmp_path, [], entry.overrides_for)
    assert [(r.method, r.seed) for r in planned][:4] == [("ppo", 0), ("ppo", 1), ("ppo", 2), ("grpo_rm", 0)]
    assert len(planned) == 15 and {r.completions for r in planned if r.stage != "dpo"} == {7680}
    rloo = next(r for r in planned if r.method == "rloo_rm")
    assert rloo.run_dir == tmp_path / "grpo" / "n-rloo_rm-s0"
    assert rloo.overrides == ["grpo.reward=rm", "grpo.baseline=rloo", "grpo.iterations=60", "seed=0"]
    assert next(r for r in planned if r.method == "ppo").overrides == ["ppo.iterations=120", "seed=0"]
