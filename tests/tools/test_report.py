"""pipeline.tools.report on its own: the figures table from whatever keys the stages wrote, and bad paths.

The whole report on a real pipeline run is checked by tests/test_pipeline.py.
"""

from __future__ import annotations

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
