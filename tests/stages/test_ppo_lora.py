"""PPO with LoRA: four models on one frozen base (actor, reference, critic, reward as adapters and heads), or on two.

The runs are real model files (runs.save_model / load_model_payload, as the SFT and reward stages
write and PPO reads them); the modules are trained by a real Trainer on a tiny model.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from helpers import REPO, tiny_model
from pipeline import runs
from pipeline.errors import UserError
from pipeline.memory import parameter_bytes
from pipeline.model import GPT, ScalarGPT
from pipeline.model.lora import AdapterHead, LoraSettings, adapter_parameters, apply_lora, merge_lora
from pipeline.stages.ppo import Iterations, PPOModule, lora_models, reset_value_head
from pipeline.training import TrainedOnly

PPO = {
    **OmegaConf.to_container(OmegaConf.load(REPO / "conf/stage/ppo.yaml")["ppo"]),
    "rollout_batch_size": 16, "minibatch_size": 8, "max_new_tokens": 5, "kl_coef": 0.05, "adaptive_kl": False,
    "missing_eos_penalty": 0.0, "save_every": 1000, "eval_every": 1000, "critic_lr": 1e-2,
}
OPTIM = {"lr": 1e-2, "weight_decay": 0.0, "betas": [0.9, 0.95]}
EOS, PAD = 2, 0
SETTINGS = LoraSettings(r=4, alpha=8)  # the policy's (peft=lora)
RM_SETTINGS = LoraSettings(r=2, alpha=4, target_modules=("q_proj", "kv_proj", "up_proj"))  # the reward run's: another rank and targets


def storage_bytes(module: torch.nn.Module) -> int:
    """Bytes of the distinct storages behind the module's parameters: a tensor shared by several models counts once."""
    return parameter_bytes(module)


def reward_lora_model(base: GPT, seed: int) -> ScalarGPT:
    """A trained-looking LoRA reward model on `base`: adapters and head away from their init."""
    rm = ScalarGPT(base.config)
    rm.load_state_dict(base.state_dict(), strict=False)  # the score head is new
    apply_lora(rm, RM_SETTINGS)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in rm.named_parameters():
            if "lora_B" in name or name.startswith("score_head."):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return rm


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("ppo_lora")
    sft = tiny_model()
    paths = {"sft": d / "sft.pt", "rm_lora": d / "rm_lora.pt", "rm_full": d / "rm_full.pt", "other_base": d / "other.pt", "rm_other": d / "rm_other.pt"}
    runs.save_model(paths["sft"], sft, kind="lm", stage="sft")
    rm = reward_lora_model(sft, seed=1)
    runs.save_model(paths["rm_lora"], rm, kind="scalar", stage="reward", base=paths["sft"])  # as stage=reward peft=lora writes it
    runs.save_model(paths["rm_full"], merge_lora(rm), kind="scalar", stage="reward")  # the same reward model, trained in full
    other = tiny_model(seed=5)
    runs.save_model(paths["other_base"], other, kind="lm", stage="sft")
    runs.save_model(paths["rm_other"], reward_lora_model(other, seed=1), kind="scalar", stage="reward", base=paths["other_base"])
    return paths


def build(files, rm: str = "rm_lora", share: str = "auto", lora: bool = True) -> tuple[PPOModule, bool]:
    torch.manual_seed(0)
    sft = runs.build_model(runs.load_model_payload(files["sft"]), GPT, files["sft"])
    payload = runs.load_model_payload(files[rm])
    reward = runs.build_model(payload, ScalarGPT, files[rm])
    module = PPOModule(sft.config.to_dict(), reward.config.to_dict(), PPO, OPTIM, reward_norm={}, eos_id=EOS, pad_id=PAD, seed=0, shared_reference=lora)
    module.actor.load_state_dict(sft.state_dict())
    shared = False
    if lora:
        shared = lora_models(module, SETTINGS, reward, payload, files[rm], files["sft"], share)
        module.strict_loading = False
    else:
        module.reference.load_state_dict(sft.state_dict())
        module.critic.load_state_dict(reward.state_dict())
        module.reward_model.load_state_dict(reward.state_dict())
    reset_value_head(module.critic)
    g = torch.Generator().manual_seed(1)
    module.prompts = [torch.randint(3, sft.config.vocab_size, (int(n),), generator=g).tolist() for n in torch.randint(2, 6, (128,), generator=g)]
    return module, shared


def fit(module: PPOModule, iterations: int, root, ckpt_path=None) -> None:
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=iterations, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False, default_root_dir=str(root),
        callbacks=[TrainedOnly(module, "")],
    )
    (root / "checkpoints").mkdir(parents=True, exist_ok=True)
    trainer.fit(module, DataLoader(Iterations(iterations), batch_size=1, collate_fn=lambda items: items[0]), ckpt_path=ckpt_path)


def test_one_shared_base_holds_one_copy_of_the_weights(files):
    base = storage_bytes(runs.build_model(runs.load_model_payload(files["sft"]), GPT, files["sft"]))
    shared, is_shared = build(files)
    assert is_shared and shared.reference.lora_model is shared.actor
    assert isinstance(shared.critic, AdapterHead) and shared.critic.backbone is shared.actor and shared.reward_model.backbone is shared.actor
    adapters = sum(p.numel() * p.element_size() for name in ("default", "critic", "reward") for p in adapter_parameters(shared.actor, name))
    heads = 2 * (shared.actor.config.n_embd + 1) * 4  # critic and reward heads, float32
    assert storage_bytes(shared) == base + adapters + heads  # one base; everything else is adapters and two heads

    full, _ = build(files, rm="rm_full", lora=False)
    assert storage_bytes(full) == 4 * base + heads  # actor, reference, critic and reward model each hold the weights
    two, is_shared = build(files, share="false")
    assert not is_shared and storage_bytes(two) == 2 * base + sum(p.numel() * 4 for n, p in two.named_parameters() if ".lora_" in n) + heads


@pytest.mark.parametrize("share", ["auto", "false"])
def test_the_lora_models_compute_what_the_separate_full_ones_do(files, share):
    module, is_shared = build(files, share=share)
    assert is_shared == (share == "auto")
    full, _ = build(files, rm="rm_full", lora=False)
    x = torch.randint(3, module.actor.config.vocab_size, (3, 12), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(x)
    mask[0, :4] = 0  # a left-padded row
    with torch.no_grad():
        assert torch.equal(module.actor(x, attention_mask=mask), full.actor(x, attention_mask=mask))  # a fresh adapter adds exactly zero
        assert torch.equal(module.reference(x, attention_mask=mask), full.reference(x, attention_mask=mask))
        # The reward model as an adapter (or a copy of the merged RM) scores as the merged reward model does.
        torch.testing.assert_close(module.reward_model(x, attention_mask=mask), full.reward_model(x, attention_mask=mask), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(module.critic(x, attention_mask=mask), full.critic(x, attention_mask=mask), rtol=0, atol=0)  # both heads at zero
        for name in ("default", "critic"):  # a moved adapter changes its own model only
            for p in adapter_parameters(module.critic.backbone if name == "critic" else module.actor, "default" if share == "false" and name == "critic" else name):
                p.add_(0.2)
        reward_after = module.reward_model(x, attention_mask=mask)
        assert torch.equal(module.reference(x, attention_mask=mask), full.reference(x, attention_mask=mask))
        torch.testing.assert_close(reward_after, full.reward_model(x, attention_mask=mask), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(module.actor(x, attention_mask=mask), full.actor(x, attention_mask=mask))


def trained_state(module: PPOModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_ppo_on_a_shared_base_trains_the_actor_and_critic_adapters_only(files, tmp_path):
    module, _ = build(files)
    before = trained_state(module)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == {n for n in before if ".lora_" in n and n.split(".")[-2] in ("default", "critic")} | {"critic.score_head.weight", "critic.score_head.bias"}
    opt_actor, opt_critic = module.configure_optimizers()[0]
    ids = lambda opt: {id(p) for group in opt.param_groups for p in group["params"]}  # noqa: E731
    assert ids(opt_actor) == {id(p) for p in adapter_parameters(module.actor, "default")}
    assert ids(opt_critic) == {id(p) for p in adapter_parameters(module.actor, "critic")} | {id(p) for p in module.critic.score_head.parameters()}
    fit(module, 2, tmp_path)
    after = trained_state(module)
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and moved <= trainable  # the base, the reward adapter and the reward head stay as loaded
    assert any(".default." in k for k in moved) and any(".critic." in k for k in moved) and "critic.score_head.weight" in moved


def test_ppo_on_a_shared_base_resumes_exactly_from_a_checkpoint_of_what_trains(files, tmp_path):
    straight, _ = build(files)
    straight.cfg.iterations = 4
    fit(straight, 4, tmp_path / "a")
    first, _ = build(files)
    first.cfg.iterations, first.cfg.save_every = 4, 2
    fit(first, 2, tmp_path / "b")  # killed after the iteration-2 checkpoint
    ckpt = tmp_path / "b" / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=True)["state_dict"]
    assert saved and all(".lora_" in k or k.startswith("critic.score_head.") for k in saved)  # no base, no reward model in the checkpoint
    resumed, _ = build(files)
    resumed.cfg.iterations, resumed.cfg.save_every = 4, 2
    fit(resumed, 4, tmp_path / "b", ckpt_path=str(ckpt))
    assert resumed.iteration == straight.iteration == 4
    a, b = straight.state_dict(), resumed.state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-6, msg=name)


def test_a_shared_base_needs_a_lora_reward_model_on_the_policys_base(files):
    with pytest.raises(UserError, match=r"ppo.share_base=true: reward_from=.*rm_full.pt is a fully trained reward model"):
        build(files, rm="rm_full", share="true")
    with pytest.raises(UserError, match=r"is an adapter on another base .*other.pt"):
        build(files, rm="rm_other", share="true")
    module, is_shared = build(files, rm="rm_other")  # auto: two bases, and the reward model is still the right one
    assert not is_shared and module.reward_backbone is module.critic.backbone
