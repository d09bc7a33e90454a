"""pipeline.tools.report on its own: the figures table from whatever keys the stages wrote, bad paths, and the
compression table and plot from fake distill, prune and quantize runs (metrics.json and a model.pt of known size).

The whole report on a real pipeline run is checked by tests/test_pipeline.py.
"""

from __future__ import annotations

import json
import sys
import types

import pytest

from pipeline.tools import report


def test_figures_table_shows_missing_keys_and_unfinished_stages():
    metrics = {
        "pretrain": {"val/loss": 3.0, "val/ppl": 20.0855, "train/steps": 10, "time/total_s": 5.04, "perf/tokens_per_s": 12345.6},
        "reward": {"validation/accuracy": 0.7},  # no test split, no gold judge
    }
    columns, rows = report.figures_table(metrics, ["pretrain", "sft", "reward", "ppo"])
    assert columns == ["stage", "result", "steps", "time (s)", "tokens/s"]
    assert rows == [
        ["pretrain", "val loss 3.000 (perplexity 20.1; unigram baseline -)", "10", "5.0", "12,346"],
        ["sft", "not finished", "-", "-", "-"],
        ["reward", "validation accuracy 0.700, against the gold judge -", "-", "-", "-"],
        ["ppo", "not finished", "-", "-", "-"],
    ]
    assert report.markdown_table(["a", "b"], [["x|y", "two\nlines"]]).splitlines()[-1] == "| x\\|y | two lines |"


def test_report_command_names_what_it_cannot_use(tmp_path, capsys):
    assert report.main([str(tmp_path / "nowhere")]) == 2
    assert f"{tmp_path / 'nowhere'}: no such directory" in capsys.readouterr().err
    (tmp_path / "sft" / "x").mkdir(parents=True)
    assert report.main([str(tmp_path)]) == 2
    assert f"{tmp_path} holds no pipeline run" in capsys.readouterr().err


def _run(root, stage, name, metrics, model_bytes=None):
    """A fake finished stage run: metrics.json and, when model_bytes is given, a model.pt of that size (sparse: nothing written)."""
    run_dir = root / stage / name
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    if model_bytes is not None:
        with open(run_dir / "model.pt", "wb") as f:
            f.truncate(model_bytes)
    return run_dir


def _pipeline(tmp_path):
    """A pipeline run "run" under tmp_path/outputs: sft (the pretrained model's gold 0.133) and its final policy, ppo (gold 0.933)."""
    root = tmp_path / "outputs"
    (root / "all" / "run").mkdir(parents=True)
    _run(root, "sft", "run", {"gold/start": 0.133, "gold/final": 0.5}, 1000)
    _run(root, "ppo", "run", {"gold/final": 0.933}, 4_470_000)
    return root


def _compressed(root):
    """A distill, a prune and a quantize run of the ppo policy (each naming it another way), and runs to be left out."""
    teacher = root / "ppo" / "run"
    _run(root, "distill", "small", {
        "teacher_from": str(teacher / "model.pt"), "params/teacher": 1115264, "params/student": 541312,
        "gold/teacher": 0.933, "gold/final": 0.853, "kl/final": 1.25,
        "perf/teacher_tokens_per_s_b1": 100.0, "perf/student_tokens_per_s_b1": 190.0, "perf/speedup_b1": 1.9,
        "perf/teacher_tokens_per_s_b16": 1200.0, "perf/student_tokens_per_s_b16": 2300.0, "perf/speedup_b16": 1.9167,
    }, 2_170_000)
    _run(root, "prune", "p70", {
        "source": str(teacher), "method": "wanda", "prune/target_ratio": 0.7, "params/source": 1115264, "params/pruned": 780416,
        "gold/source": 0.933, "gold/pruned": 0.6, "gold/final": 0.9, "kl/final": 0.8,
        "perf/source_tokens_per_s_b1": 110.0, "perf/pruned_tokens_per_s_b1": 130.0, "perf/speedup_b1": 1.18,
    }, 3_130_000)
    _run(root, "quantize", "q8", {  # relative to the cwd, as the stages write it; batch sizes 1 and 4
        "source": "outputs/ppo/run/model.pt", "method": "int8", "model/params": 1115264, "gold/float": 0.933, "gold/quant": 0.93,
        "perf/float_tokens_per_s_b1": 105.0, "perf/quant_tokens_per_s_b1": 21.0, "perf/speedup_b1": 0.2,
        "perf/float_tokens_per_s_b4": 400.0, "perf/quant_tokens_per_s_b4": 100.0, "perf/speedup_b4": 0.25,
    }, 1_940_000)
    _run(root, "distill", "of_another", {"teacher_from": str(root / "ppo" / "other" / "model.pt"), "gold/final": 0.5, "perf/speedup_b2": 3.0}, 100)
    _run(root, "prune", "unfinished", {"source": str(teacher), "gold/final": 0.5}, None)  # no model.pt


def test_compression_rows_teacher_first_then_each_run_made_from_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = _pipeline(tmp_path)
    _compressed(root)
    models = report.compression_models(root, "run", report.stage_metrics(root, "run"))
    assert [m["model"] for m in models] == ["teacher (ppo/run)", "distill/small", "prune/p70 (wanda, 0.70)", "quantize/q8 (int8)"]
    assert models[1]["kept"] == pytest.approx((0.853 - 0.133) / (0.933 - 0.133)) == pytest.approx(0.9)
    columns, rows = report.compression_table(models)
    assert columns == [
        "model", "parameters", "model.pt (MB)", "tokens/s b1", "tokens/s b4", "tokens/s b16",
        "speed x teacher b1", "speed x teacher b4", "speed x teacher b16", "gold", "gold gain kept", "KL to teacher",
    ]
    assert rows == [  # the teacher's tokens/s: from the first run that timed it at that batch size
        ["teacher (ppo/run)", "1115264", "4.47", "100", "400", "1,200", "1.00", "1.00", "1.00", "0.933", "1.00", "-"],
        ["distill/small", "541312", "2.17", "190", "-", "2,300", "1.90", "-", "1.92", "0.853", "0.90", "1.250"],
        ["prune/p70 (wanda, 0.70)", "780416", "3.13", "130", "-", "-", "1.18", "-", "-", "0.900", "0.96", "0.800"],
        ["quantize/q8 (int8)", "1115264", "1.94", "21", "100", "-", "0.20", "0.25", "-", "0.930", "1.00", "-"],
    ]
    out = report.plot_compression(models, tmp_path / "compression.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compression_without_a_pretrained_baseline_or_a_teacher(tmp_path, monkeypatch):
    root = _pipeline(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    _compressed(root)
    (root / "sft" / "run" / "metrics.json").write_text(json.dumps({"gold/final": 0.5}))  # no gold/start
    models = report.compression_models(root, "run", report.stage_metrics(root, "run"))
    assert [m["kept"] for m in models] == [None] * 3  # the quantize run's relative path does not resolve from this cwd
    (root / "ppo" / "run" / "model.pt").unlink()  # the ppo run has not finished: sft is the final policy, nothing made from it
    assert report.compression_models(root, "run", report.stage_metrics(root, "run")) == []


def test_pareto_front_keeps_the_points_none_beats_in_both():
    points = [(1.0, 0.93), (1.9, 0.85), (1.2, 0.9), (1.1, 0.8), (0.2, 0.93), (1.9, 0.7)]
    assert report.pareto_front(points) == [(1.0, 0.93), (1.2, 0.9), (1.9, 0.85)]


def test_report_has_a_compression_section_only_with_compressed_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(report, "side_by_side", lambda *a: ([], [], {}))  # the fake model.pt files cannot answer
    root = _pipeline(tmp_path)
    text = report.write_report(root / "all" / "run").read_text()
    assert "## Compression" not in text and not (root / "all" / "run" / "compression.png").exists()
    _compressed(root)
    logged = {}

    class Run:  # wandb.init's run: records what the report logs
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def log(self, payload):
            logged.update(payload)

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: Run(), Table=lambda columns, data: (columns, data), Image=lambda file, caption: file))
    text = report.write_report(root / "all" / "run", wandb_project="p").read_text()
    assert logged["report/compression"] == report.compression_table(report.compression_models(root, "run", report.stage_metrics(root, "run")))
    assert logged["report/compression_plot"] == str(root / "all" / "run" / "compression.png")
    section = text[text.index("## Compression"):]
    assert "| teacher (ppo/run) | 1115264 |" in section and "| quantize/q8 (int8) |" in section and "of_another" not in section
    assert "![Compression: gold score against speed](compression.png)" in section
    assert (root / "all" / "run" / "compression.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_time_table_sets_each_stages_phases_beside_its_process_wall_time(tmp_path):
    from pipeline.tools.report import TIMING_FILE, time_table

    (tmp_path / "all" / "run").mkdir(parents=True)
    (tmp_path / "all" / "run" / TIMING_FILE).write_text(json.dumps({"stages": {"pretrain": 10.0, "sft": 6.0}}))
    metrics = {
        "pretrain": {"time/phases": {"start": 2.0, "data": 1.0, "train steps": 5.0, "other": 0.5}},
        "sft": {"time/phases": {"start": 2.0, "train steps": 3.0, "eval": 0.5}},
        "reward": {"val/loss": 0.1},  # an older run, without the breakdown: not in the table
    }
    columns, rows = time_table(tmp_path, "run", metrics)
    assert columns[:4] == ["stage", "wall", "start", "data"] and columns[-2:] == ["other", "after"]
    by = {row[0]: dict(zip(columns, row)) for row in rows}
    assert set(by) == {"pretrain", "sft", "all"}
    assert by["pretrain"]["wall"] == "10.0" and by["pretrain"]["train steps"] == "5.0" and by["pretrain"]["after"] == "1.5"  # 10 - 8.5
    assert by["sft"]["data"] == "0.0" and by["sft"]["after"] == "0.5"
    assert by["all"]["wall"] == "16.0" and by["all"]["train steps"] == "8.0" and by["all"]["after"] == "2.0"
    assert time_table(tmp_path, "run", {"reward": {"val/loss": 0.1}}) is None
    # Forked stages: the recipe's process paid the imports once; they are a row of their own and part of the total.
    (tmp_path / "all" / "run" / TIMING_FILE).write_text(json.dumps({"stages": {"pretrain": 10.0, "sft": 6.0}, "imports": 4.0}))
    by = {row[0]: dict(zip(columns, row)) for row in time_table(tmp_path, "run", metrics)[1]}
    assert by["(imports, once)"]["wall"] == "4.0" and by["all"]["wall"] == "20.0" and by["all"]["train steps"] == "8.0"
