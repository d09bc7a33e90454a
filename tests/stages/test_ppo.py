"""PPO's module: rollouts, a toy reward that rises, exact resume, guards (the arithmetic is tests/losses/test_ppo_math.py)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from helpers import REPO
from pipeline.errors import UserError
from pipeline.model import GPTConfig, generate, left_pad
from pipeline.stages.ppo import Iterations, PPOModule

PPO_DEFAULTS = OmegaConf.to_container(OmegaConf.load(REPO / "conf/stage/ppo.yaml")["ppo"])


# -- the module on a toy problem ------------------------------------------------------------

VOCAB, EOS, PAD, TARGET = 16, 2, 0, 7
CONFIG = GPTConfig(vocab_size=VOCAB, block_size=32, n_layer=1, n_head=2, n_embd=32).to_dict()


def count_target(sequences, attention, response, response_mask):
    """Toy reward: how often the response says token 7 (the RM is bypassed)."""
    return ((response == TARGET) & response_mask.bool()).float().sum(1)


def toy_module(**ppo_overrides) -> PPOModule:
    torch.manual_seed(0)
    ppo = {**PPO_DEFAULTS, "rollout_batch_size": 32, "minibatch_size": 16, "max_new_tokens": 6, "kl_coef": 0.01, "adaptive_kl": False, "missing_eos_penalty": 0.0, "save_every": 1000, "eval_every": 1000, **ppo_overrides}
    optim = {"lr": 1e-2, "weight_decay": 0.0, "betas": [0.9, 0.95]}
    module = PPOModule(CONFIG, CONFIG, ppo, optim, reward_norm={}, eos_id=EOS, pad_id=PAD, seed=0)
    module.reference.load_state_dict(module.actor.state_dict())
    module.reward_fn = count_target
    g = torch.Generator().manual_seed(1)
    module.prompts = [torch.randint(3, VOCAB, (int(n),), generator=g).tolist() for n in torch.randint(2, 6, (256,), generator=g)]
    return module


def fit(module: PPOModule, iterations: int, root, ckpt_path=None) -> pl.Trainer:
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


def test_rollout_logprobs_equal_the_sampler_and_a_full_forward(tmp_path):
    module = toy_module(temperature=0.7)
    fit(module, 1, tmp_path)  # attaches a trainer
    prompts = module.prompts[:8]
    ids, mask = left_pad(prompts, PAD)
    gen = generate(module.actor, ids, mask, max_new_tokens=6, temperature=0.7, eos_id=EOS, pad_id=PAD, generator=torch.Generator().manual_seed(3))
    seqs, att = torch.cat([ids, gen.tokens], 1), torch.cat([mask, gen.mask], 1)
    recomputed, _ = module.forward_policy(module.actor, seqs, att, ids.size(1), gen.tokens)
    torch.testing.assert_close(recomputed * gen.mask, gen.logprobs, rtol=1e-4, atol=1e-5)


def test_toy_reward_rises(tmp_path):
    module = toy_module()
    fit(module, 30, tmp_path)
    after = module.rollout(module.prompts[:64], generator=torch.Generator().manual_seed(123)).scores.mean().item()
    fresh = toy_module()
    start = fresh.rollout(fresh.prompts[:64], generator=torch.Generator().manual_seed(123)).scores.mean().item()
    assert after > start + 1.0, (start, after)


@pytest.mark.parametrize("ema_decay", [0.0, 0.8])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, ema_decay):
    straight = toy_module(iterations=6, ema_decay=ema_decay)
    fit(straight, 6, tmp_path / "a")
    first = toy_module(iterations=6, save_every=3, ema_decay=ema_decay)
    fit(first, 3, tmp_path / "b")  # killed after its third iteration's checkpoint
    ckpt = tmp_path / "b" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    resumed = toy_module(iterations=6, save_every=3, ema_decay=ema_decay)
    fit(resumed, 6, tmp_path / "b", ckpt_path=str(ckpt))
    assert resumed.iteration == straight.iteration == 6
    for (name, a), (_, b) in zip(straight.actor.state_dict().items(), resumed.actor.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)
    if ema_decay:
        assert any(not torch.equal(straight.ema[k], v) for k, v in straight.actor.state_dict().items())  # an average, not the actor
        for name, a in straight.ema.items():
            torch.testing.assert_close(a, resumed.ema[name], rtol=1e-6, atol=1e-6, msg=name)
            assert resumed.ema[name].device == next(resumed.actor.parameters()).device


def test_logged_entropy_is_that_of_the_sampling_distribution_and_builds_no_graph_at_coef_0(tmp_path):
    """At temperature 0.5 the policy samples from softmax(logits / 0.5); the entropy it logs is that one's."""
    from pipeline.losses.ppo import entropy_from_logits, masked_mean

    module = toy_module(temperature=0.5, ppo_epochs=1, minibatch_size=32, entropy_coef=0.0)
    module.hparams.optim["lr"] = 0.0  # the actor stays as it was: the rollout can be drawn again
    trainer = fit(module, 1, tmp_path)
    roll = module.rollout(module.prompt_batch(0), generator=module.sample_generator(0))
    _, logits = module.forward_policy(module.actor, roll.sequences, roll.attention, roll.prompt_len, roll.sequences[:, roll.prompt_len :])
    logged = trainer.callback_metrics["policy/entropy_avg"].item()
    at_temperature = masked_mean(entropy_from_logits(logits / 0.5), roll.response_mask).item()
    at_one = masked_mean(entropy_from_logits(logits), roll.response_mask).item()
    assert abs(logged - at_temperature) < 1e-4 and abs(logged - at_one) > 0.05, (logged, at_temperature, at_one)


def exact_kl(actor, reference, prompt: list[int], temperature: float) -> float:
    """KL(actor || reference) over every response of at most two tokens (EOS ends one early), by enumeration."""
    def dists(model, ids):
        with torch.no_grad():
            return torch.log_softmax(model(ids)[:, -1].float() / temperature, -1)

    first = torch.tensor([prompt])
    la, lr = dists(actor, first)[0], dists(reference, first)[0]
    kl = (la.exp() * (la - lr)).sum()
    seconds = torch.cat([first.repeat(VOCAB, 1), torch.arange(VOCAB)[:, None]], 1)  # prompt + each first token
    la2, lr2 = dists(actor, seconds), dists(reference, seconds)
    per_first = (la2.exp() * (la2 - lr2)).sum(-1)
    per_first[EOS] = 0.0  # a response that ends with EOS has no second token
    return float(kl + (la.exp() * per_first).sum())


def test_the_evaluation_kl_is_an_unbiased_sampled_estimate_of_the_true_kl(tmp_path, monkeypatch):
    import pipeline.stages.ppo as ppo_stage

    monkeypatch.setattr(ppo_stage, "prompt_ids", lambda tokenizer, prompt: prompt)  # the toy task's prompts are token ids
    module = toy_module(max_new_tokens=2, temperature=0.7)
    prompts = [p for p in module.prompts if len(p) == 3][:4]
    assert module.sampled_kl(prompts).abs().max().item() == 0.0  # the actor is still the reference
    fit(module, 10, tmp_path)
    samples = module.sampled_kl([p for p in prompts for _ in range(1000)]).view(len(prompts), 1000)
    truth = torch.tensor([exact_kl(module.actor, module.reference, p, 0.7) for p in prompts])
    estimate, stderr = samples.mean(1), samples.std(1) / 1000**0.5
    assert truth.min() > 0.05, truth  # the policy moved: there is a KL to estimate
    assert ((estimate - truth).abs() < 4 * stderr + 1e-3).all(), (estimate, truth, stderr)


def test_non_finite_weights_stop_the_run_with_a_message(tmp_path):
    module = toy_module()
    with torch.no_grad():
        module.critic.score_head.weight.fill_(float("nan"))
    with pytest.raises(UserError, match="PPO diverged at iteration 0"):
        fit(module, 2, tmp_path)


def test_ptx_mixes_in_pretraining_loss(tmp_path):
    """PPO-ptx: with the pretraining term on, the actor's loss on the pretraining blocks falls; without it, it does not."""
    pattern = torch.tensor([3, 4, 5, 6] * 5)  # an easy text: 3 4 5 6 3 4 5 6 ...
    blocks = torch.stack([pattern.roll(-i)[:13] for i in range(4)])

    def block_loss(module):
        module.actor.eval()
        with torch.no_grad():
            logits = module.actor(blocks[:, :-1])
        module.actor.train()
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), blocks[:, 1:].flatten()).item()

    losses = {}
    for coef in (0.0, 1.0):
        module = toy_module(ptx_coef=coef, ptx_batch_size=4)
        module.ptx_blocks = blocks
        before = block_loss(module)
        trainer = fit(module, 6, tmp_path / str(coef))
        losses[coef] = (before, block_loss(module))
        if coef:
            assert "loss/ptx_avg" in trainer.callback_metrics
    assert losses[1.0][1] < 0.5 * losses[1.0][0], losses
    assert losses[0.0][1] > 0.8 * losses[0.0][0], losses


def test_value_head_reset_starts_every_value_at_zero_and_keeps_the_backbone():
    from pipeline.model import ScalarGPT
    from pipeline.stages.ppo import reset_value_head

    torch.manual_seed(0)
    critic = ScalarGPT(GPTConfig.from_dict(CONFIG))
    with torch.no_grad():
        critic.score_head.bias.fill_(3.0)  # a reward model's head: far from the centred returns
    backbone = {k: v.clone() for k, v in critic.state_dict().items() if not k.startswith("score_head")}
    reset_value_head(critic)
    values = critic(torch.randint(3, VOCAB, (4, 9)))
    assert values.abs().max().item() == 0.0
    for k, v in critic.state_dict().items():
        if not k.startswith("score_head"):
            torch.testing.assert_close(v, backbone[k], msg=k)


def test_critic_warmup_leaves_the_actor_alone_then_trains_it(tmp_path):
    module = toy_module(critic_warmup=2)
    actor0 = {k: v.clone() for k, v in module.actor.state_dict().items()}
    critic0 = {k: v.clone() for k, v in module.critic.state_dict().items()}
    fit(module, 2, tmp_path / "warm")
    for k, v in module.actor.state_dict().items():
        torch.testing.assert_close(v, actor0[k], msg=k)
    assert any(not torch.equal(v, critic0[k]) for k, v in module.critic.state_dict().items())
    more = toy_module(critic_warmup=2)
    fit(more, 3, tmp_path / "after")
    assert any(not torch.equal(v, actor0[k]) for k, v in more.actor.state_dict().items())
