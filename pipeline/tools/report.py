"""The pipeline's report: one Markdown page with every stage's figures, curves and answers side by side.

    python -m pipeline.tools.report outputs/all/default     # a pipeline run directory
    python -m pipeline.tools.report outputs                  # the newest pipeline run under an outputs root

`python -m pipeline` writes it at the end of the run, into its own run directory (<root>/all/<name>/):
report.md, loss.png, ppo.png and overoptimisation.png, and compression.png when distill, prune or
quantize runs were made from the pipeline's final policy. Everything is read from the stage runs'
metrics.json and history.jsonl; the side-by-side answers are generated here (greedy, the embedded
task's held-out prompts, scored by the gold judge).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
from pathlib import Path

from pipeline import runs
from pipeline.errors import UserError
from pipeline.files import atomic_write_bytes, read_json
from pipeline.stages import RECIPE_RUNNER, STAGES, training_stages
from pipeline.training import HISTORY_FILE, history_series, read_history

log = logging.getLogger(__name__)

REPORT_FILE = "report.md"
TIMING_FILE = "timing.json"  # the recipe runner's wall time of each stage process (pipeline/__main__.py)
PIPELINE_DIR = RECIPE_RUNNER  # `python -m pipeline` is stage=all: its own run directory is <root>/all/<name>
TEACHER_STAGES = STAGES["distill"].inputs["teacher_from"]  # the policies a model is compressed from
# The compressing stages and the keys of their metrics.json: the model it was made from, the parameter counts (the
# compressed model's, then its source's), the compressed model's gold score, and the names of the two models in
# perf/<name>_tokens_per_s_b<B> (the source, then the compressed model; both timed in the run, in turn).
COMPRESSION_KEYS = {
    "distill": {"from": "teacher_from", "params": ("params/student", "params/teacher"), "gold": "gold/final", "speed": ("teacher", "student")},
    "prune": {"from": "source", "params": ("params/pruned", "params/source"), "gold": "gold/final", "speed": ("source", "pruned")},
    "quantize": {"from": "source", "params": ("model/params", "model/params"), "gold": "gold/quant", "speed": ("float", "quant")},
}
_SPEEDUP = re.compile(r"perf/speedup_b(\d+)$")


def locate(path: Path) -> tuple[Path, str]:
    """(outputs root, pipeline run name) from a pipeline run directory or an outputs root."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: no such directory (give a pipeline run directory such as outputs/all/default, or an outputs root)")
    if path.parent.name == PIPELINE_DIR:
        return path.parent.parent, path.name
    candidates = [d for d in (path / PIPELINE_DIR).glob("*") if d.is_dir() and any((path / s.name / d.name).is_dir() for s in training_stages())]
    if not candidates:
        raise UserError(f"{path} holds no pipeline run: expected {path / PIPELINE_DIR}/<name>/ beside {path}/<stage>/<name>/ (made by `python -m pipeline`)")
    newest = max(candidates, key=lambda d: d.stat().st_mtime)
    return path, newest.name


def recipe_stages(root: Path, name: str) -> list[str]:
    """The stages of the pipeline run: its recipe's (from its saved config), else every training stage."""
    saved = root / PIPELINE_DIR / name / ".hydra" / "config.yaml"
    if saved.is_file():
        from omegaconf import OmegaConf

        stages = OmegaConf.select(OmegaConf.load(saved), "recipe.stages")
        if stages:
            return [s for s in stages if s in STAGES]
    return [s.name for s in training_stages()]


def stage_metrics(root: Path, name: str) -> dict[str, dict]:
    """Each finished stage's metrics.json, in the recipe's order (a stage that has not finished is absent)."""
    out = {}
    for stage in recipe_stages(root, name):
        file = root / stage / name / runs.METRICS_FILE
        if file.is_file():
            out[stage] = read_json(file)
    return out


def fmt(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.{digits}f}"
    return str(value)


def arrow(metrics: dict, start: str, final: str) -> str:
    return f"{fmt(metrics.get(start))} -> {fmt(metrics.get(final))}"


_FIELD = re.compile(r"\{([^{}:]+)(?::([^{}]+))?\}")


def headline(stage: str, m: dict) -> str:
    """The figures that say how a stage did, in words, from the registry's template; keys a run lacks show as '-'.

    {key} is a figure of m, {a|b} the first of the keys m has; {key:N} shows N digits and {a|b:split}
    the split the first present key belongs to (the part before '/').
    """

    def field(match: re.Match) -> str:
        keys, option = match.group(1).split("|"), match.group(2)
        key = next((k for k in keys if k in m), keys[0])
        if option == "split":
            return key.split("/", 1)[0]
        return fmt(m.get(key), int(option) if option else 3)

    return _FIELD.sub(field, STAGES[stage].headline) if stage in STAGES else ""


def figures_table(metrics: dict[str, dict], stages: list[str]) -> tuple[list[str], list[list[str]]]:
    columns = ["stage", "result", "steps", "time (s)", "tokens/s"]
    rows = []
    for stage in stages:
        m, spec = metrics.get(stage), STAGES[stage]
        if m is None:
            rows.append([stage, "not finished", "-", "-", "-"])
            continue
        steps = fmt(m.get(spec.steps))
        if spec.steps != "train/steps":  # PPO counts iterations
            steps += " " + spec.steps.split("/", 1)[1]
        speed = fmt(m.get(spec.speed), 0)
        if spec.speed != "perf/tokens_per_s":  # PPO's throughput is that of its rollouts (generated tokens)
            speed += " (generation)"
        rows.append([stage, headline(stage, m), steps, fmt(m.get("time/total_s"), 1), speed])
    return columns, rows


def time_table(root: Path, name: str, metrics: dict[str, dict]) -> tuple[list[str], list[list[str]]] | None:
    """Where each stage's wall time went (seconds): its process's wall time (the recipe runner's timing.json) and the
    phases the run timed itself (metrics.json's time/phases, pipeline/timing.py); None when no stage has them.

    `after` is what the process spent once metrics.json was written (W&B's closing sync, exit): its wall time less the phases.
    """
    from pipeline.timing import PHASES

    timed = {stage: m["time/phases"] for stage, m in metrics.items() if isinstance(m.get("time/phases"), dict)}
    if not timed:
        return None
    file = root / PIPELINE_DIR / name / TIMING_FILE
    recipe = read_json(file) if file.is_file() else {}
    wall = recipe.get("stages", {})
    names = [*PHASES, *sorted({k for p in timed.values() for k in p} - set(PHASES))]
    columns = ["stage", "wall", *names, "after"]
    rows, totals = [], [0.0] * (len(names) + 2)
    for stage, phases in timed.items():
        values = [wall.get(stage), *(phases.get(k, 0.0) for k in names)]
        values.append(values[0] - sum(phases.values()) if values[0] is not None else None)
        rows.append([stage, *(fmt(v, 1) for v in values)])
        totals = [t + (v or 0.0) for t, v in zip(totals, values)]
    if recipe.get("imports"):  # the recipe's process imported the stages' libraries once, before forking them
        rows.append(["(imports, once)", fmt(recipe["imports"], 1), *("" for _ in names), ""])
        totals[0] += recipe["imports"]
    if len(rows) > 1:
        rows.append(["all", *(fmt(t, 1) if i or wall else "-" for i, t in enumerate(totals))])
    return columns, rows


def markdown_table(columns: list[str], rows: list[list[str]]) -> str:
    def cell(text) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def plot_losses(root: Path, name: str, out: Path) -> Path | None:
    """One panel per stage: its loss curves over optimisation steps, from history.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for stage in recipe_stages(root, name):
        keys = STAGES[stage].curves
        rows = read_history(root / stage / name / HISTORY_FILE)
        lines = [(key, *history_series(rows, key)) for key in keys]
        lines = [line for line in lines if line[1]]
        if lines:
            panels.append((stage, lines))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (stage, lines) in zip(axes[0], panels):
        for key, steps, values in lines:
            ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=key)
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    save_figure(fig, out)
    return out


def save_figure(fig, path: Path) -> None:
    """PNG bytes written atomically, like every other result file: a kill never leaves half an image."""
    import io

    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def plot_online_rl(root: Path, name: str, stage: str, metrics: dict | None, out_curves: Path, out_overopt: Path) -> list[Path]:
    """An online RL stage's reward, gold score and KL over iterations, and the over-optimisation curve (reward vs KL).

    The held-out evaluations (greedy answers every ppo.eval_every iterations) come from metrics.json's
    history; the rollout figures per step (objective/scores, objective/kl) from history.jsonl.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = (metrics or {}).get("history") or []
    if not evals:
        return []
    its = [p["iteration"] for p in evals]
    rows = read_history(root / stage / name / HISTORY_FILE)
    written = []

    def panel(ax, title: str, held_out: list[tuple[str, str]], rollout_key: str, rollout_label: str) -> None:
        """Held-out evaluations (markers) and the rollouts' own figure (a faint line) over iterations."""
        for key, label in held_out:
            ax.plot(its, [p.get(key) for p in evals], marker="o", label=label)
        steps, values = history_series(rows, rollout_key)
        if steps:
            ax.plot(_as_iterations(steps), values, alpha=0.5, label=rollout_label)
        ax.set_xlabel("iteration")
        ax.set_title(title)
        ax.legend(fontsize=8)

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    # The proxy: the RM's score (PPO, GRPO on a reward model), else the stage's own reward (GRPO on gold or a function).
    proxy, proxy_label = ("eval/rm_score", "RM score") if all("eval/rm_score" in p for p in evals) else ("eval/reward", "reward")
    reward_series = [(proxy, f"{proxy_label} (held out)")]
    if all("eval/gold_score" in p for p in evals) and proxy_label == "RM score":
        reward_series.append(("eval/gold_score", "gold score (held out)"))
    rollout_reward = "objective/scores" if history_series(rows, "objective/scores")[0] else "reward"
    panel(left, "reward", reward_series, rollout_reward, f"{proxy_label} (rollouts)")
    panel(right, "KL (nats per response)", [("eval/kl", "KL to SFT, sampled (held out)")], "objective/kl", "KL (rollouts)")
    save_figure(fig, out_curves)
    written.append(out_curves)

    fig, ax = plt.subplots(figsize=(5, 3.6))
    kls = [p.get("eval/kl") for p in evals]
    ax.plot(kls, [p.get(proxy) for p in evals], marker="o", label=f"proxy: {proxy_label}")
    if all("eval/gold_score" in p for p in evals):
        ax.plot(kls, [p["eval/gold_score"] for p in evals], marker="o", label="gold score")
    ax.set_xlabel("KL to the SFT policy (nats per response, sampled estimate)")
    ax.set_ylabel("score")
    ax.set_title("reward over-optimisation")
    ax.legend(fontsize=8)
    save_figure(fig, out_overopt)
    written.append(out_overopt)
    return written


def _as_iterations(steps: list[int]) -> list[int]:
    """PPO logs once per iteration at Lightning's batch step: step k holds the rollout and update of iteration k + 1."""
    return [s + 1 for s in steps]


def final_policy(root: Path, name: str, metrics: dict[str, dict]) -> str | None:
    """The pipeline run's final policy: the recipe's last finished stage among those a model is compressed from."""
    return next((s for s in reversed(list(metrics)) if s in TEACHER_STAGES and runs.is_finished(root / s / name)), None)


def _run_dir(path: str) -> Path:
    """A run directory or its model.pt, as the resolved run directory (relative paths are the stages' own: from the cwd)."""
    path = Path(path)
    return (path.parent if path.name == runs.MODEL_FILE else path).resolve()


def _file_mb(run_dir: Path) -> float | None:
    """The size of the run's model.pt in MB (what generate and serve load), or None when it has none."""
    file = run_dir / runs.MODEL_FILE
    return file.stat().st_size / 1e6 if file.is_file() else None


def compression_models(root: Path, name: str, metrics: dict[str, dict]) -> list[dict]:
    """The final policy (the teacher) and every finished distill, prune and quantize run made from it, teacher first.

    A run belongs here when the path it names as its teacher or source resolves to the teacher's run directory,
    whatever the run's own name. Each entry: model (its label), params, mb (model.pt size), tokens and speedup
    ({batch size: tokens/s, and the ratio to the teacher measured in the same run}), gold, kept (the share of the
    teacher's gold gain over the pretrained model, sft's gold/start, that it keeps) and kl (to the teacher).
    Empty when there is no teacher or nothing was made from it.
    """
    stage = final_policy(root, name, metrics)
    if stage is None:
        return []
    teacher_dir = (root / stage / name).resolve()
    found = []
    for kind, keys in COMPRESSION_KEYS.items():
        for run_dir in sorted(d for d in (root / kind).glob("*") if runs.is_finished(d)):
            m = read_json(run_dir / runs.METRICS_FILE)
            if m.get(keys["from"]) and _run_dir(m[keys["from"]]) == teacher_dir:
                found.append((kind, run_dir, m))
    if not found:
        return []
    batches = sorted({int(b.group(1)) for _, _, m in found for b in map(_SPEEDUP.match, m) if b})
    teacher_gold = metrics[stage].get("gold/final")
    baseline = metrics.get("sft", {}).get("gold/start")

    def kept(gold: float | None) -> float | None:
        if gold is None or teacher_gold is None or baseline is None or teacher_gold == baseline:
            return None
        return (gold - baseline) / (teacher_gold - baseline)

    def first(key_of):
        """The teacher's figure from the first compressed run that measured it (key_of: a stage's key for it)."""
        return next((m[key_of(kind)] for kind, _, m in found if key_of(kind) in m), None)

    teacher = {
        "model": f"teacher ({stage}/{name})",
        "params": first(lambda kind: COMPRESSION_KEYS[kind]["params"][1]),
        "mb": _file_mb(teacher_dir),
        "tokens": {b: first(lambda kind: f"perf/{COMPRESSION_KEYS[kind]['speed'][0]}_tokens_per_s_b{b}") for b in batches},
        "speedup": {b: 1.0 for b in batches},
        "gold": teacher_gold,
        "kept": kept(teacher_gold),
        "kl": None,
    }
    models = [teacher]
    for kind, run_dir, m in found:
        keys = COMPRESSION_KEYS[kind]
        label = f"{kind}/{run_dir.name}"
        if kind == "prune":
            label += f" ({m.get('method')}, {fmt(m.get('prune/target_ratio'), 2)})"
        elif kind == "quantize":
            label += f" ({m.get('method')})"
        models.append({
            "model": label,
            "params": m.get(keys["params"][0]),
            "mb": _file_mb(run_dir),
            "tokens": {b: m.get(f"perf/{keys['speed'][1]}_tokens_per_s_b{b}") for b in batches},
            "speedup": {b: m.get(f"perf/speedup_b{b}") for b in batches},
            "gold": m.get(keys["gold"]),
            "kept": kept(m.get(keys["gold"])),
            "kl": m.get("kl/final"),
        })
    return models


def compression_table(models: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The compression table: a row per model of compression_models, its batch sizes taken from the entries."""
    batches = list(models[0]["speedup"])
    columns = [
        "model", "parameters", "model.pt (MB)",
        *(f"tokens/s b{b}" for b in batches), *(f"speed x teacher b{b}" for b in batches),
        "gold", "gold gain kept", "KL to teacher",
    ]
    rows = [
        [
            m["model"], fmt(m["params"]), fmt(m["mb"], 2),
            *(fmt(m["tokens"][b], 0) for b in batches), *(fmt(m["speedup"][b], 2) for b in batches),
            fmt(m["gold"]), fmt(m["kept"], 2), fmt(m["kl"]),
        ]
        for m in models
    ]
    return columns, rows


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats in both coordinates (at least as good in both, better in one), by x."""

    def beaten(p) -> bool:
        return any(q[0] >= p[0] and q[1] >= p[1] and q != p for q in points)

    return sorted({p for p in points if not beaten(p)})


def plot_compression(models: list[dict], out: Path) -> Path | None:
    """Gold score against speed relative to the teacher at the smallest batch size, each model labelled, the Pareto front joined.

    The x axis is each run's in-run ratio (both models timed in the same process, in turn), not absolute tokens/s,
    which move with the machine's load between runs; the teacher sits at x = 1.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch = min(models[0]["speedup"], default=None)
    points = [(m["speedup"][batch], m["gold"], m["model"]) for m in models if batch is not None and m["speedup"][batch] is not None and m["gold"] is not None]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.scatter([x for x, _, _ in points], [y for _, y, _ in points], zorder=3)
    for x, y, label in points:
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    front = pareto_front([(x, y) for x, y, _ in points])
    ax.plot([x for x, _ in front], [y for _, y in front], linestyle="--", color="grey", label="Pareto front", zorder=2)
    ax.margins(x=0.25, y=0.1)  # room for the labels of the outermost points
    ax.set_xlabel(f"tokens/s relative to the teacher at batch {batch} (measured in the same run)")
    ax.set_ylabel("gold score")
    ax.set_title("compression: gold score against speed")
    ax.legend(fontsize=8)
    save_figure(fig, out)
    return out


def side_by_side(root: Path, name: str, n_prompts: int, max_new_tokens: int) -> tuple[list[str], list[list[str]], dict[str, float]]:
    """The same held-out prompts answered greedily by each finished policy, with gold scores."""
    import torch

    from pipeline.data.chat import prompt_text
    from pipeline.evaluate import complete
    from pipeline.tasks import default_task

    task = default_task()
    gold_score = task.gold_score
    prompts = [row["prompt"] for row in task.prompt_rows("test", n_prompts)]
    texts = [prompt_text(p) for p in prompts]
    answers: dict[str, list[str]] = {}
    for stage in (s for s in recipe_stages(root, name) if STAGES[s].policy):
        run_dir = root / stage / name
        if not runs.is_finished(run_dir):
            continue
        model, tokenizer, _, _ = runs.load_start(str(run_dir), (), root, "report")
        if torch.cuda.is_available():
            model.cuda()
        answers[stage] = complete(model.eval(), tokenizer, prompts, max_new_tokens=max_new_tokens)
    columns = ["prompt", *answers]
    rows, means = [], {}
    for stage, outs in answers.items():
        means[stage] = sum(gold_score(t, a) for t, a in zip(texts, outs)) / max(1, len(texts))
    for i, text in enumerate(texts):
        rows.append([text, *(f"{outs[i] or '(empty)'} (gold {gold_score(text, outs[i]):.2f})" for outs in answers.values())])
    return columns, rows, means


def write_report(path: Path, *, n_prompts: int = 8, max_new_tokens: int = 48, wandb_project: str | None = None, wandb_entity: str | None = None, wandb_group: str | None = None) -> Path:
    """Write report.md and its plots into the pipeline run directory; returns the report's path."""
    root, name = locate(path)
    out_dir = root / PIPELINE_DIR / name
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = stage_metrics(root, name)
    if not metrics:
        raise UserError(f"no finished stage run named {name} under {root}: nothing to report")
    columns, rows = figures_table(metrics, recipe_stages(root, name))
    plots = []
    if loss := plot_losses(root, name, out_dir / "loss.png"):
        plots.append(("Loss per stage", loss))
    for i, (stage, m) in enumerate((s, m) for s, m in metrics.items() if m.get("history")):  # the online RL stages
        overopt = out_dir / ("overoptimisation.png" if i == 0 else f"overoptimisation_{stage}.png")
        titles = (f"{stage.upper()}: reward and KL over iterations", f"{stage.upper()}: reward over-optimisation, gold and proxy reward against KL")
        plots += list(zip(titles, plot_online_rl(root, name, stage, m, out_dir / f"{stage}.png", overopt)))
    answer_columns, answer_rows, means = side_by_side(root, name, n_prompts, max_new_tokens)
    times = time_table(root, name, metrics)
    compressed = compression_models(root, name, metrics)
    compression = compression_table(compressed) if compressed else None
    compression_plot = plot_compression(compressed, out_dir / "compression.png") if compressed else None

    parts = [
        f"# Pipeline report: {name}",
        "",
        "Stage runs: " + ", ".join(f"`{root / stage / name}`" for stage in metrics) + ".",
        "",
        "## Figures",
        "",
        markdown_table(columns, rows),
        "",
    ]
    if times:
        parts += [
            "## Where the time went",
            "",
            "Seconds per stage: `wall` is the stage's process from start to exit (the recipe runner's clock); the phases are the "
            "run's own, never overlapping (pipeline/timing.py): `start` Python, imports, config composition and checks; `data` "
            "loading, building and tokenising data (or reading the cache); `train steps` the optimisation steps (PPO: rollouts "
            "and updates); `validation` the validation loops; `checkpoints` writing them; `fit` the rest of the training loop "
            "(batches collated, metrics logged, W&B's start); `eval` answers generated and scored by the gold judge, KL "
            "estimates; `finish` model.pt and the W&B artifact; `other` what no phase holds (loading models, building "
            "modules); `after` W&B's closing sync and the exit, once metrics.json was written.",
            "",
            markdown_table(*times),
            "",
        ]
    if plots:
        parts += ["## Curves", ""]
        for title, file in plots:
            parts += [f"**{title}**", "", f"![{title}]({file.name})", ""]
    if answer_rows:
        parts += [
            "## The same prompts, answered by each model",
            "",
            f"{len(answer_rows)} held-out prompts of the embedded task, greedy answers of at most {max_new_tokens} tokens, "
            "each with its gold-judge score (0 to 1). Mean gold score: " + ", ".join(f"{s} {v:.3f}" for s, v in means.items()) + ".",
            "",
            markdown_table(answer_columns, answer_rows),
            "",
        ]
    if compression:
        parts += [
            "## Compression",
            "",
            "The pipeline's final policy (the teacher, first row) and the models made smaller from it: parameters, "
            "model.pt size, tokens/s generating at each batch size, the same speed relative to the teacher, gold score, the share of "
            "the teacher's gold gain over the pretrained model (sft's gold/start) kept, and KL to the teacher (nats per answer). "
            "Each speed ratio is measured in one process, the two models in turn, so it survives a noisy machine; "
            "the absolute tokens/s do not compare across runs.",
            "",
            markdown_table(*compression),
            "",
        ]
        if compression_plot:
            parts += [f"![Compression: gold score against speed]({compression_plot.name})", ""]
    report = out_dir / REPORT_FILE
    atomic_write_bytes(report, "\n".join(parts).encode())
    log.info("report written to %s", report)
    if wandb_project:
        log_to_wandb(wandb_project, wandb_entity, wandb_group or f"pipeline-{name}", name, columns, rows, answer_columns, answer_rows, plots, out_dir, compression, compression_plot)
    return report


def log_to_wandb(project: str, entity: str | None, group: str, name: str, columns, rows, answer_columns, answer_rows, plots, out_dir: Path, compression=None, compression_plot: Path | None = None) -> None:
    """The report as a W&B run of the pipeline's group (job type 'report'): the tables and the plots.

    compression: the compression table's (columns, rows), or None; its plot is report/compression_plot, beside the table's key.
    """
    import wandb

    from pipeline.training import wandb_mode

    os.environ.setdefault("WANDB_SILENT", "true")
    with wandb.init(project=project, entity=entity, group=group, job_type="report", name=f"report/{name}", dir=str(out_dir), mode=wandb_mode()) as run:
        payload = {"report/figures": wandb.Table(columns=columns, data=rows)}
        if answer_rows:
            payload["report/answers"] = wandb.Table(columns=answer_columns, data=answer_rows)
        if compression:
            payload["report/compression"] = wandb.Table(columns=compression[0], data=compression[1])
        if compression_plot:
            payload["report/compression_plot"] = wandb.Image(str(compression_plot), caption="Compression: gold score against speed")
        for title, file in plots:
            payload[f"report/{file.stem}"] = wandb.Image(str(file), caption=title)
        run.log(payload)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.tools.report", description="Write report.md for a pipeline run.")
    parser.add_argument("path", help="a pipeline run directory (outputs/all/<name>) or an outputs root (its newest pipeline run)")
    parser.add_argument("--prompts", type=int, default=8, help="held-out prompts answered side by side")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--wandb-project", default=None, help="also log the tables and plots to this W&B project")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        report = write_report(Path(args.path), n_prompts=args.prompts, max_new_tokens=args.max_new_tokens, wandb_project=args.wandb_project)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
