"""The console says each thing once: no line twice, no advertisements or notices a user cannot act on,
the run directory at the end, and a bad input's `error:` line exactly once (pipeline/console.py)."""

from __future__ import annotations

import io
import logging
import warnings

from console_lines import messages, noise, said_twice
from helpers import TINY, run_pipeline

from pipeline import console

RUN = ("stage=pretrain", "trainer.max_steps=4", "trainer.val_check_interval=2", *TINY)


def test_setup_sends_lightning_lines_through_the_root_handlers_once_without_noise(tmp_path):
    """In one process: Lightning's own handler goes, its lines reach Hydra's handlers once, noise reaches none,
    and a FILE_ONLY record reaches the log file but not the console."""
    names = ("", *console.LIGHTNING_LOGGERS)
    saved = {name: (logging.getLogger(name).handlers[:], logging.getLogger(name).propagate) for name in names}
    screen, own = io.StringIO(), io.StringIO()
    log_file = logging.FileHandler(tmp_path / "run.log")
    try:
        logging.getLogger().handlers = [logging.StreamHandler(screen), log_file]  # what Hydra sets up
        logging.getLogger("lightning").handlers = [logging.StreamHandler(own)]  # what importing Lightning adds
        with warnings.catch_warnings(record=True) as caught:
            console.setup()
            console.setup()  # idempotent: Hydra may configure logging again in the same process
            lightning_log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
            lightning_log.info("GPU available: False, used: False")
            lightning_log.info("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]")
            logging.getLogger("pipeline").error("data.path=x: no such file", extra={console.FILE_ONLY: True})
            warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
            warnings.warn("a warning the user can act on", UserWarning)
        log_file.flush()
        assert screen.getvalue() == "GPU available: False, used: False\n"
        assert own.getvalue() == ""
        assert (tmp_path / "run.log").read_text() == "GPU available: False, used: False\ndata.path=x: no such file\n"
        assert [str(w.message) for w in caught] == ["a warning the user can act on"]
    finally:
        log_file.close()
        for name, (handlers, propagate) in saved.items():
            logging.getLogger(name).handlers, logging.getLogger(name).propagate = handlers, propagate


def test_a_stage_and_its_resume_say_each_thing_once_and_name_the_run_directory(outputs_root, corpus, monkeypatch):
    monkeypatch.delenv("WANDB_SILENT", raising=False)  # W&B's own warnings are part of what a user sees
    first = run_pipeline(*RUN, f"data.path={corpus}", root=outputs_root)
    (run_dir,) = [d for d in (outputs_root / "pretrain").iterdir() if d.is_dir()]
    (run_dir / "metrics.json").unlink()  # unfinished again: the same command resumes from checkpoints/last.ckpt
    resumed = run_pipeline(*RUN, f"data.path={corpus}", root=outputs_root)
    assert any("Restored all states" in m for m in messages(resumed.stdout + resumed.stderr))
    for result in (first, resumed):
        output = result.stdout + result.stderr
        assert said_twice(output) == {}
        assert noise(output) == []
        assert messages(result.stdout)[-1] == f"pretrain run directory: {run_dir}"
        assert any(m.startswith("pretrain finished:") for m in messages(result.stdout))


def test_a_bad_input_says_its_error_once(outputs_root, tmp_path):
    missing = tmp_path / "missing.jsonl"
    result = run_pipeline("stage=pretrain", f"data.path={missing}", *TINY, root=outputs_root, check=False)
    assert result.returncode == 2, result.stderr[-2000:]
    output = result.stdout + result.stderr
    errors = [line for line in output.splitlines() if str(missing) in line]
    assert len(errors) == 1 and errors[0].startswith("error: "), errors
    assert "Traceback" not in output
    (log_file,) = (outputs_root / "pretrain").glob("*/__main__.log")  # the run's log file keeps it
    assert str(missing) in log_file.read_text()
