"""The benchmark command at CI size: every row runs both sides and the figures land in bench.json."""

from __future__ import annotations

import json

import pytest

from pipeline.tools import bench

GPT2_STYLE = ["model.pos_emb=learned", "model.norm=layernorm", "model.mlp=gelu", "model.bias=true"]


@pytest.mark.slow
@pytest.mark.parametrize("arch, overrides", [("LlamaForCausalLM", []), ("GPT2LMHeadModel", GPT2_STYLE)])
def test_bench_smoke(arch, overrides, outputs_root):
    # Blocks as long as the context: a GPT-2 has no position past block_size, so an off-by-one shows here.
    result = bench.main(
        ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.block_size=32", "data.seq_len=32", "bench.batch_size=4", "bench.steps=3", "bench.warmup=1"]
        + ["bench.gen_tokens=4", "bench.gen_prompt=4", "bench.gen_batch=3", "bench.gen_repeats=1", *overrides]
    )
    assert result["ours_tokens_per_s"] > 0 and result["plain_loop_tokens_per_s"] > 0
    assert result["transformers_architecture"] == arch
    names = [r["row"] for r in result["rows"]]
    assert len(names) == 9 and sum(n.startswith("sft:") for n in names) == 1 and sum(n.startswith("pretrain:") for n in names) == 3
    rl_rows = [r for r in result["rows"] if r["row"].startswith("rl:")]
    assert len(rl_rows) == 1 and "RLOOTrainer" in rl_rows[0]["peer"] and "episodes/s" in rl_rows[0]["row"]
    reward_rows = [r for r in result["rows"] if r["row"].startswith("reward:")]
    reward_rows += [r for r in result["rows"] if r["row"].startswith("reward, K-wise")]
    assert len(reward_rows) == 2 and all("RewardTrainer" in r["peer"] and "ForSequenceClassification" in r["peer"] for r in reward_rows)
    assert [n.split(",")[0] for n in names if n.startswith("generate:")] == ["generate: batch 1", "generate: batch 3"]
    for r in result["rows"]:
        assert r["ours_tokens_per_s"] > 0 and r["peer_tokens_per_s"] > 0, r
    assert json.loads((outputs_root / "bench" / "bench.json").read_text())["rows"] == result["rows"]
