"""pipeline/memory.py: bytes counted by storage (shared once), AdamW's state, LoRA's gradients, 4-bit weights,
and the memory.json a real fit writes under automatic (pretraining through build_trainer) and manual (PPO) optimisation."""

from __future__ import annotations

import bitsandbytes as bnb
import lightning.pytorch as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

import pipeline
from helpers import REPO
from pipeline.files import read_json
from pipeline.memory import MEMORY_FILE, MemoryFigures, gradient_bytes, optimizer_bytes, parameter_bytes, trainable_parameters
from pipeline.model import GPT, GPTConfig
from pipeline.model.lora import LoraSettings, apply_lora
from pipeline.stages.ppo import Iterations, PPOModule
from pipeline.training import Batches, LanguageModelModule, build_trainer

CONFIG = dict(vocab_size=96, block_size=32, n_layer=2, n_head=4, n_embd=32)  # SwiGLU hidden width 128


def gpt(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**CONFIG, **kw}))


def backward(model: GPT) -> None:
    x = torch.randint(0, CONFIG["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(1))
    F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()


def test_a_storage_shared_by_modules_or_views_counts_once():
    a, b, c, d = (nn.Linear(4, 3, bias=False) for _ in range(4))
    b.weight = a.weight  # the same Parameter in two modules
    c.weight = nn.Parameter(a.weight.data)  # another Parameter over the same storage
    d.weight = nn.Parameter(a.weight.data[1:])  # a view of part of it
    assert parameter_bytes(nn.Sequential(a, b, c, d)) == 3 * 4 * 4
    assert parameter_bytes(nn.Sequential(a, nn.Linear(4, 3, bias=False))) == 2 * 3 * 4 * 4
    assert trainable_parameters(nn.Sequential(a, b, c)) == 12


def test_a_tied_embedding_counts_once():
    tied, untied = gpt(tie_embeddings=True), gpt(tie_embeddings=False)
    assert tied.lm_head.weight is tied.wte.weight
    assert parameter_bytes(untied) - parameter_bytes(tied) == 96 * 32 * 4  # the head's own vocab x n_embd float32 matrix
    state = tied.state_dict()  # lists the matrix under both names
    assert sum(t.nbytes for t in state.values()) - parameter_bytes(tied) == 96 * 32 * 4


def test_adamw_after_one_step_holds_two_moments_and_a_step_per_parameter():
    model = gpt()
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    assert optimizer_bytes([opt]) == 0  # AdamW allocates its state at the first step
    backward(model)
    assert gradient_bytes(model) == parameter_bytes(model)
    opt.step()
    assert optimizer_bytes([opt]) == 2 * parameter_bytes(model) + 4 * len(params)  # exp_avg, exp_avg_sq; a float32 step each


def test_a_lora_models_gradients_are_only_the_adapters():
    model = apply_lora(gpt(), LoraSettings(r=4, alpha=8))
    # r * (in + out) per adapted projection, per block: q 32->32, kv 32->64, out 32->32, up (gate|up) 32->256, down 128->32.
    adapters = 2 * 4 * ((32 + 32) + (32 + 64) + (32 + 32) + (32 + 256) + (128 + 32))
    assert trainable_parameters(model) == adapters
    backward(model)
    assert gradient_bytes(model) == 4 * adapters
    assert parameter_bytes(model) == parameter_bytes(gpt()) + 4 * adapters


def test_a_4bit_weight_counts_its_packed_data_and_its_quantisation_state():
    layer = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4", device="meta")
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 128), requires_grad=False, quant_type="nf4")
    layer = layer.to("cpu")  # quantises
    # 8192 weights in half a byte each; absmax one uint8 per block of 64 (nested), the 16-value NF4 code and an offset
    # in float32; the nested state: one float32 absmax per 256 blocks and its 256-value code.
    assert parameter_bytes(layer) == 8192 // 2 + 128 + 16 * 4 + 4 + 4 + 256 * 4
    qlora = apply_lora(gpt(), LoraSettings(r=4, alpha=8, quantize="nf4"))
    lora = apply_lora(gpt(), LoraSettings(r=4, alpha=8))
    assert parameter_bytes(qlora) < 0.6 * parameter_bytes(lora)
    assert trainable_parameters(qlora) == trainable_parameters(lora)


def test_a_pretraining_fit_through_build_trainer_writes_consistent_figures(tmp_path):
    with initialize_config_dir(config_dir=str(pipeline.CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["stage=pretrain", "optim.matrices=adamw", "logger=csv", "trainer.max_steps=4", "trainer.val_check_interval=4", "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false", "trainer.accelerator=cpu"])
    pl.seed_everything(0, verbose=False)
    module = LanguageModelModule(GPTConfig(**CONFIG).to_dict(), OmegaConf.to_container(cfg.optim), max_steps=4)
    blocks = [{"input_ids": row} for row in torch.randint(0, 96, (16, 17), generator=torch.Generator().manual_seed(0))]
    trainer, _ = build_trainer(cfg, tmp_path, monitor="val/loss", mode="min")
    trainer.fit(module, datamodule=Batches(blocks, blocks[:4], batch_size=4))
    figures = read_json(tmp_path / MEMORY_FILE)
    n_tensors = len(list(module.model.parameters()))
    assert figures["param_bytes"] == 4 * module.model.num_params() == parameter_bytes(module.model)
    assert figures["grad_bytes"] == figures["param_bytes"]  # full finetuning: a gradient for every weight
    assert figures["optimizer_bytes"] == 2 * figures["param_bytes"] + 4 * n_tensors
    assert figures["trainable_params"] == module.model.num_params()
    assert figures["param_optimizer_bytes"] == figures["param_bytes"] + figures["optimizer_bytes"]
    assert figures["steps"] == 4 and len(figures["step_s_all"]) == 3 and figures["step_s"] > 0  # the first step untimed
    assert figures["param_grad_optimizer_bytes"] < figures["rss_at_backward_bytes"] <= figures["peak_rss_bytes"]


def test_a_ppo_fit_counts_four_models_and_the_gradients_and_state_of_the_two_that_train(tmp_path):
    # Manual optimisation: figures taken at the end of each iteration, where the last minibatch's .grad is still set.
    ppo = OmegaConf.to_container(OmegaConf.load(REPO / "conf/stage/ppo.yaml")["ppo"])
    ppo.update(rollout_batch_size=4, minibatch_size=2, max_new_tokens=4, ppo_epochs=1, save_every=1000, eval_every=1000)
    config = GPTConfig(**CONFIG).to_dict()
    torch.manual_seed(0)
    module = PPOModule(config, config, ppo, {"lr": 1e-3, "weight_decay": 0.0, "betas": [0.9, 0.95]}, reward_norm={}, eos_id=2, pad_id=0, seed=0)
    module.reference.load_state_dict(module.actor.state_dict())
    module.reward_fn = lambda sequences, attention, response, mask: (response == 7).float().sum(1)
    module.prompts = [[3, 4, 5], [6, 7], [8, 9, 10, 11], [12, 13]] * 4
    iterations = 3
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=iterations, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, use_distributed_sampler=False, default_root_dir=str(tmp_path), callbacks=[MemoryFigures(tmp_path / MEMORY_FILE)],
    )
    trainer.fit(module, DataLoader(Iterations(iterations), batch_size=1, collate_fn=lambda items: items[0]))
    figures = read_json(tmp_path / MEMORY_FILE)
    model, head = parameter_bytes(gpt()), 4 * (32 + 1)  # a scalar head: n_embd weights and a bias
    assert figures["param_bytes_by_module"] == {"actor": model, "reference": model, "critic": model + head, "reward_model": model + head}
    assert figures["param_bytes"] == 4 * model + 2 * head
    trained = model + (model + head)  # actor and critic
    tensors = len(list(module.actor.parameters())) + len(list(module.critic.parameters()))
    assert figures["grad_bytes"] == trained
    assert figures["optimizer_bytes"] == 2 * trained + 4 * tensors
    assert figures["trainable_params"] == trained // 4
    assert figures["steps"] == iterations and len(figures["step_s_all"]) == iterations - 1
    assert figures["rss_at_backward_bytes"] > figures["param_grad_optimizer_bytes"]  # manual_backward reaches the hook too
