"""SFT and the reward model: label masking, the pairwise loss, separability, runs through the composed config."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from pydoc_data.topics import topics

from helpers import TINY, run_pipeline
from pipeline import data, runs
from pipeline.data.chat import encode_example, encode_pairs, tokenize_sft
from pipeline.data.collators import PairCollator
from pipeline.data.corpus import embedded_task
from pipeline.errors import UserError
from pipeline.losses.lm import IGNORE
from pipeline.losses.pairwise import pairwise_loss
from pipeline.model import GPTConfig, ScalarGPT
from pipeline.stages.reward import RewardModule, score_sequences
from pipeline.tasks import default_task
from pipeline.tokenizer import train_tokenizer

U = lambda text: [{"role": "user", "content": text}]  # noqa: E731
A = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([topics[k] for k in sorted(topics)[:30]], 400)


def kept(ids, labels):
    return [i for i, l in zip(ids, labels) if l != IGNORE]


def test_labels_mask_the_prompt_in_every_sft_format(tok):
    conv = data.DataFormat("prompt_completion", True)
    ids, labels, prompt_len = encode_example(tok, {"prompt": U("Sort: 3, 1"), "completion": A("1, 3")}, conv, "completion")
    assert labels[:prompt_len] == [IGNORE] * prompt_len
    assert tok.decode(kept(ids, labels)) == "1, 3" + tok.eos_token
    assert labels[-1] == tok.eos_token_id

    chat = data.DataFormat("language_modeling", True)
    messages = U("one") + A("uno") + U("two") + A("dos")
    ids, labels, _ = encode_example(tok, {"messages": messages}, chat, "completion")
    assert tok.decode(kept(ids, labels)) == "uno" + tok.eos_token + "dos" + tok.eos_token
    ids_all, labels_all, _ = encode_example(tok, {"messages": messages}, chat, "all")
    assert ids_all == ids and labels_all == ids

    std = data.DataFormat("prompt_completion", False)
    ids, labels, prompt_len = encode_example(tok, {"prompt": "2+2=", "completion": "4"}, std, "completion")
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.decode(kept(ids, labels)) == "4" + tok.eos_token and prompt_len == 1 + len(tok("2+2=", add_special_tokens=False)["input_ids"])


def test_a_prompt_longer_than_the_context_names_the_row(tok, tmp_path):
    path = tmp_path / "long.jsonl"
    rows = [{"prompt": "short", "completion": "ok"}, {"prompt": "word " * 300, "completion": "ok"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows * 3))
    ds = data.load_data(str(path))["train"]
    with pytest.raises(UserError, match=r"row \d+ has a prompt of \d+ tokens.*context of 64 tokens"):
        tokenize_sft(ds, tok, data.detect_format(ds), "completion", 65, "long.jsonl")


def test_reward_model_separates_a_separable_toy_set(tok):
    """Chosen answers say 'yes', rejected ones 'no': held-out accuracy must reach 1.0."""
    torch.manual_seed(0)
    rows = [{"prompt": U(f"question {i}"), "chosen": A(f"yes {i}"), "rejected": A(f"no {i}")} for i in range(80)]
    import datasets

    ds = datasets.Dataset.from_list(rows)
    fmt = data.detect_format(ds)
    pairs = encode_pairs(ds, tok, fmt, 64, "toy")
    config = GPTConfig(vocab_size=448, block_size=64, n_layer=1, n_head=2, n_embd=32)
    module = RewardModule(config.to_dict(), {"lr": 3e-3, "weight_decay": 0.0, "betas": [0.9, 0.95], "warmup_steps": 1, "min_lr_ratio": 1.0}, max_steps=60)
    opt = module.configure_optimizers()["optimizer"]
    collate = PairCollator(tok.pad_token_id)
    train, held_out = pairs.select(range(60)), pairs.select(range(60, 80))
    for step in range(60):
        batch = collate([train[(step * 8 + j) % 60] for j in range(8)])
        chosen, rejected = module.scores(batch)
        loss = pairwise_loss(chosen, rejected)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        chosen, rejected = module.scores(collate([held_out[i] for i in range(20)]))
    assert (chosen > rejected).float().mean().item() == 1.0



def test_k_wise_pairs_score_each_answer_once_and_match_pairwise_scoring(tok):
    """Three answers to one prompt give three pairs: the batch holds three sequences, and each pair's scores are its own."""
    import datasets

    rows = [
        {"prompt": U("sort: b, a"), "chosen": A("a, b"), "rejected": A("b, a")},
        {"prompt": U("sort: b, a"), "chosen": A("a, b"), "rejected": A("a")},
        {"prompt": U("sort: b, a"), "chosen": A("b, a"), "rejected": A("a")},
        {"prompt": U("other"), "chosen": A("x"), "rejected": A("y")},
    ]
    ds = datasets.Dataset.from_list(rows)
    pairs = encode_pairs(ds, tok, data.detect_format(ds), 64, "toy")
    keys = pairs["prompt_key"]
    assert keys[0] == keys[1] == keys[2] != keys[3]
    collate = PairCollator(tok.pad_token_id)
    batch = collate([pairs[i] for i in range(4)])
    assert batch["input_ids"].shape[0] == 5  # "a, b", "b, a", "x" (chosen first), then "a", "y"
    assert batch["chosen_index"].tolist() == [0, 0, 1, 2] and batch["rejected_index"].tolist() == [1, 3, 3, 4]
    torch.manual_seed(0)
    module = RewardModule(GPTConfig(vocab_size=448, block_size=64, n_layer=1, n_head=2, n_embd=32).to_dict(), {}, max_steps=1)
    with torch.no_grad():
        chosen, rejected = module.scores(batch)
        for i in range(4):  # each pair alone, two sequences
            c, r = module.scores(collate([pairs[i]]))
            assert torch.allclose(chosen[i], c[0], atol=1e-5) and torch.allclose(rejected[i], r[0], atol=1e-5)


def test_packed_prompts_are_read_once_and_give_the_scores_of_separate_rows(tok):
    """share_prompts packs a prompt's answers after one copy of it; every score equals the plain layout's."""
    import datasets

    rows = [
        {"prompt": U("sort: pear, fig, apple"), "chosen": A("apple, fig, pear"), "rejected": A("fig, pear")},
        {"prompt": U("sort: pear, fig, apple"), "chosen": A("apple, fig, pear"), "rejected": A("Sure! apple, pear, fig")},
        {"prompt": U("sort: pear, fig, apple"), "chosen": A("fig, pear"), "rejected": A("Sure! apple, pear, fig")},
        {"prompt": U("count: a, b"), "chosen": A("2"), "rejected": A("3")},
        {"prompt": U("a much longer prompt that fills a row on its own"), "chosen": A("yes"), "rejected": A("no, it does not")},
    ]
    ds = datasets.Dataset.from_list(rows)
    pairs = [dict(r) for r in encode_pairs(ds, tok, data.detect_format(ds), 64, "toy")]
    implicit = [{k: v for k, v in r.items() if k != "prompt_key"} for r in pairs]  # no key: each row's own two share
    torch.manual_seed(0)
    module = RewardModule(GPTConfig(vocab_size=448, block_size=64, n_layer=2, n_head=2, n_embd=32).to_dict(), {}, max_steps=1)
    plain = PairCollator(tok.pad_token_id)(pairs)
    with torch.no_grad():
        want = module.scores(plain)
        for batch_rows, max_row in ((pairs, 1024), (pairs, 12), (implicit, 1024)):
            batch = PairCollator(tok.pad_token_id, share_prompts=True, max_row=max_row)(batch_rows)
            assert "packed_mask" in batch
            real = int(batch["attention_mask"].sum())
            assert batch["score_index"].numel() == plain["input_ids"].size(0) == 7  # 3 + 2 + 2 distinct sequences
            got = module.scores(batch)
            for g, w in zip(got, want):
                assert torch.allclose(g, w, atol=1e-5), (max_row, g, w)
            if max_row == 1024 and batch_rows is pairs:
                # Three prompts read once instead of seven times, with less padding too.
                assert real < int(plain["attention_mask"].sum()) - 4 * 10
                assert batch["input_ids"].numel() < plain["input_ids"].numel()
    # Nothing shared (rows of distinct prompts and no common prefix): the plain right-padded layout.
    lone = PairCollator(tok.pad_token_id, share_prompts=True)([{"chosen_ids": [5, 6], "rejected_ids": [7, 8, 9], "margin": 0.0, "gold_sign": 0.0}])
    assert "packed_mask" not in lone and lone["input_ids"].tolist() == [[5, 6, tok.pad_token_id], [7, 8, 9]]


POLICY_PAIRS = ["reward.policy_pairs=48", "reward.policy_pairs_test=24", "reward.policy_max_new_tokens=8"]


@pytest.fixture(scope="module")
def pipeline_runs(tmp_path_factory):
    """pretrain -> sft -> reward on tiny settings through `python -m pipeline`."""
    root = tmp_path_factory.mktemp("outputs")
    corpus = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": topics[k]}) + "\n" for k in sorted(topics)[:60]))
    tiny = [o if not o.startswith("model.block_size") else "model.block_size=128" for o in TINY]
    run_pipeline("stage=pretrain", f"data.path={corpus}", "trainer.max_steps=8", "trainer.val_check_interval=4", "logger=csv", *tiny, root=root)
    trainer = ["logger=csv", "trainer.val_check_interval=4", "trainer.limit_val_batches=2", "data.batch_size=8"]
    run_pipeline("stage=sft", "trainer.max_steps=8", "eval.num_prompts=8", "eval.max_new_tokens=8", *trainer, root=root)
    run_pipeline("stage=reward", "trainer.max_steps=8", *POLICY_PAIRS, *trainer, root=root)
    return root


def test_sft_run_reports_gold_scores_of_start_and_end(pipeline_runs):
    run = pipeline_runs / "sft" / next(p.name for p in (pipeline_runs / "sft").iterdir())
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["train/steps"] == 8 and math.isfinite(metrics["val/loss"])
    assert metrics["init_from"].startswith(str(pipeline_runs / "pretrain"))
    assert metrics["parents"]["init_from"]["sha256"] == runs.digest(Path(metrics["init_from"]))
    rows = json.loads((run / "gold_final.json").read_text())["rows"]
    start_rows = json.loads((run / "gold_start.json").read_text())["rows"]
    assert len(rows) == len(start_rows) == 8
    # The reported figures are the judge's scores of the saved answers, start and end.
    judge = default_task().gold_score
    for saved in (rows, start_rows):
        assert all(r["gold"] == judge(r["prompt"], r["response"]) for r in saved)
    assert metrics["gold/final"] == sum(r["gold"] for r in rows) / 8 and metrics["gold/start"] == sum(r["gold"] for r in start_rows) / 8
    # The gold prompts are held out: none appears in SFT's training data.
    train_prompts = {r["messages"][0]["content"] for r in data.load_data(str(embedded_task(pipeline_runs / "cache", "sft")))["train"]}
    assert not {r["prompt"] for r in rows} & train_prompts


def test_reward_run_reports_accuracy_and_normalises_reference_scores(pipeline_runs):
    run = next((pipeline_runs / "reward").iterdir())
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("val/accuracy", "test/accuracy", "test/accuracy_gold", "test/chosen_reward", "test/rejected_reward", "normalise/reward_mean"):
        assert key in metrics and math.isfinite(metrics[key]), key
    # Pairs of the SFT policy's own samples joined the training data, and their held-out twins were scored.
    policy_train = [json.loads(line) for line in (run / "policy_pairs_train.jsonl").read_text().splitlines()]
    assert 0 < len(policy_train) <= 48 and metrics["train/pairs"] >= len(policy_train)
    assert all(r["chosen_gold"] != r["rejected_gold"] for r in policy_train)
    correct = metrics["policy_test/accuracy"] * metrics["policy_test/pairs"]  # a count of pairs ranked right
    assert abs(correct - round(correct)) < 1e-4, metrics
    payload = torch.load(run / "model.pt", weights_only=True)
    model = ScalarGPT(GPTConfig.from_dict(payload["config"]))
    model.load_state_dict(payload["state_dict"])
    from pipeline.tokenizer import load_tokenizer
    from pipeline.data.chat import encode_ids, render

    tok = load_tokenizer(run / "tokenizer")
    refs = data.load_data(str(embedded_task(pipeline_runs / "cache", "sft")))["validation"]
    seqs = [encode_ids(tok, render(tok, r["messages"]))[: model.config.block_size] for r in refs]
    normalised = score_sequences(model, seqs, tok.pad_token_id) - payload["extra"]["reward_mean"]
    assert abs(normalised.mean().item()) < 1e-3


@pytest.mark.slow
def test_sft_and_reward_under_two_process_ddp(pipeline_runs):
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.limit_val_batches=2"]
    run_pipeline("stage=sft", *ddp, "data.batch_size=4", "eval.num_prompts=4", "eval.max_new_tokens=4", "logger=csv", root=pipeline_runs, timeout=600)
    run_pipeline("stage=reward", *ddp, *POLICY_PAIRS, "data.batch_size=4", "logger=csv", root=pipeline_runs, timeout=600)
    for stage in ("sft", "reward"):
        runs = [d for d in (pipeline_runs / stage).iterdir() if "trainer=ddp" in (d / ".hydra" / "overrides.yaml").read_text()]
        assert len(runs) == 1
        metrics = json.loads((runs[0] / "metrics.json").read_text())
        assert metrics["train/steps"] == 4


@pytest.mark.slow
def test_ppo_under_two_process_ddp_with_ptx(tmp_path, pipeline_runs):
    """PPO on two CPU processes (gloo): both ranks roll out and update; the PPO-ptx term reads a user's text file."""
    corpus = tmp_path / "ptx.jsonl"
    corpus.write_text("".join(json.dumps({"text": topics[k]}) + "\n" for k in sorted(topics)[60:90]))
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
    ppo = ["ppo.iterations=2", "ppo.rollout_batch_size=4", "ppo.minibatch_size=2", "ppo.eval_prompts=4", "ppo.max_new_tokens=6"]
    ptx = ["ppo.ptx_coef=0.1", f"ppo.ptx_data={corpus}", "ppo.ptx_seq_len=32", "ppo.ptx_batch_size=2"]
    run_pipeline("stage=ppo", *ddp, *ppo, *ptx, "logger=csv", root=pipeline_runs, timeout=600)
    runs = [d for d in (pipeline_runs / "ppo").iterdir() if "trainer=ddp" in (d / ".hydra" / "overrides.yaml").read_text()]
    assert len(runs) == 1
    metrics = json.loads((runs[0] / "metrics.json").read_text())
    assert metrics["train/iterations"] == 2 and "gold/final" in metrics
    logged = (runs[0] / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "loss/ptx_avg" in logged and "objective/kl" in logged
