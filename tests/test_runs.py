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
