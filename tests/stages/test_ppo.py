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
    fit(module, 1, tmp_path)  # attaches a trainer and a sampling generator
    prompts = module.prompts[:8]
    ids, mask = left_pad(prompts, PAD)
    gen = generate(module.actor, ids, mask, max_new_tokens=6, temperature=0.7, eos_id=EOS, pad_id=PAD, generator=torch.Generator().manual_seed(3))
    seqs, att = torch.cat([ids, gen.tokens], 1), torch.cat([mask, gen.mask], 1)
    recomputed, _ = module.forward_policy(module.actor, seqs, att, ids.size(1), gen.tokens)
    torch.testing.assert_close(recomputed * gen.mask, gen.logprobs, rtol=1e-4, atol=1e-5)


def test_toy_reward_rises(tmp_path):
    module = toy_module()
    fit(module, 30, tmp_path)
    module.sample_generator.manual_seed(123)
    after = module.rollout(module.prompts[:64]).scores.mean().item()
    fresh = toy_module()
    fresh.sample_generator = torch.Generator().manual_seed(123)
    start = fresh.rollout(fresh.prompts[:64]).scores.mean().item()
    assert after > start + 1.0, (start, after)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    straight = toy_module(iterations=6)
    fit(straight, 6, tmp_path / "a")
    first = toy_module(iterations=6, save_every=3)
    fit(first, 3, tmp_path / "b")  # killed after its third iteration's checkpoint
    ckpt = tmp_path / "b" / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    resumed = toy_module(iterations=6, save_every=3)
    fit(resumed, 6, tmp_path / "b", ckpt_path=str(ckpt))
    assert resumed.iteration == straight.iteration == 6
    for (name, a), (_, b) in zip(straight.actor.state_dict().items(), resumed.actor.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)


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
