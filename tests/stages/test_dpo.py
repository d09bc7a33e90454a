"""DPO: a run through the command line, precomputed reference = online reference, shared prompts = separate rows, bad data refused.

The loss itself is tests/losses/test_dpo_math.py (by hand and against TRL).
"""

from __future__ import annotations

import json
import math

import datasets
import pytest
import torch

from helpers import finished_run, run_pipeline, tiny_model
from pipeline import data
from pipeline.data.chat import encode_pairs
from pipeline.data.collators import PairCollator
from pipeline.model import sequence_logprobs
from pipeline.stages.dpo import REFERENCE_FILE, DPOCollator, DPOModule, cached_reference, reference_logps, with_reference
from pipeline.training import history_series, read_history

BLOCK = 64
U = lambda text: [{"role": "user", "content": text}]  # noqa: E731
A = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731


def count_to(n: int) -> str:
    return " ".join(str(i) for i in range(1, n + 1))


def counting_pairs(copies: range) -> list[dict]:
    """Two pairs per prompt (K-wise): the right count beats counting one or two too far."""
    return [{"prompt": f"Count to {n} ({i}):", "chosen": " " + count_to(n), "rejected": " " + count_to(n + k)} for i in copies for n in range(1, 9) for k in (1, 2)]


def kwise_pairs(tokenizer):
    """Three answers to one prompt (three pairs), and two more prompts of one pair each, conversational."""
    rows = [
        {"prompt": U("sort: pear, fig, apple"), "chosen": A("apple, fig, pear"), "rejected": A("fig, pear")},
        {"prompt": U("sort: pear, fig, apple"), "chosen": A("apple, fig, pear"), "rejected": A("Sure! apple, pear, fig")},
        {"prompt": U("sort: pear, fig, apple"), "chosen": A("fig, pear"), "rejected": A("Sure! apple, pear, fig")},
        {"prompt": U("count: a, b"), "chosen": A("2"), "rejected": A("3")},
        {"prompt": U("a longer prompt that fills more of a row on its own"), "chosen": A("yes"), "rejected": A("no, it does not")},
    ]
    ds = datasets.Dataset.from_list(rows)
    return encode_pairs(ds, tokenizer, data.detect_format(ds), BLOCK, "toy")


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tokenizer):
    """A finished 'SFT' run of a tiny random model (DPO only needs a policy and its tokenizer)."""
    return finished_run(tmp_path_factory.mktemp("outputs"), "sft", "tiny", tiny_model(block_size=BLOCK), tokenizer)


def jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
def test_dpo_through_the_command_line_learns_the_preference(sft_run, tmp_path):
    folder = tmp_path / "prefs"
    folder.mkdir()
    jsonl(folder / "train.jsonl", counting_pairs(range(12)))  # 192 pairs of 96 prompts
    jsonl(folder / "validation.jsonl", counting_pairs(range(100, 102)))  # 32 pairs of prompts never trained on
    root = tmp_path / "outputs"
    run_pipeline(
        "stage=dpo", f"init_from={sft_run}", f"data.path={folder}", "logger=csv", "data.batch_size=16", "dpo.train_pairs=null",
        "trainer.max_steps=12", "trainer.val_check_interval=6", "trainer.limit_val_batches=2", "trainer.log_every_n_steps=1",
        "optim.lr=3e-3", "optim.warmup_steps=0", "eval.num_prompts=4", "eval.max_new_tokens=8", root=root,
    )
    (run,) = (root / "dpo").iterdir()
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("val/loss", "val/rewards/accuracies", "val/rewards/margins", "val/rewards/chosen", "val/logps/chosen", "val/logps/rejected", "final/kl", "time/total_s", "perf/tokens_per_s"):
        assert math.isfinite(metrics[key]), key
    assert metrics["train/steps"] == 12 and metrics["train/pairs"] == 192 and metrics["reference"] == "precompute"
    # The policy starts as the reference: every reward 0, the loss log 2, no pair ranked right. Training moves all three.
    assert metrics["val/loss"] < math.log(2) - 0.02 and metrics["val/rewards/accuracies"] > 0.6 and metrics["val/rewards/margins"] > 0
    rows = read_history(run / "history.jsonl")
    _, losses = history_series(rows, "train/loss")
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    for key in ("train/rewards/chosen", "train/rewards/accuracies", "train/logps/rejected", "val/rewards/margins"):
        assert history_series(rows, key)[0], key
    saved = torch.load(run / REFERENCE_FILE, weights_only=True)
    assert len(saved["splits"]["train"]["chosen"]) == 192 and len(saved["splits"]["validation"]["rejected"]) == 32


@pytest.mark.parametrize("loss_type, sft_coef", [("sigmoid", 0.0), ("ipo", 0.5)])
def test_precomputed_reference_gives_the_online_loss(tokenizer, tmp_path, loss_type, sft_coef):
    pairs = kwise_pairs(tokenizer)
    reference, policy = tiny_model(seed=0, block_size=BLOCK), tiny_model(seed=1, block_size=BLOCK)
    collate = DPOCollator(tokenizer.pad_token_id, share_prompts=True, max_row=BLOCK)
    # Batches of 2 cut the three pairs of the first prompt apart: each pair's figures stay its own.
    chosen, rejected = reference_logps(reference, pairs, collate, batch_size=2, device="cpu")
    dpo = {"beta": 0.1, "loss_type": loss_type, "label_smoothing": 0.0, "sft_coef": sft_coef}
    online = DPOModule(policy.config.to_dict(), {}, 1, {**dpo, "reference": "online"})
    online.model.load_state_dict(policy.state_dict())
    online.reference.load_state_dict(reference.state_dict())
    cached = DPOModule(policy.config.to_dict(), {}, 1, {**dpo, "reference": "precompute"})
    cached.model.load_state_dict(policy.state_dict())
    assert cached.reference is None
    rows = list(with_reference(pairs, chosen, rejected))
    with torch.no_grad():
        want, want_figures = online.step(collate([pairs[i] for i in range(len(pairs))]))
        got, figures = cached.step(collate(rows))
    assert abs(want.item() - math.log(2)) > 1e-3  # policy and reference differ: the check means something
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    for key, values in want_figures.items():
        torch.testing.assert_close(figures[key], values, rtol=0, atol=1e-5, msg=key)

    # The cache: written once, read back for the same key, computed again for another.
    path = tmp_path / REFERENCE_FILE
    first = cached_reference(path, "key-a", reference, {"train": pairs}, collate, 4, "cpu")
    torch.testing.assert_close(first["train"][0], chosen)
    reread = cached_reference(path, "key-a", policy, {"train": pairs}, collate, 4, "cpu")  # another model: not asked
    torch.testing.assert_close(reread["train"][0], chosen)
    again = cached_reference(path, "key-b", policy, {"train": pairs}, collate, 4, "cpu")
    assert not torch.allclose(again["train"][0], chosen)


def test_shared_prompt_batches_give_the_log_probs_of_separate_rows(tokenizer):
    pairs = [dict(r) for r in kwise_pairs(tokenizer)]
    model = tiny_model(seed=2, block_size=BLOCK)
    plain = PairCollator(tokenizer.pad_token_id)(pairs)
    packed = PairCollator(tokenizer.pad_token_id, share_prompts=True, max_row=BLOCK)(pairs)
    assert "packed_mask" in packed and "packed_mask" not in plain
    assert int(packed["attention_mask"].sum()) < int(plain["attention_mask"].sum())  # each prompt read once
    with torch.no_grad():
        per_token, sums = sequence_logprobs(model, plain)
        packed_per_token, packed_sums = sequence_logprobs(model, packed)
    assert sums.numel() == 7  # 3 + 2 + 2 distinct answers
    assert torch.equal(packed["target_ids"], plain["target_ids"])
    torch.testing.assert_close(packed_per_token, per_token, rtol=0, atol=1e-5)
    torch.testing.assert_close(packed_sums, sums, rtol=0, atol=1e-5)


# A prompt-only or prompt-completion file given to DPO: tests/test_bad_input.py (the catalogue's dpo rows).
