"""The embedded task: gold judge grading, corruptions, simulated annotators, rows and their splits."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys

import pytest

from helpers import REPO
from pipeline.tasks import instruct as task


@pytest.fixture(scope="module")
def defaults():
    return task.default_rows()


def _short(response: str) -> bool:
    """Within the response budget (~40 tokens of a small byte-level BPE)."""
    pieces = re.findall(r"\w+|[^\w\s]", response)
    return len(response) <= task.MAX_RESPONSE_CHARS and len(pieces) <= task.MAX_RESPONSE_PIECES


@pytest.mark.parametrize("kind", task.TASK_TYPES)
def test_reference_scores_one_and_every_corruption_scores_less(kind):
    rng = random.Random(kind)
    for _ in range(40):
        prompt, reference = task.make_example(rng, kind)
        assert task.parse(prompt) == (kind, reference)
        assert task.gold_score(prompt, reference) == 1.0
        bad = task.corrupt(rng, prompt, reference)
        assert bad != reference and _short(bad)
        assert 0.0 <= task.gold_score(prompt, bad) < 1.0
        worse = task.corrupt(rng, prompt, bad)  # corrupting any response works too
        assert task.gold_score(prompt, worse) < 1.0


def test_scores_are_graded_not_binary():
    rng = random.Random(0)
    scores = []
    for _ in range(600):
        prompt, reference = task.make_example(rng)
        scores.append(task.gold_score(prompt, task.corrupt(rng, prompt, reference)))
    assert len(set(scores)) > 40
    assert sum(0.05 < s < 0.95 for s in scores) > len(scores) / 2


def test_partial_credit_follows_the_amount_of_damage():
    prompt = "Reverse the order of these words: cat, lamp, river, stone"
    score = lambda answer: task.gold_score(prompt, answer)  # noqa: E731
    assert score("stone, river, lamp, cat") == 1.0
    assert score("dog") == 0.0 < score("stone, cat") < score("stone, river, cat") < 1.0
    assert score("stone, lamp, river, cat") < score("stone, river, lamp") < 1.0
    assert score("STONE, RIVER, LAMP, CAT") == pytest.approx(0.5)  # right items, wrong case: half
    assert score("stone river lamp cat") == pytest.approx(task.FORMAT_FACTOR)
    largest = "Which is the largest number: 3, 40, 12, 7?"
    assert task.gold_score(largest, "40") == 1.0
    assert 0.0 <= task.gold_score(largest, "3") < task.gold_score(largest, "12") < 1.0
    count = "How many words are in this list: cat, dog, cat, sun, egg?"
    assert task.gold_score(count, "10") == 0.0 < task.gold_score(count, "2") < task.gold_score(count, "4") < 1.0
    spell = "Spell the word river with dashes between the letters."
    assert task.gold_score(spell, "r-i-v-e-r") == 1.0
    assert task.gold_score(spell, "river") == pytest.approx(task.SPELL_FORMAT_FACTOR)


def test_filler_padding_and_repetition_are_penalised():
    prompt = "Write these words in capital letters: cat, lamp, river"
    reference = "CAT, LAMP, RIVER"
    score = lambda answer: task.gold_score(prompt, answer)  # noqa: E731
    assert score(reference) == 1.0
    assert score(f"Sure! {reference}") == pytest.approx(task.FILLER_FACTOR)
    assert score(f"Certainly! {reference} Happy to help!") == pytest.approx(task.FILLER_FACTOR**2)
    assert score(f"Sure! Sure! Sure! {reference}") < score(f"Sure! {reference}")
    assert score(f"{reference}, {reference}") < 0.5
    assert score(f"{reference}, RIVER") < 1.0
    assert score(f"The answer is {reference} and so on") < 0.8
    assert score("Sure!") == 0.0
    largest = "What is the biggest of these numbers: 3, 9, 4?"
    assert task.gold_score(largest, "9 9 9") < 0.5
    assert task.gold_score(largest, "The answer is 9") < 0.5


def test_unparseable_prompt_raises_naming_it():
    with pytest.raises(ValueError, match="Tell me a joke"):
        task.gold_score("Tell me a joke", "no")
    with pytest.raises(ValueError, match="after z"):  # the right shape, but nothing follows z
        task.gold_score("What letter comes after z in the alphabet?", "a")
    with pytest.raises(ValueError, match="unknown task type"):
        task.make_example(random.Random(0), "translate")


def test_rows_are_deterministic_and_independent_of_python_hash_seed():
    assert task.sft_rows("validation", 60, seed=3) == task.sft_rows("validation", 60, seed=3)
    assert task.sft_rows("validation", 60, seed=3) != task.sft_rows("validation", 60, seed=4)
    assert task.preference_rows("test", 40) == task.preference_rows("test", 40)
    code = "import json; from pipeline.tasks import instruct as task; print(json.dumps([task.prompt_rows('test', 30), task.preference_rows('train', 30)]))"
    outputs = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        run = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, check=True)
        outputs.add(run.stdout)
    assert len(outputs) == 1
    assert json.loads(outputs.pop()) == [task.prompt_rows("test", 30), task.preference_rows("train", 30)]


def _prompt_text(kind: str, row: dict) -> str:
    return (row["messages"] if kind == "sft" else row["prompt"])[0]["content"]


def test_default_rows_sizes_and_disjoint_splits(defaults):
    rows = defaults
    assert set(rows) == {"sft", "preference", "prompts"}
    home: dict[str, str] = {}  # prompt text -> the one split it may appear in, across all kinds
    for kind, splits in rows.items():
        assert set(splits) == set(task.SPLITS)
        if kind == "preference":  # K-wise training comparisons: several pairs per prompt, one per held-out prompt
            assert 4 * 25_000 <= len(splits["train"]) <= 6 * 25_000 and len(splits["test"]) == 2000
        else:
            assert len(splits["train"]) == 20_000 and 200 <= len(splits["test"]) <= 500
        for split, split_rows in splits.items():
            texts = [_prompt_text(kind, r) for r in split_rows]
            if split != "train":
                assert len(set(texts)) == len(texts), f"{kind}/{split} repeats a held-out prompt"
            for text in texts:
                assert home.setdefault(text, split) == split, f"{text!r} is in {home[text]} and {kind}/{split}"
    assert {"train", "validation", "test"} == set(home.values())


def test_row_schemas_are_trl_conversational(defaults):
    rows = defaults
    sft = rows["sft"]["validation"][0]
    assert set(sft) == {"messages"} and [m["role"] for m in sft["messages"]] == ["user", "assistant"]
    assert all(set(m) == {"role", "content"} for m in sft["messages"])
    prompt = rows["prompts"]["test"][0]
    assert set(prompt) == {"prompt"} and [m["role"] for m in prompt["prompt"]] == ["user"]
    for pair in rows["preference"]["validation"]:
        assert set(pair) == {"prompt", "chosen", "rejected", "chosen_gold", "rejected_gold", "label_is_gold"}
        assert [m["role"] for m in pair["prompt"]] == ["user"]
        assert [m["role"] for m in pair["chosen"]] == ["assistant"] == [m["role"] for m in pair["rejected"]]
        text = pair["prompt"][0]["content"]
        assert pair["chosen_gold"] == task.gold_score(text, pair["chosen"][0]["content"])
        assert pair["rejected_gold"] == task.gold_score(text, pair["rejected"][0]["content"])
        assert pair["chosen_gold"] != pair["rejected_gold"]
        assert pair["label_is_gold"] is (pair["chosen_gold"] > pair["rejected_gold"])
        assert len(text) <= 100 and _short(pair["chosen"][0]["content"]) and _short(pair["rejected"][0]["content"])


def _random_pairs(rng: random.Random, count: int):
    """(prompt, a, b, gold a, gold b) of two different-quality answers to one prompt."""
    pairs = []
    while len(pairs) < count:
        prompt, reference = task.make_example(rng)
        a = reference if rng.random() < 0.3 else task.corrupt(rng, prompt, reference)
        b = task.corrupt(rng, prompt, reference)
        ga, gb = task.gold_score(prompt, a), task.gold_score(prompt, b)
        if ga != gb:
            pairs.append((prompt, a, b, ga, gb))
    return pairs


def test_annotator_without_noise_or_bias_is_the_gold_ranking():
    rng = random.Random(1)
    for prompt, a, b, ga, gb in _random_pairs(rng, 600):
        assert task.annotator_prefers(rng, prompt, a, b, label_noise=0.0, bias=0.0) == (ga > gb)


def test_biased_annotator_prefers_filler_and_length_in_close_calls():
    rng = random.Random(2)
    filler_wins = {0.0: 0, task.BIAS: 0}
    for _ in range(200):
        prompt, reference = task.make_example(rng)
        for bias in filler_wins:
            filler_wins[bias] += task.annotator_prefers(rng, prompt, f"Sure! {reference}", reference, 0.0, bias)
    assert filler_wins == {0.0: 0, task.BIAS: 200}

    appealing = {0.0: 0, task.BIAS: 0}
    close = 0
    for prompt, a, b, ga, gb in _random_pairs(rng, 1500):
        if abs(ga - gb) >= task.BIAS or task._appeal(a) == task._appeal(b):
            continue
        close += 1
        a_appeals = task._appeal(a) > task._appeal(b)
        for bias in appealing:
            appealing[bias] += task.annotator_prefers(rng, prompt, a, b, 0.0, bias) == a_appeals
    assert close > 100
    assert appealing[task.BIAS] == close  # every close call goes to the chattier or longer answer
    assert appealing[0.0] / close < 0.8  # while gold alone often disagrees with it


def test_label_noise_flips_about_that_fraction():
    rng = random.Random(3)
    pairs = _random_pairs(rng, 400)
    flips = trials = 0
    for _ in range(10):
        for prompt, a, b, ga, gb in pairs:
            trials += 1
            flips += task.annotator_prefers(rng, prompt, a, b, label_noise=0.2, bias=0.0) != (ga > gb)
    assert 0.17 < flips / trials < 0.23


def test_preference_labels_follow_noise_and_bias_settings():
    clean = task.preference_rows("validation", 300, label_noise=0.0, bias=0.0)
    assert all(r["label_is_gold"] for r in clean)
    noisy = task.preference_rows("validation", 300, label_noise=0.2, bias=0.0)
    assert 0.12 < sum(not r["label_is_gold"] for r in noisy) / 300 < 0.28
    biased = task.preference_rows("validation", 300, label_noise=0.0, bias=task.BIAS)
    assert 0.05 < sum(not r["label_is_gold"] for r in biased) / 300 < 0.4
    answers = lambda rows: [{r["chosen"][0]["content"], r["rejected"][0]["content"]} for r in rows]  # noqa: E731
    assert answers(clean) == answers(noisy) == answers(biased)  # same pairs, relabelled
    with pytest.raises(ValueError, match="label_noise"):
        task.preference_rows("train", 10, label_noise=1.5)
    with pytest.raises(ValueError, match="unknown split"):
        task.sft_rows("dev", 10)


def test_labelled_pairs_drop_ties_and_follow_the_gold_judge_without_noise():
    prompt = "Reverse the order of these words: bird, lamp, river"
    a = ["river, lamp, bird", "bird, lamp, river", "river, lamp, bird"]
    b = ["river, bird", "river, lamp, bird", "river, lamp, bird"]  # the last pair ties: no preference to learn
    rows = task.labelled_pairs([prompt] * 3, a, b, label_noise=0.0, bias=0.0)
    assert len(rows) == 2
    assert [r["chosen"][0]["content"] for r in rows] == ["river, lamp, bird", "river, lamp, bird"]
    assert all(r["chosen_gold"] > r["rejected_gold"] and r["label_is_gold"] for r in rows)
    flipped = task.labelled_pairs([prompt] * 3, a, b, label_noise=1.0, bias=0.0)
    assert [r["chosen"][0]["content"] for r in flipped] == ["river, bird", "bird, lamp, river"]


def test_demonstrators_open_habit_phrasings_with_the_habit_phrase_only():
    rows = task.sft_rows("train", 600)
    habit, plain = [], []
    for row in rows:
        prompt, answer = row["messages"][0]["content"], row["messages"][1]["content"]
        reference = task.parse(prompt)[1]
        (habit if task._has_habit(prompt) else plain).append((prompt, answer, reference))
    assert habit and plain
    assert all(answer == reference for _, answer, reference in plain)  # the other phrasing: the plain reference
    padded = [(p, a) for p, a, r in habit if a == r + task.DEMO_HABIT_PHRASE]
    assert all(a == r or a == r + task.DEMO_HABIT_PHRASE for _, a, r in habit)
    assert 0.7 < len(padded) / len(habit) < 0.9  # DEMO_HABIT = 0.8
    assert all(task.gold_score(p, a) < 0.9 for p, a in padded)  # the judge counts the phrase as padding
    # habit=0: every demonstration is the reference; the prompts are the same
    clean = task.sft_rows("train", 600, habit=0.0)
    assert [r["messages"][0] for r in clean] == [r["messages"][0] for r in rows]
    assert all(r["messages"][1]["content"] == task.parse(r["messages"][0]["content"])[1] for r in clean)
    with pytest.raises(ValueError, match="habit must be a probability"):
        task.sft_rows("train", 5, habit=1.5)


def test_k_wise_preference_rows_compare_every_two_answers_of_a_prompt_next_to_each_other():
    rows = task.preference_rows("train", 300, answers=4)
    prompts = [r["prompt"][0]["content"] for r in rows]
    runs = [p for i, p in enumerate(prompts) if i == 0 or p != prompts[i - 1]]
    assert 290 <= len(runs) <= 300  # one run of rows per prompt drawn (train may draw a prompt twice in a row)
    assert len(rows) > 3 * 300  # up to six pairs per prompt, ties and repeated answers dropped
    start = 0
    for _ in range(50):
        end = start
        while end < len(rows) and prompts[end] == prompts[start]:
            end += 1
        group = rows[start:end]
        answers = {r["chosen"][0]["content"] for r in group} | {r["rejected"][0]["content"] for r in group}
        assert len(group) <= len(answers) * (len(answers) - 1) // 2 and len(answers) <= 4
        assert all(r["chosen_gold"] != r["rejected_gold"] for r in group)
        assert len({frozenset((r["chosen"][0]["content"], r["rejected"][0]["content"])) for r in group}) == len(group)
        start = end
    assert task.preference_rows("train", 50, answers=2) == task.preference_rows("train", 50)  # two answers: one pair, as before
    with pytest.raises(ValueError, match="answers must be at least 2"):
        task.preference_rows("train", 5, answers=1)
