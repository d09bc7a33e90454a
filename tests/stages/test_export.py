"""`python -m pipeline stage=export`: which run it exports by default, the command line, bad input (the mapping is tests/model/test_hf.py)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import ARCHS, VOCAB, finished_run, run_pipeline, tiny_model
from pipeline import runs
from pipeline.errors import UserError
from pipeline.stages import STAGES


def test_default_source_prefers_ppo_then_sft_then_pretrain(tokenizer, tmp_path):
    assert STAGES["export"].starts_from == ("ppo", "grpo", "dpo", "sft", "pretrain")  # the most trained first

    def source_run():  # what the stage starts from without init_from
        return runs.resolve_start(None, STAGES["export"].starts_from, tmp_path, "export")

    with pytest.raises(UserError, match="no finished ppo/grpo/dpo/sft/pretrain run"):
        source_run()
    sft = finished_run(tmp_path, "sft", "a", tiny_model(), tokenizer)
    finished_run(tmp_path, "pretrain", "b", tiny_model(), tokenizer)  # newer, but an earlier stage
    assert source_run() == sft / runs.MODEL_FILE
    ppo = finished_run(tmp_path, "ppo", "c", tiny_model(), tokenizer)
    assert source_run() == ppo / runs.MODEL_FILE


def test_export_stage_through_the_command_line(tokenizer, outputs_root):
    model = tiny_model(**ARCHS["llama-gqa"])
    source = finished_run(outputs_root, "sft", "default", model, tokenizer)
    run_pipeline("stage=export", "logger=csv", root=outputs_root)
    run_dir = outputs_root / "export" / "default"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["source"] == str(source / runs.MODEL_FILE) and metrics["architecture"] == "LlamaForCausalLM"
    assert metrics["check/max_abs_logit_diff"] < 1e-5
    hf = AutoModelForCausalLM.from_pretrained(run_dir / "hf")
    ids = torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, model(ids), atol=1e-5, rtol=1e-5)
    assert AutoTokenizer.from_pretrained(run_dir / "hf")("a b")["input_ids"] == tokenizer("a b")["input_ids"]
    # The export run's directory works as init_from for the next stage, as a training run's does.
    again, _, payload, _ = runs.load_start(str(run_dir), STAGES["sft"].starts_from, outputs_root, "sft")
    assert payload["config"] == model.config.to_dict()
