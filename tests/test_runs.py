"""Run directories, lineage and model files."""

from __future__ import annotations

import os
import time

import pytest
import torch

from pipeline import runs
from pipeline.errors import UserError
from pipeline.files import read_json, write_dir_atomically, write_json
from pipeline.model import GPT, GPTConfig, ScalarGPT
from pipeline.stages import STAGES


def small_config(**kw) -> GPTConfig:
    return GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16, **kw)


def test_run_name_is_stable_and_path_safe():
    assert runs.run_name("") == "default"
    assert runs.run_name("optim.lr=0.001,trainer.max_steps=5") == "optim.lr_0.001_trainer.max_steps_5"
    long = runs.run_name("data.path=/some/where/file.jsonl")
    assert "/" not in long and long == runs.run_name("data.path=/some/where/file.jsonl")
    assert long != runs.run_name("data.path=/some/where/other.jsonl")


def test_atomic_write_leaves_no_temporary_files(tmp_path):
    write_json(tmp_path / "metrics.json", {"a": 1.5})
    write_json(tmp_path / "metrics.json", {"a": 2.5})
    assert read_json(tmp_path / "metrics.json") == {"a": 2.5}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_newest_finished_run_skips_unfinished(tmp_path):
    model = GPT(small_config())
    for i, name in enumerate(["a", "b", "c"]):
        d = tmp_path / "pretrain" / name
        d.mkdir(parents=True)
        if name != "c":  # c never finished
            runs.save_model(d / runs.MODEL_FILE, model, kind="lm", stage="pretrain")
            write_json(d / runs.METRICS_FILE, {"i": i})
            os.utime(d / runs.METRICS_FILE, (time.time() + i, time.time() + i))
    (tmp_path / "pretrain" / "c" / "checkpoints").mkdir()
    assert runs.newest_finished_run(tmp_path, "pretrain").name == "b"
    assert runs.resolve_start(None, STAGES["sft"].starts_from, tmp_path, "sft") == tmp_path / "pretrain" / "b" / runs.MODEL_FILE
    with pytest.raises(UserError, match="stage=sft` first"):
        runs.resolve_start(None, STAGES["reward"].starts_from, tmp_path, "reward")


def test_model_file_round_trip_into_a_scalar_model(tmp_path):
    torch.manual_seed(0)
    model = GPT(small_config())
    runs.save_model(tmp_path / "model.pt", model, kind="lm", stage="sft", extra={"k": 1})
    payload = runs.load_model_payload(tmp_path / "model.pt")
    again = runs.build_model(payload, GPT, tmp_path)
    x = torch.randint(0, 64, (2, 8))
    torch.testing.assert_close(again(x), model(x))
    scalar = runs.build_model(payload, ScalarGPT, tmp_path)
    assert scalar(x).shape == (2, 8)
    assert payload["extra"] == {"k": 1}


def test_weights_of_another_architecture_are_named(tmp_path):
    runs.save_model(tmp_path / "model.pt", GPT(small_config()), kind="lm", stage="pretrain")
    payload = runs.load_model_payload(tmp_path / "model.pt")
    with pytest.raises(UserError, match="do not fit the model architecture.*wte.weight"):
        runs.load_weights(GPT(GPTConfig(vocab_size=128, block_size=16, n_layer=1, n_head=2, n_embd=16)), payload["state_dict"], tmp_path)
    with pytest.raises(UserError, match="missing"):
        runs.load_weights(GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16)), payload["state_dict"], tmp_path)


def test_unreadable_or_missing_model_files(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        runs.model_file(tmp_path / "nope")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="cannot read model file"):
        runs.load_model_payload(tmp_path / "junk.pt")
    with pytest.raises(UserError, match="without model.pt"):
        runs.model_file(tmp_path)


def test_a_failed_folder_swap_keeps_the_old_folder(tmp_path, monkeypatch):
    import os

    target = tmp_path / "tokenizer"
    write_dir_atomically(target, lambda d: (d / "a.txt").write_text("old"))
    real_replace = os.replace

    def failing(src, dst):
        if str(src).endswith(".tmp"):  # the new folder's swap into place fails (disk full, say)
            raise OSError("disk full")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="disk full"):
        write_dir_atomically(target, lambda d: (d / "a.txt").write_text("new"))
    assert (target / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer"]  # no temporary folders left behind


# -- files that cannot run code, and parents that are named --------------------------------------


class Payload:  # a class in a pickle: what a weights-only load must refuse
    pass


def test_a_file_that_needs_more_than_tensors_is_refused_naming_it(tmp_path):
    torch.save({"config": small_config().to_dict(), "state_dict": {}, "extra": Payload()}, tmp_path / "model.pt")
    with pytest.raises(UserError, match=r"model\.pt holds Python objects other than tensors.*Payload.*could run code"):
        runs.load_model_payload(tmp_path / "model.pt")
    # Every file the pipeline writes loads weights-only.
    runs.save_model(tmp_path / "ok.pt", GPT(small_config()), kind="lm", stage="sft", extra={"reward_mean": 0.5})
    assert torch.load(tmp_path / "ok.pt", weights_only=True)["extra"] == {"reward_mean": 0.5}


def test_a_model_file_of_a_newer_format_is_refused(tmp_path):
    runs.save_model(tmp_path / "model.pt", GPT(small_config()), kind="lm", stage="sft")
    payload = torch.load(tmp_path / "model.pt", weights_only=True)
    torch.save({**payload, "format": runs.FORMAT_VERSION + 1}, tmp_path / "model.pt")
    with pytest.raises(UserError, match="written by a newer version"):
        runs.load_model_payload(tmp_path / "model.pt")


def finished(root, stage, name, metrics=None, multirun=False, age=0.0):
    d = root / stage / name
    runs.save_model(d / runs.MODEL_FILE, GPT(small_config()), kind="lm", stage=stage)
    write_json(d / runs.METRICS_FILE, metrics or {})
    (d / ".hydra").mkdir(parents=True, exist_ok=True)
    (d / ".hydra" / "hydra.yaml").write_text(f"hydra:\n  mode: {'MULTIRUN' if multirun else 'RUN'}\n")
    (d / ".hydra" / "config.yaml").write_text(f"stage: {stage}\nobjective: gold/final\nobjective_direction: maximize\n")
    os.utime(d / runs.METRICS_FILE, (time.time() + age, time.time() + age))
    return d


def test_the_implicit_parent_is_the_run_of_the_same_name_then_the_newest(tmp_path, caplog):
    finished(tmp_path, "sft", "default", age=0)
    finished(tmp_path, "sft", "data.path_other_trainer.max_steps_3", age=10)  # a newer experiment on other data
    with caplog.at_level("INFO", logger="pipeline.runs"):
        assert runs.resolve_start(None, ["sft"], tmp_path, "ppo", run_name="default") == tmp_path / "sft" / "default" / runs.MODEL_FILE
    assert "init_from=" in caplog.text and "the sft run of the same name" in caplog.text
    newest = runs.resolve_start(None, ["sft"], tmp_path, "ppo", run_name="kl0")
    assert newest == tmp_path / "sft" / "data.path_other_trainer.max_steps_3" / runs.MODEL_FILE


def test_after_a_sweep_the_parent_is_the_best_trial_by_objective_not_the_newest(tmp_path, caplog):
    finished(tmp_path, "sft", "optim.lr_1e-4", {"gold/final": 0.6}, multirun=True, age=0)
    finished(tmp_path, "sft", "optim.lr_3e-4", {"gold/final": 0.7}, multirun=True, age=5)
    finished(tmp_path, "sft", "optim.lr_1e-3", {"gold/final": 0.2}, multirun=True, age=10)  # the newest trial
    with caplog.at_level("INFO", logger="pipeline.runs"):
        chosen = runs.resolve_start(None, ["sft"], tmp_path, "reward", run_name="default")
    assert chosen == tmp_path / "sft" / "optim.lr_3e-4" / runs.MODEL_FILE
    assert "the best of 3 sft sweep trials by gold/final (maximize)" in caplog.text
    for d in (tmp_path / "sft").iterdir():
        (d / ".hydra" / "config.yaml").write_text("stage: sft\n")  # trials without an objective: name one
    with pytest.raises(UserError, match="trials of a sweep.*init_from=PATH"):
        runs.resolve_start(None, ["sft"], tmp_path, "reward", run_name="default")


def test_a_run_directory_refuses_to_resume_from_other_parents(tmp_path):
    parent = finished(tmp_path, "sft", "default") / runs.MODEL_FILE
    record = runs.parent_record(init_from=parent)
    assert record["init_from"]["sha256"] == runs.digest(parent) and len(record["init_from"]["sha256"]) == 64
    run_dir = tmp_path / "reward" / "default"
    runs.check_parents(run_dir, record)
    runs.check_parents(run_dir, record)  # the same parents: resuming is fine
    runs.save_model(parent, GPT(small_config(dropout=0.5)), kind="lm", stage="sft")  # a new SFT run in its place
    with pytest.raises(UserError, match="started from other parents.*rerun=true"):
        runs.check_parents(run_dir, runs.parent_record(init_from=parent))


def test_rerun_clears_every_cache_made_from_the_parents_and_keeps_the_config(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    import pipeline.__main__ as cli

    run_dir = finished(tmp_path, "reward", "default", {"val/accuracy": 0.5})
    for name in ("policy_pairs_train.jsonl", "policy_pairs_test.jsonl", "parents.json", "history.jsonl", "checkpoints/last.ckpt"):
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_text("made from the old SFT run")
    seen = []
    monkeypatch.setitem(STAGES, "reward", SimpleNamespace(module=SimpleNamespace(run=lambda cfg, d: seen.append(sorted(p.name for p in d.iterdir())) or {})))
    cfg = OmegaConf.create({"stage": "reward", "rerun": False, "objective": "val/accuracy", "paths": {"run_dir": str(run_dir)}})
    assert cli.run_stage(cfg) == 0.5 and not seen  # finished, no rerun: reported, left alone
    cfg.rerun = True
    cli.run_stage(cfg)
    assert seen == [[".hydra"]]  # the stage starts in a directory holding nothing but its config
