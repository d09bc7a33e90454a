"""The embedded task: the gold judge's grading, corruptions, annotators, splits."""

from __future__ import annotations

import random

import pytest

from pipeline import task


@pytest.mark.parametrize("kind", task.TASK_TYPES)
def test_reference_scores_one_and_every_corruption_less(kind):
    rng = random.Random(kind)
    for _ in range(30):
        prompt, reference = task.make_example(rng, kind)
        assert task.parse(prompt) == (kind, reference)
        assert task.gold_score(prompt, reference) == 1.0
        bad = task.corrupt(rng, prompt, reference)
        assert bad != reference
        assert task.gold_score(prompt, bad) < 1.0


def test_scores_are_graded_not_binary():
    rng = random.Random(0)
    scores = set()
    for _ in range(400):
        prompt, reference = task.make_example(rng)
        scores.add(round(task.gold_score(prompt, task.corrupt(rng, prompt, reference)), 3))
    assert len(scores) > 20
    assert any(0.2 < s < 0.9 for s in scores)


def test_filler_padding_and_repetition_are_penalised():
    prompt = "Reverse the order of these words: cat, lamp, river"
    reference = "river, lamp, cat"
    assert task.gold_score(prompt, reference) == 1.0
    assert task.gold_score(prompt, f"{task.FILLER} {reference}") == pytest.approx(1.0 - task.FILLER_PENALTY)
    assert task.gold_score(prompt, f"{reference} {reference}") < 0.8
    assert task.gold_score(prompt, f"{reference}, cat, cat") < 1.0
    assert task.gold_score("Which number is the largest: 3, 9, 4?", "9 9 9") < 0.5


def test_unparseable_prompt_is_named():
    with pytest.raises(ValueError, match="Tell me a joke"):
        task.gold_score("Tell me a joke", "no")


def test_rows_are_deterministic_and_splits_never_share_a_prompt():
    assert task.sft_rows("test", 50) == task.sft_rows("test", 50)
    texts = {}
    for kind, rows_fn, key in [("sft", task.sft_rows, "messages"), ("prompts", task.prompt_rows, "prompt"), ("preference", task.preference_rows, "prompt")]:
        for split in ("train", "validation", "test"):
            rows = rows_fn(split, 300)
            texts[(kind, split)] = {r[key][0]["content"] for r in rows}
    held_out = texts[("sft", "test")] | texts[("prompts", "test")] | texts[("sft", "validation")] | texts[("preference", "test")]
    train = texts[("sft", "train")] | texts[("prompts", "train")] | texts[("preference", "train")]
    assert held_out and train and not held_out & train
    assert not texts[("prompts", "test")] & texts[("sft", "validation")]


def test_annotator_follows_gold_without_noise_or_bias_and_leans_longer_with_bias():
    rng = random.Random(1)
    compared = agree = close_calls = leans = 0
    for _ in range(500):
        prompt, reference = task.make_example(rng, "reverse")
        a, b = task.corrupt(rng, prompt, reference), task.corrupt(rng, prompt, reference)
        ga, gb = task.gold_score(prompt, a), task.gold_score(prompt, b)
        if ga == gb:
            continue
        compared += 1
        agree += task.annotator_prefers(rng, prompt, a, b, label_noise=0.0, bias=0.0) == (ga > gb)
        if abs(ga - gb) < 0.1 and len(a.split()) != len(b.split()):
            close_calls += 1
            leans += task.annotator_prefers(rng, prompt, a, b, label_noise=0.0, bias=2.0) == (len(a.split()) > len(b.split()))
    assert compared > 100 and agree == compared
    assert close_calls > 10 and leans / close_calls > 0.7


def test_label_noise_flips_about_that_fraction():
    rng = random.Random(2)
    prompt, reference = "Sort these numbers from smallest to largest: 5, 3, 9", "3, 5, 9"
    flips = sum(not task.annotator_prefers(rng, prompt, reference, "9, 5, 3", label_noise=0.2, bias=0.0) for _ in range(4000))
    assert 0.17 < flips / 4000 < 0.23


def test_preference_rows_schema_and_gold_agreement():
    rows = task.preference_rows("validation", 300, label_noise=0.0, bias=0.0)
    assert set(rows[0]) == {"prompt", "chosen", "rejected", "chosen_gold", "rejected_gold", "label_is_gold"}
    assert rows[0]["chosen"][0]["role"] == "assistant" and rows[0]["prompt"][0]["role"] == "user"
    assert all(r["label_is_gold"] for r in rows)
    noisy = task.preference_rows("validation", 300)
    assert 0.03 < sum(not r["label_is_gold"] for r in noisy) / 300 < 0.35
