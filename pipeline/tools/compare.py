"""The comparison of alignment methods from one SFT model, measured by one gold judge.

    python -m pipeline recipe=compare                                  # PPO, GRPO, RLOO, GRPO on gold, DPO; 3 seeds
    python -m pipeline recipe=compare compare.seeds=1 compare.completions=2560
    python -m pipeline.tools.compare outputs/all/<name>                # rewrite compare.md from finished runs

`recipe=compare` trains pretrain, SFT and the reward model once (conf/recipe/compare.yaml), then runs
every method of `compare.methods` over `compare.seeds` seeds from that SFT model (and reward model),
each run a stage run of its own under <root>/<stage>/<name>-<method>-s<seed>, so that rerunning the
same command skips finished runs and resumes the interrupted one. The online methods get the same
budget of generated completions (`compare.completions`): each one's iterations are set from its own
completions per iteration. This module plans those runs and writes compare.md, compare.json and the
plots into the pipeline's run directory from their metrics.json files.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from omegaconf import DictConfig, OmegaConf

from pipeline import runs
from pipeline.errors import UserError
from pipeline.files import atomic_write_bytes, read_json
from pipeline.stages import STAGES

log = logging.getLogger(__name__)

COMPARE_FILE = "compare.md"
# Completions one iteration generates per process, by stage: what an equal budget divides by.
PER_ITERATION = {
    "ppo": ("ppo.iterations", ("ppo.rollout_batch_size",)),
    "grpo": ("grpo.iterations", ("grpo.prompts_per_rollout", "grpo.group_size")),
}


@dataclass(frozen=True)
class MethodRun:
    method: str  # the name in compare.methods
    stage: str
    seed: int
    run_dir: Path
    overrides: list[str] = field(default_factory=list)  # the child's overrides, less its run directory and parents
    completions: int | None = None  # generated completions planned (online methods)


def processes(stage_cfg: DictConfig) -> int:
    devices = stage_cfg.trainer.get("devices")
    return devices * int(stage_cfg.trainer.get("num_nodes") or 1) if isinstance(devices, int) and devices > 0 else 1


def budget_overrides(stage: str, stage_cfg: DictConfig, completions: int | None) -> tuple[list[str], int | None]:
    """The iterations that spend `completions` generated completions, and the completions that makes exactly."""
    if stage not in PER_ITERATION:
        return [], None
    key, factors = PER_ITERATION[stage]
    per_iteration = processes(stage_cfg)
    for factor in factors:
        per_iteration *= int(OmegaConf.select(stage_cfg, factor))
    if completions is None:
        iterations = int(OmegaConf.select(stage_cfg, key))
        return [], iterations * per_iteration
    iterations = max(1, round(completions / per_iteration))
    return [f"{key}={iterations}"], iterations * per_iteration


def plan_methods(cfg: DictConfig, name: str, root: Path, passed: list[str], overrides_for: Callable[[str, list[str]], list[str]]) -> list[MethodRun]:
    """Every (method, seed) run of the comparison, checked before anything trains.

    overrides_for(stage, passed) keeps the command line's overrides that the stage's config has (the
    entry point's own rule); it is called inside Hydra's context, as is the composition of each method.
    """
    from hydra import compose

    methods = cfg.compare.get("methods") or {}
    if not methods:
        raise UserError("compare.methods is empty: name at least one method, e.g. compare.methods.ppo={stage: ppo, overrides: []}")
    seeds = int(cfg.compare.seeds)
    completions = cfg.compare.get("completions")
    planned = []
    for method, spec in methods.items():
        stage = spec.get("stage") if isinstance(spec, DictConfig) else None
        allowed = [s.name for s in STAGES.values() if s.trains and s.policy and "sft" in s.starts_from]
        if stage not in allowed:
            raise UserError(f"compare.methods.{method}.stage={stage}: must be a stage that trains a policy from the SFT model: {', '.join(allowed)}")
        own = list(spec.get("overrides") or [])
        base = [*overrides_for(stage, passed), *own]
        try:
            stage_cfg = compose("config", overrides=[f"stage={stage}", *base])
        except Exception as e:  # an override the stage's config does not have
            raise UserError(f"compare.methods.{method}.overrides={own}: {str(e).strip().splitlines()[0]}") from None
        budget, planned_completions = budget_overrides(stage, stage_cfg, None if completions is None else int(completions))
        for k in range(seeds):
            seed = int(cfg.seed) + k
            run_dir = root / stage / f"{name}-{method}-s{seed}"
            planned.append(MethodRun(method, stage, seed, run_dir, [*base, *budget, f"seed={seed}"], planned_completions))
    return planned


# ---------------------------------------------------------------------------------------------
# The page


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _pm(values: list[float], digits: int = 3) -> str:
    mean, std = _mean_std(values)
    if mean is None:
        return "-"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def proxy_of(point: dict) -> float | None:
    """The method's own reward on the held-out prompts: the RM score where it has one, else its reward (gold, a function)."""
    return point.get("eval/rm_score", point.get("eval/reward"))


def run_figures(run: MethodRun) -> dict | None:
    """One finished run's figures for the table, None if it has not finished."""
    file = run.run_dir / runs.METRICS_FILE
    if not file.is_file():
        return None
    m = read_json(file)
    wall = m.get("time/total_s")
    episodes = m.get("train/episodes")
    if episodes is None and run.stage == "ppo":
        saved = OmegaConf.load(run.run_dir / ".hydra" / "config.yaml") if (run.run_dir / ".hydra" / "config.yaml").is_file() else None
        if saved is not None:
            episodes = int(m.get("train/iterations") or 0) * int(saved.ppo.rollout_batch_size) * processes(saved)
    history = m.get("history") or []
    return {
        "method": run.method,
        "stage": run.stage,
        "seed": run.seed,
        "run_dir": str(run.run_dir),
        "gold_start": m.get("gold/start"),
        "gold_final": m.get("gold/final"),
        "kl": m.get("final/kl"),
        "proxy_final": proxy_of(history[-1]) if history else None,
        "wall_s": wall,
        "episodes": episodes,
        "episodes_per_s": (episodes / wall) if episodes and wall else None,
        "history": [{"iteration": p.get("iteration"), "kl": p.get("eval/kl"), "gold": p.get("eval/gold_score"), "proxy": proxy_of(p)} for p in history],
    }


def summarise(runs_: list[MethodRun]) -> tuple[list[dict], list[dict]]:
    """(per method: mean and spread over seeds; per run), in compare.methods' order."""
    per_run = [f for f in (run_figures(r) for r in runs_) if f is not None]
    methods: dict[str, list[dict]] = {}
    for r in runs_:
        methods.setdefault(r.method, [])
    for f in per_run:
        methods[f["method"]].append(f)
    rows = []
    for method, found in methods.items():
        planned = [r for r in runs_ if r.method == method]
        rows.append(
            {
                "method": method,
                "stage": planned[0].stage,
                "runs": f"{len(found)}/{len(planned)}",
                "gold_final": [f["gold_final"] for f in found],
                "gold_start": [f["gold_start"] for f in found],
                "kl": [f["kl"] for f in found],
                "proxy_final": [f["proxy_final"] for f in found],
                "wall_s": [f["wall_s"] for f in found],
                "episodes_per_s": [f["episodes_per_s"] for f in found],
                "completions": planned[0].completions or (found[0]["episodes"] if found else None),
            }
        )
    return rows, per_run


def plot_comparison(rows: list[dict], per_run: list[dict], out_dir: Path) -> list[tuple[str, Path]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.tools.report import save_figure

    plots = []
    shown_rows = [r for r in rows if _mean_std(r["gold_final"])[0] is not None]
    if shown_rows:
        fig, ax = plt.subplots(figsize=(1.3 * len(shown_rows) + 2, 3.4))
        means = [_mean_std(r["gold_final"]) for r in shown_rows]
        ax.bar([r["method"] for r in shown_rows], [m for m, _ in means], yerr=[s for _, s in means], capsize=4, color="tab:blue", alpha=0.8)
        start, _ = _mean_std([v for r in shown_rows for v in r["gold_start"]])
        if start is not None:
            ax.axhline(start, color="grey", linestyle="--", label=f"SFT {start:.3f}")
            ax.legend(fontsize=8)
        ax.set_ylabel("gold score (held out)")
        ax.set_title("final gold score, mean and spread over seeds")
        path = out_dir / "compare_gold.png"
        save_figure(fig, path)
        plots.append(("Final gold score per method (bars: mean over seeds; whiskers: standard deviation)", path))

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, row in enumerate(rows):
        colour = colours[i % len(colours)]
        for j, run in enumerate(f for f in per_run if f["method"] == row["method"]):
            label = row["method"] if j == 0 else None
            points = run["history"] or [{"kl": run["kl"], "gold": run["gold_final"], "proxy": None}]
            kls = [p["kl"] for p in points]
            style = {"marker": "o", "markersize": 3, "color": colour, "alpha": 0.8, "label": label}
            if any(p["gold"] is not None for p in points):
                left.plot(kls, [p["gold"] for p in points], **style)
            if any(p["proxy"] is not None for p in points):
                right.plot(kls, [p["proxy"] for p in points], **style)
    for ax, title in ((left, "gold score against KL"), (right, "proxy reward (the method's own) against KL")):
        ax.set_xlabel("KL to the SFT policy (nats per response, sampled)")
        ax.set_title(title)
        if ax.lines:
            ax.legend(fontsize=8)
    path = out_dir / "compare_kl.png"
    save_figure(fig, path)
    plots.append(("Gold and proxy reward against KL over training, every run of every method (DPO: its final point)", path))
    return plots


def write_comparison(root: Path, name: str, runs_: list[MethodRun], out_dir: Path) -> Path:
    """compare.md, compare.json and the plots, from the finished runs (unfinished ones are counted, not shown)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, per_run = summarise(runs_)
    if not per_run:
        raise UserError(f"no finished run of the comparison {name} under {root}: nothing to compare")
    atomic_write_bytes(out_dir / "compare.json", json.dumps({"methods": rows, "runs": per_run}, indent=1).encode())
    plots = plot_comparison(rows, per_run, out_dir)
    columns = ["method", "stage", "runs", "gold score (final)", "KL to SFT", "proxy reward (final)", "wall time (s)", "episodes/s", "completions"]
    table = []
    for r in rows:
        table.append(
            [
                r["method"], r["stage"], r["runs"], _pm(r["gold_final"]), _pm(r["kl"], 2), _pm(r["proxy_final"]),
                _pm(r["wall_s"], 0), _pm(r["episodes_per_s"], 1), str(r["completions"]) if r["completions"] else "-",
            ]
        )
    from pipeline.tools.report import markdown_table

    start, _ = _mean_std([f["gold_start"] for f in per_run])
    parts = [
        f"# Comparison: {name}",
        "",
        "Every method starts from the same SFT model"
        + (f" (gold score {start:.3f})" if start is not None else "")
        + " and is scored by the same gold judge on the same held-out prompts (greedy answers). "
        "Figures are mean ± standard deviation over seeds; KL is a sampled estimate of KL(policy || SFT) in nats per "
        "response; the proxy reward is the method's own reward on held-out prompts (the reward model's normalised score, "
        "or the gold reward for a method trained on it); episodes/s counts generated completions over the run's wall time "
        "(evaluations included).",
        "",
        markdown_table(columns, table),
        "",
    ]
    for title, file in plots:
        parts += [f"**{title}**", "", f"![{title}]({file.name})", ""]
    parts += ["## Every run", ""]
    parts.append(
        markdown_table(
            ["method", "seed", "gold start", "gold final", "KL", "wall time (s)", "run"],
            [[f["method"], str(f["seed"]), _pm([f["gold_start"]]), _pm([f["gold_final"]]), _pm([f["kl"]], 2), _pm([f["wall_s"]], 0), f"`{f['run_dir']}`"] for f in per_run],
        )
    )
    out = out_dir / COMPARE_FILE
    atomic_write_bytes(out, ("\n".join(parts) + "\n").encode())
    return out


def runs_of(pipeline_dir: Path) -> tuple[Path, str, list[MethodRun]]:
    """The comparison's runs from a pipeline run directory's saved config (for rewriting compare.md)."""
    from pipeline.tools.report import locate

    root, name = locate(pipeline_dir)
    saved = root / "all" / name / ".hydra" / "config.yaml"
    if not saved.is_file():
        raise UserError(f"{saved}: missing; give the run directory of a `python -m pipeline recipe=compare` run")
    cfg = OmegaConf.load(saved)
    if cfg.get("compare") is None:
        raise UserError(f"{root / 'all' / name} is not a comparison (its config has no compare section)")
    found = []
    for method, spec in cfg.compare.methods.items():
        for k in range(int(cfg.compare.seeds)):
            seed = int(cfg.seed) + k
            found.append(MethodRun(method, spec.stage, seed, root / spec.stage / f"{name}-{method}-s{seed}"))
    return root, name, found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.tools.compare", description="Write compare.md for a recipe=compare run.")
    parser.add_argument("path", help="the pipeline run directory (outputs/all/<name>) of a recipe=compare run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        root, name, found = runs_of(Path(args.path))
        out = write_comparison(root, name, found, root / "all" / name)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
