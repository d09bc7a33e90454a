"""The shared Lightning plumbing: the history.jsonl every stage run writes for the report."""

from __future__ import annotations

from pipeline.training import History, history_series, read_history


def test_history_appends_and_a_resumed_run_overrides_the_steps_it_logs_again(tmp_path):
    path = tmp_path / "history.jsonl"
    killed = History(path)
    for step in range(1, 8):
        killed.log_metrics({"train/loss": 10.0 - step, "epoch": 0}, step=step)
        if step == 4:
            killed.log_metrics({"val/loss": 3.5}, step=4)
    with path.open("a") as f:
        f.write('{"step": 8, "train/lo')  # the kill tears the last line
    assert len(read_history(path)) == 8 and all("epoch" not in r for r in read_history(path))

    resumed = History(path)  # resumes from the checkpoint of step 4: steps 5.. are trained and logged again
    for step in range(5, 9):
        resumed.log_metrics({"train/loss": 1.0 / step}, step=step)
    rows = read_history(path)
    assert len(rows) == 12  # nothing rewritten, the torn line skipped
    assert history_series(rows, "train/loss") == ([1, 2, 3, 4, 5, 6, 7, 8], [9.0, 8.0, 7.0, 6.0, 0.2, 1 / 6, 1 / 7, 0.125])
    assert history_series(rows, "val/loss") == ([4], [3.5])
