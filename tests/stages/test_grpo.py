"""GRPO's module and stage: a toy reward that rises, the packed forwards, the baselines, exact resume, a failing reward function.

The arithmetic (baselines, the clipped loss, KL in the reward) is tests/losses/test_grpo.py; the
grouped sampler is tests/model/test_engine_groups.py; DDP is test_grpo_ddp.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from helpers import REPO, finished_run, run_pipeline, tiny_model
from pipeline.model import GPTConfig, token_logprobs
from pipeline.rewards import RewardSource
from pipeline.rl import Iterations
from pipeline.stages.grpo import GRPOModule

GRPO_DEFAULTS = OmegaConf.to_container(OmegaConf.load(REPO / "conf/stage/grpo.yaml")["grpo"])

# -- the module on a toy problem: say token 7 as often as possible ------------------------------

VOCAB, EOS, PAD, TARGET = 16, 2, 0, 7
CONFIG = GPTConfig(vocab_size=VOCAB, block_size=32, n_layer=1, n_head=2, n_embd=32).to_dict()


class ToyTokenizer:
    """Token i reads as the word t<i>; pad and EOS read as nothing."""

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(f"t{int(i)}" for i in ids if int(i) not in (PAD, EOS))


def count_target(prompts, completions, **kwargs):
    """A reward function in TRL's convention: how often the completion says t7."""
    return [c.split().count(f"t{TARGET}") for c in completions]


def toy_module(**grpo_overrides) -> GRPOModule:
    torch.manual_seed(0)
    grpo = {**GRPO_DEFAULTS, "prompts_per_rollout": 8, "group_size": 8, "minibatch_size": 8, "max_new_tokens": 6, "kl_coef": 0.01, "missing_eos_penalty": 0.0, "save_every": 1000, "eval_every": 1000, **grpo_overrides}
    optim = {"lr": 1e-2, "weight_decay": 0.0, "betas": [0.9, 0.95]}
    module = GRPOModule(CONFIG, None, grpo, optim, reward_norm={}, eos_id=EOS, pad_id=PAD, seed=0)
    module.reference.load_state_dict(module.actor.state_dict())
    module.sources = [RewardSource("count_target", "function", count_target)]
    module.tokenizer = ToyTokenizer()
    g = torch.Generator().manual_seed(1)
    module.prompts = [torch.randint(3, VOCAB, (int(n),), generator=g).tolist() for n in torch.randint(2, 6, (256,), generator=g)]
    module.prompt_rows = [" ".join(f"t{i}" for i in p) for p in module.prompts]
    return module


def fit(module: GRPOModule, iterations: int, root: Path, ckpt_path=None) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=iterations,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        default_root_dir=str(root),
    )
    (root / "checkpoints").mkdir(parents=True, exist_ok=True)
    trainer.fit(module, DataLoader(Iterations(iterations), batch_size=1, collate_fn=lambda items: items[0]), ckpt_path=ckpt_path)
    return trainer


def mean_reward(module: GRPOModule) -> float:
    return module.rollout(list(range(16)), generator=torch.Generator().manual_seed(123)).rewards.mean().item()


def test_toy_reward_rises_and_the_iteration_logs_trl_names(tmp_path):
    module = toy_module()
    start = mean_reward(module)
    trainer = fit(module, 8, tmp_path)
    assert mean_reward(module) > start + 1.0, (start, mean_reward(module))
    logged = trainer.callback_metrics
    for name in ("reward", "reward_std", "rewards/count_target/mean", "kl", "clip_ratio/region_mean", "completions/mean_length", "completions/clipped_ratio", "frac_reward_zero_std", "entropy", "loss/policy_avg", "objective/kl", "perf/episodes_per_s"):
        assert name in logged, name
    assert module.totals["episodes"] == 8 * 8 * 8


def test_packed_old_and_reference_logprobs_equal_a_plain_forward_of_each_sequence(tmp_path):
    module = toy_module(updates_per_rollout=2, minibatch_size=4, temperature=0.7)
    fit(module, 2, tmp_path)  # the actor moves away from the reference
    roll = module.rollout(list(range(8)), generator=torch.Generator().manual_seed(5))
    assert roll.old_logprobs is not None and roll.ref_logprobs is not None
    for r, seq in enumerate(roll.sequences):
        P, ids = roll.prompt_lens[r], torch.tensor([seq])
        for model, packed in ((module.actor, roll.old_logprobs), (module.reference, roll.ref_logprobs)):
            plain = token_logprobs(model(ids)[:, P - 1 : -1], ids[:, P:], 0.7)[0]
            torch.testing.assert_close(packed[r, : len(seq) - P], plain, rtol=1e-5, atol=1e-5)
            assert (packed[r, len(seq) - P :] == 0).all()
    torch.testing.assert_close(roll.sampled_logprobs, roll.old_logprobs, rtol=1e-4, atol=1e-5)  # the sampler's own record agrees
    assert not torch.allclose(roll.old_logprobs, roll.ref_logprobs)


def test_the_reward_model_scores_packed_groups_as_it_scores_each_sequence_alone(tmp_path):
    from pipeline.model import left_pad
    from pipeline.rl import rm_scores

    torch.manual_seed(0)
    grpo = {**GRPO_DEFAULTS, "prompts_per_rollout": 4, "group_size": 4, "minibatch_size": 2, "max_new_tokens": 6, "scale_reward_by_std": True}
    module = GRPOModule(CONFIG, CONFIG, grpo, {"lr": 1e-3, "weight_decay": 0.0, "betas": [0.9, 0.95]}, {"reward_mean": 0.5, "reward_std": 2.0}, EOS, PAD, seed=0)
    source = toy_module()
    module.prompts, module.prompt_rows, module.tokenizer = source.prompts, source.prompt_rows, source.tokenizer
    module.sources = [RewardSource("rm", "rm", None, 2.0)]
    roll = module.rollout(list(range(4)), generator=torch.Generator().manual_seed(3))
    ids, mask = left_pad(roll.sequences, PAD)
    alone = rm_scores(module.reward_model, ids, mask, {"reward_mean": 0.5, "reward_std": 2.0}, scale_by_std=True)
    torch.testing.assert_close(roll.per_source["rm"], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(roll.rewards, 2.0 * alone - 1.0 * ~roll.finished, rtol=1e-5, atol=1e-5)  # weighted, and the missing-EOS penalty


@pytest.mark.parametrize("baseline", ["group_norm", "mean", "rloo"])
def test_each_baseline_reaches_the_advantages(tmp_path, baseline):
    module = toy_module(baseline=baseline, kl_coef=0.0)
    fit(module, 1, tmp_path)
    roll = module.rollout(list(range(8)), generator=torch.Generator().manual_seed(7))
    r = roll.rewards.view(8, 8)
    mean = r.mean(1, keepdim=True)
    expected = {"group_norm": (r - mean) / (r.std(1, keepdim=True) + 1e-4), "mean": r - mean, "rloo": r - (r.sum(1, keepdim=True) - r) / 7}[baseline]
    torch.testing.assert_close(roll.advantages, expected.flatten())


def test_kl_coef_0_never_reads_the_reference_and_kl_in_reward_comes_off_before_the_baseline(tmp_path):
    module = toy_module(kl_coef=0.0)
    calls = []
    module.reference.register_forward_hook(lambda *args: calls.append(1))
    trainer = fit(module, 1, tmp_path / "none")
    assert calls == [] and "objective/kl" not in trainer.callback_metrics

    from pipeline.losses.grpo import group_advantages, kl_in_reward

    module = toy_module(kl_coef=0.5, kl_in="reward", baseline="mean")
    fit(module, 2, tmp_path / "reward")
    roll = module.rollout(list(range(8)), generator=torch.Generator().manual_seed(7))
    leashed = kl_in_reward(roll.rewards, roll.sampled_logprobs, roll.ref_logprobs, roll.mask, 0.5, "k1")
    torch.testing.assert_close(roll.advantages, group_advantages(leashed, 8, "mean"))
    assert not torch.allclose(roll.advantages, group_advantages(roll.rewards, 8, "mean"))


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    settings = dict(iterations=6, updates_per_rollout=2, minibatch_size=4, clip_ratio_high=0.28)  # old log-probs, shuffled minibatches, clip-higher
    straight = toy_module(**settings)
    fit(straight, 6, tmp_path / "a")
    first = toy_module(**settings, save_every=3)
    fit(first, 3, tmp_path / "b")  # killed after its third iteration's checkpoint
    ckpt = tmp_path / "b" / "checkpoints" / "last.ckpt"
    resumed = toy_module(**settings, save_every=3)
    fit(resumed, 6, tmp_path / "b", ckpt_path=str(ckpt))
    assert resumed.iteration == straight.iteration == 6
    assert resumed.totals["episodes"] == straight.totals["episodes"] == 6 * 64
    for (name, a), (_, b) in zip(straight.actor.state_dict().items(), resumed.actor.state_dict().items()):
        assert torch.equal(a, b), name


def test_non_finite_loss_stops_the_run_with_a_message(tmp_path):
    from pipeline.errors import UserError

    module = toy_module()
    with torch.no_grad():
        module.reference.lm_head.weight.fill_(float("nan"))  # the k3 KL in the loss turns NaN
    with pytest.raises(UserError, match="GRPO diverged at iteration 0: non-finite loss"):
        fit(module, 2, tmp_path)


# -- the stage, end to end on a tiny SFT run -----------------------------------------------------

REWARDS = '''
import os

calls = 0


def flaky(prompts, completions, **kwargs):
    """Rewards short answers; raises on its FAIL_AT-th call (0: never)."""
    global calls
    calls += 1
    if calls == int(os.environ.get("FAIL_AT", "0")):
        raise RuntimeError("the grader is down")
    return [-len(c) / 10 for c in completions]
'''


@pytest.mark.slow
def test_stage_on_preference_prompts_then_a_failing_reward_function_keeps_the_last_checkpoint(tmp_path, tokenizer, monkeypatch):
    """The stage end to end (metrics.json, the report's keys); then a reward function raising at iteration 2: exit 2, one line, the checkpoint of iteration 2 kept."""
    root = tmp_path / "outputs"
    sft = finished_run(root, "sft", "tiny", tiny_model(block_size=48), tokenizer)
    data = tmp_path / "pairs.jsonl"  # preference data: GRPO takes its prompts
    data.write_text("".join(json.dumps({"prompt": f"count to {i}", "chosen": "1 2", "rejected": "no"}) + "\n" for i in range(40)))
    (tmp_path / "rewards.py").write_text(REWARDS)
    args = [
        "stage=grpo", f"init_from={sft}", f"data.path={data}", f"grpo.reward={tmp_path / 'rewards.py'}:flaky", "grpo.iterations=4", "grpo.prompts_per_rollout=2",
        "grpo.group_size=2", "grpo.minibatch_size=2", "grpo.max_new_tokens=4", "grpo.eval_every=100", "grpo.save_every=1", "logger=csv", "trainer.enable_progress_bar=false",
    ]
    done = run_pipeline(*args, "hydra.run.dir=" + str(root / "grpo" / "ok"), root=root)
    metrics = json.loads((root / "grpo" / "ok" / "metrics.json").read_text())
    for key in ("start/reward", "final/reward", "final/kl", "train/iterations", "train/episodes", "perf/gen_tokens_per_s", "perf/episodes_per_s", "time/total_s", "history"):
        assert metrics.get(key) is not None, (key, done.stderr[-2000:])
    assert metrics["train/iterations"] == 4 and metrics["train/episodes"] == 4 * 2 * 2 and "gold/start" not in metrics  # a user's data: no judge

    monkeypatch.setenv("FAIL_AT", "4")  # calls: the start evaluation, iterations 0 and 1, then iteration 2 raises
    failed = run_pipeline(*args, "hydra.run.dir=" + str(root / "grpo" / "flaky"), root=root, check=False)
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert failed.returncode == 2 and len(errors) == 1 and "Traceback" not in failed.stderr, failed.stderr[-3000:]
    assert "rewards.py:flaky raised RuntimeError: the grader is down" in errors[0]
    state = torch.load(root / "grpo" / "flaky" / "checkpoints" / "last.ckpt", weights_only=True)["grpo_state"]
    assert state["iteration"] == 2
    assert not (root / "grpo" / "flaky" / "metrics.json").exists()
