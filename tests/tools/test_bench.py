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
        + ["bench.gen_tokens=4", "bench.gen_prompt=4", "bench.rl_prompt=6", "bench.grpo_group=2", "bench.gen_batch=3", "bench.gen_repeats=1", *overrides]
    )
    assert result["ours_tokens_per_s"] > 0 and result["plain_loop_tokens_per_s"] > 0
    assert result["transformers_architecture"] == arch
    names = [r["row"] for r in result["rows"]]
    assert len(names) == 12 and sum(n.startswith("sft:") for n in names) == 1 and sum(n.startswith("pretrain:") for n in names) == 3
    rl_rows = [r for r in result["rows"] if r["row"].startswith("rl:")]
    assert [r["peer"].split(",")[0] for r in rl_rows] == ["TRL RLOOTrainer", "TRL GRPOTrainer"] and all("episodes/s" in r["row"] for r in rl_rows)
    for r in rl_rows:  # equal lengths: neither side stops at EOS, and each counts what it generated
        assert r["ours_tokens_per_episode"] == r["peer_tokens_per_episode"] == 4, r
    dpo_rows = [r for r in result["rows"] if r["row"].startswith("dpo,")]
    assert len(dpo_rows) == 2 and all("DPOTrainer" in r["peer"] and "pairs/s" in r["row"] for r in dpo_rows)
    reward_rows = [r for r in result["rows"] if r["row"].startswith("reward:")]
    reward_rows += [r for r in result["rows"] if r["row"].startswith("reward, K-wise")]
    assert len(reward_rows) == 2 and all("RewardTrainer" in r["peer"] and "ForSequenceClassification" in r["peer"] for r in reward_rows)
    assert [n.split(",")[0] for n in names if n.startswith("generate:")] == ["generate: batch 1", "generate: batch 3"]
    for r in result["rows"]:
        assert r["ours_tokens_per_s"] > 0 and r["peer_tokens_per_s"] > 0, r
    assert json.loads((outputs_root / "bench" / "bench.json").read_text())["rows"] == result["rows"]


def test_word_tokenizer_round_trips_every_id():
    # TRL's trainers read the RL and DPO rows as text: the words must come back as exactly the ids ours reads
    # (with "t1" as EOS, "t1146" would split into "t1" and "146").
    tokenizer = bench.word_tokenizer(2048)
    ids = [5, 1146, 1, 0, 2047, 11, 7, 1, 1]
    assert tokenizer(bench.words(ids))["input_ids"] == ids
    assert tokenizer(bench.words(ids[:3]) + " " + bench.words(ids[3:]))["input_ids"] == ids
