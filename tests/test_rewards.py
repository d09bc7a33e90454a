"""Rewards as code: parsing `grpo.reward`, importing the user's functions, checking what they return, weighting."""

from __future__ import annotations

import math
import textwrap

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from pipeline.data.chat import prompt_text
from pipeline.errors import UserError
from pipeline.rewards import RewardSource, call_reward_function, completions_for, parse_reward_sources, weighted_rewards
from pipeline.tasks import instruct


@pytest.fixture
def user_modules(tmp_path, monkeypatch):
    """Write a module of the user's under tmp_path, which is put on sys.path; returns the writer."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(name: str, source: str):
        path = tmp_path / f"{name}.py"
        path.write_text(textwrap.dedent(source))
        return path

    return write


def _function(fn, name="mod:fn") -> RewardSource:
    return RewardSource(name, "function", fn, 1.0)


def test_a_module_function_is_imported_and_called_as_trl_calls_it(user_modules):
    user_modules(
        "rw_lengths",
        """
        def length(completions, **kwargs):  # TRL's examples leave out prompts
            return [float(len(c)) for c in completions]

        class Scorer:
            @staticmethod
            def exclaims(prompts, completions, **kwargs):
                return [c.count("!") for c in completions]
        """,
    )
    sources = parse_reward_sources(["rw_lengths:length", "rw_lengths:Scorer.exclaims"], weights=[1, 0.5])
    assert [(s.name, s.kind, s.weight) for s in sources] == [("rw_lengths:length", "function", 1.0), ("rw_lengths:Scorer.exclaims", "function", 0.5)]
    assert call_reward_function(sources[0], ["p", "q"], ["ab", "abc!"]) == [2.0, 4.0]
    assert call_reward_function(sources[1], ["p", "q"], ["ab", "abc!"]) == [0.0, 1.0]


def test_import_errors_name_the_function_and_the_problem(user_modules):
    with pytest.raises(UserError, match=r"reward function rw_nowhere:fn: no module named 'rw_nowhere' \(looked in the current directory .*PYTHONPATH"):
        parse_reward_sources("rw_nowhere:fn")
    user_modules("rw_present", "value = 3\n")
    with pytest.raises(UserError, match=r"rw_present:missing: .*rw_present\.py has no attribute 'missing'"):
        parse_reward_sources("rw_present:missing")
    with pytest.raises(UserError, match=r"rw_present:value: value is not callable: it is int 3"):
        parse_reward_sources("rw_present:value")
    user_modules("rw_broken", "def fn(prompts, completions):\n    return [1.0 for c in completions\n")
    with pytest.raises(UserError, match=r"rw_broken:fn: syntax error in .*rw_broken\.py, line 2"):
        parse_reward_sources("rw_broken:fn")
    user_modules("rw_needs", "import rw_not_installed_dependency\n")
    with pytest.raises(UserError, match=r"rw_needs:fn: importing rw_needs failed: it imports 'rw_not_installed_dependency'"):
        parse_reward_sources("rw_needs:fn")
    user_modules("rw_raises", "raise RuntimeError('no API key')\n")
    with pytest.raises(UserError, match=r"rw_raises:fn: importing it raised RuntimeError: no API key"):
        parse_reward_sources("rw_raises:fn")


def test_a_file_path_spec_works_from_any_directory(tmp_path, monkeypatch):
    folder = tmp_path / "my rewards"
    folder.mkdir()
    (folder / "short.py").write_text("def shortness(prompts, completions, **kw):\n    return [1.0 / (1 + len(c)) for c in completions]\n")
    monkeypatch.chdir(tmp_path)
    (source,) = parse_reward_sources("my rewards/short.py:shortness")
    assert call_reward_function(source, ["p"], ["abc"]) == [0.25]
    with pytest.raises(UserError, match=r"no file my rewards/absent\.py \(relative paths start from the current directory"):
        parse_reward_sources("my rewards/absent.py:shortness")
    (folder / "typo.py").write_text("def f(:\n    pass\n")
    with pytest.raises(UserError, match=r"syntax error in .*typo\.py, line 1"):
        parse_reward_sources("my rewards/typo.py:f")


def test_spec_errors():
    for empty in ("", [], None, ["  "]):
        with pytest.raises(UserError, match="grpo.reward is empty"):
            parse_reward_sources(empty)
    with pytest.raises(UserError, match=r"grpo.reward entry 'gpt4' is not one of rm, gold, package.module:function"):
        parse_reward_sources("gpt4")
    with pytest.raises(UserError, match="grpo.reward names gold more than once"):
        parse_reward_sources(["gold", "rm", "gold"])
    with pytest.raises(UserError, match="grpo.reward_weights has 3 weights but grpo.reward names 2 rewards"):
        parse_reward_sources(["rm", "gold"], weights=[1.0, 2.0, 3.0])
    with pytest.raises(UserError, match="grpo.reward_weights has one number but grpo.reward names 2 rewards"):
        parse_reward_sources(["rm", "gold"], weights=0.5)
    with pytest.raises(UserError, match="the weight of gold must be a finite number, not 'x'"):
        parse_reward_sources(["rm", "gold"], weights=[1.0, "x"])
    (rm,) = parse_reward_sources("rm")
    assert (rm.kind, rm.fn, rm.weight) == ("rm", None, 1.0)
    from_hydra = parse_reward_sources(OmegaConf.create(["rm", "gold"]), OmegaConf.create([1, 0.5]))  # ListConfig
    assert [(s.name, s.kind, s.weight) for s in from_hydra] == [("rm", "rm", 1.0), ("gold", "gold", 0.5)]


def test_what_a_function_returns_is_checked():
    def returning(value):
        return lambda prompts, completions, **kwargs: value

    three = (["p"] * 3, ["a", "b", "c"])
    assert call_reward_function(_function(returning(np.array([1, 2, 3]))), *three) == [1.0, 2.0, 3.0]
    assert call_reward_function(_function(returning(torch.tensor([0.5, 1.0, 0.0]))), *three) == [0.5, 1.0, 0.0]
    assert call_reward_function(_function(returning((True, False, 1))), *three) == [1.0, 0.0, 1.0]
    bad = {  # name: (what the function returns, what the error says)
        "two": ([1.0, 2.0], r"reward function mod:fn returned list of length 2; expected 3"),
        "scalar": (1.0, r"reward function mod:fn returned float; expected a list of 3 numbers"),
        "none": ([1.0, None, 2.0], r"reward function mod:fn returned None at index 1"),
        "nan": ([1.0, 2.0, math.nan], r"reward function mod:fn returned nan at index 2; rewards must be finite"),
        "inf": (torch.tensor([1.0, math.inf, 0.0]), r"returned inf at index 1"),
        "text": ([1.0, "2", 3.0], r"returned str '2' at index 1; rewards must be numbers"),
        "matrix": (torch.zeros(3, 1), r"returned Tensor of shape \(3, 1\)"),
    }
    for value, message in bad.values():
        with pytest.raises(UserError, match=message):
            call_reward_function(_function(returning(value)), *three)


def test_an_exception_in_a_function_names_it():
    def fails(prompts, completions, **kwargs):
        raise ValueError("could not parse the answer")

    with pytest.raises(UserError, match=r"^reward function pkg.mod:scorer raised ValueError: could not parse the answer$"):
        call_reward_function(_function(fails, "pkg.mod:scorer"), ["p"], ["a"])


def test_weighted_sum_by_hand_and_per_source_rewards():
    sources = [
        RewardSource("rm", "rm", None, 0.5),
        _function(lambda prompts, completions, **kw: [len(c) for c in completions], "m:length"),
        _function(lambda prompts, completions, bonus, **kw: bonus, "m:bonus"),  # a dataset column, passed on
    ]
    sources[2].weight = -2.0
    total, per_source = weighted_rewards(sources, ["p", "q"], ["ab", "abcd"], torch.tensor([2.0, -4.0]), bonus=[1.0, 0.0])
    # 0.5 * rm + 1 * length - 2 * bonus: 0.5 * 2 + 2 - 2 = 1; 0.5 * -4 + 4 - 0 = 2.
    torch.testing.assert_close(total, torch.tensor([1.0, 2.0]))
    assert list(per_source) == ["rm", "m:length", "m:bonus"]
    torch.testing.assert_close(per_source["m:length"], torch.tensor([2.0, 4.0]))  # unweighted, for logging
    with pytest.raises(ValueError, match="needs the reward model's scores"):
        weighted_rewards(sources, ["p", "q"], ["ab", "abcd"], None, bonus=[1.0, 0.0])
    with pytest.raises(ValueError, match=r"rm_scores has shape \(3,\); expected \(2,\)"):
        weighted_rewards(sources, ["p", "q"], ["ab", "abcd"], torch.zeros(3), bonus=[1.0, 0.0])


def test_gold_scores_embedded_prompts_with_the_gold_judge():
    rows = instruct.prompt_rows("validation", 2)
    prompts = [row["prompt"] for row in rows]  # conversational, as the embedded task's prompts are
    references = [instruct.parse(prompt_text(p))[1] for p in prompts]
    (gold,) = parse_reward_sources("gold")
    good = call_reward_function(gold, prompts, completions_for(prompts, references))
    assert good == [1.0, 1.0]
    wrong = ["Sure! " + references[0] + " " + references[0], "zebra"]
    bad = call_reward_function(gold, prompts, completions_for(prompts, wrong))
    assert bad == [instruct.gold_score(prompt_text(p), w) for p, w in zip(prompts, wrong)]
    assert all(score < 1.0 for score in bad) and bad[1] == 0.0
    assert call_reward_function(gold, [prompt_text(prompts[0])], [references[0]]) == [1.0]  # string prompts too
    with pytest.raises(UserError, match="reward function gold raised ValueError: the gold judge cannot parse the prompt 'Tell me a joke'"):
        call_reward_function(gold, ["Tell me a joke"], ["no"])


def test_completions_take_the_shape_of_their_prompts():
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert completions_for(["Once upon", conversation], ["a time", "Hello"]) == ["a time", [{"role": "assistant", "content": "Hello"}]]
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        completions_for(["a", "b"], ["c"])
