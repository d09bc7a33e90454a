"""Memory levers: activation checkpointing (model.activation_checkpointing) and the KV cache in the autocast dtype.

Checkpointing must change nothing but memory: the same gradients (GPT, ScalarGPT, LoRA, QLoRA; with an
attention mask, packed rows, dropout), fewer tensors saved for the backward, the blocks run again in it,
and forwards without gradients (evaluation, the KV-cache sampler) left as they are. One real stage run
(SFT with LoRA, in process) trains with it on.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from helpers import finished_run, tiny_model
from pipeline import CONF_DIR, runs
from pipeline.checks import check_config
from pipeline.model import GPT, GPTConfig, ScalarGPT, generate, left_pad
from pipeline.model.gpt import set_activation_checkpointing
from pipeline.model.lora import LoraSettings, apply_lora
from pipeline.training import memory_levers, model_config_from

CONFIG = dict(vocab_size=96, block_size=32, n_layer=3, n_head=4, n_embd=32)


def model(kind: str, seed: int = 0, **arch) -> GPT:
    """A small model of one kind, its parameters away from the init (every gradient then matters)."""
    torch.manual_seed(seed)
    cls = ScalarGPT if kind.startswith("scalar") else GPT
    m = cls(GPTConfig(**{**CONFIG, **arch}))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    if kind.endswith("lora"):
        m = apply_lora(m, LoraSettings(r=4, alpha=8, quantize="nf4" if kind.endswith("qlora") else None))
        with torch.no_grad():  # B starts at zero, and A would get no gradient
            for name, p in m.named_parameters():
                if ".lora_B." in name:
                    p.normal_(std=0.05)
    return m.train()


def left_padded(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, CONFIG["vocab_size"], (n,), generator=g).tolist() for n in (12, 7, 10)]
    return left_pad(rows, pad_id=0)


def packed_rows() -> dict:
    """Two rows of two sequences each, packed: every token takes its own sequence's position and sees only it."""
    lengths = [[5, 7], [8, 4]]
    seq = torch.tensor([[i for i, n in enumerate(row) for _ in range(n)] for row in lengths])  # (2, 12)
    positions = torch.tensor([[t for n in row for t in range(n)] for row in lengths])
    T = seq.size(1)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    mask = (seq[:, :, None] == seq[:, None, :]) & causal  # (2, 12, 12)
    ids = torch.randint(3, CONFIG["vocab_size"], (2, T), generator=torch.Generator().manual_seed(2))
    return {"ids": ids, "packed": (positions, mask[:, None])}


def loss_of(m: GPT, inputs: str) -> torch.Tensor:
    if inputs == "mask":
        ids, mask = left_padded()
        out = m(ids, attention_mask=mask)
        keep = mask.bool()
    else:
        batch = packed_rows()
        ids, out = batch["ids"], m(batch["ids"], packed=batch["packed"])
        keep = torch.ones_like(ids, dtype=torch.bool)
    if out.dim() == 2:  # ScalarGPT: a score per position
        return ((out - 1).pow(2) * keep).sum() / keep.sum()
    logp = F.log_softmax(out[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return -(logp * keep[:, 1:]).sum() / keep[:, 1:].sum()


class BlockRuns:
    """How often the blocks' MLPs started: once per forward, once more in the backward where a block is recomputed.

    A pre-hook: the recompute stops early, inside the MLP, once it holds every tensor the backward needs.
    """

    def __init__(self, m: GPT):
        self.count = 0
        self.handles = [block.mlp.register_forward_pre_hook(self.hook) for block in m.blocks]

    def hook(self, *args) -> None:
        self.count += 1

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def gradients(m: GPT, inputs: str, checkpointing: bool, seed: int = 3) -> tuple[dict[str, torch.Tensor], int]:
    """{name: grad} of every parameter that received one, and how often the blocks ran (forward and backward)."""
    set_activation_checkpointing(m, checkpointing)
    m.zero_grad(set_to_none=True)
    runs_ = BlockRuns(m)
    torch.manual_seed(seed)  # the same dropout masks for both settings
    loss_of(m, inputs).backward()
    runs_.close()
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}, runs_.count


@pytest.mark.parametrize(
    "kind, inputs, arch",
    [
        ("gpt", "mask", {}),
        ("gpt", "packed", {}),
        ("gpt", "mask", dict(dropout=0.2, pos_emb="learned", norm="layernorm", mlp="gelu", bias=True)),
        ("scalar", "mask", {}),
        ("scalar", "packed", dict(n_kv_head=2)),
        ("lora", "mask", {}),
        ("scalar-lora", "packed", {}),
        ("qlora", "mask", {}),
    ],
    ids=["gpt-mask", "gpt-packed", "gpt2-dropout", "scalar-mask", "scalar-packed-gqa", "lora-mask", "scalar-lora-packed", "qlora-mask"],
)
def test_checkpointed_gradients_equal_the_plain_ones(kind, inputs, arch):
    if kind == "qlora":
        pytest.importorskip("bitsandbytes")
    m = model(kind, **arch)
    plain, plain_runs = gradients(m, inputs, checkpointing=False)
    checkpointed, checkpointed_runs = gradients(m, inputs, checkpointing=True)
    n_layer = CONFIG["n_layer"]
    assert plain_runs == n_layer and checkpointed_runs == 2 * n_layer  # each block ran again in the backward pass
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert set(plain) == set(checkpointed) == trainable
    if "lora" in kind:
        assert trainable and all(".lora_" in n or n.startswith("score_head.") for n in trainable)  # only the adapters (and a new head)
    for name, g in plain.items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(checkpointed[name], g, rtol=0, atol=1e-6, msg=name)


def saved_bytes(m: GPT, checkpointing: bool) -> int:
    """Bytes of the tensors that the forward keeps for the backward pass."""
    set_activation_checkpointing(m, checkpointing)
    total = 0

    def pack(t: torch.Tensor):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    ids, mask = left_padded()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(ids, attention_mask=mask).sum().backward()
    return total


def test_checkpointing_keeps_far_fewer_activations():
    m = model("gpt")
    plain, checkpointed = saved_bytes(m, False), saved_bytes(m, True)
    assert checkpointed < plain / 2, (plain, checkpointed)


def test_forwards_without_gradients_do_not_checkpoint():
    m = model("gpt")
    set_activation_checkpointing(m, True)
    assert m.checkpoints_blocks()  # training: gradients recorded, no cache
    m.eval()
    assert m.checkpoints_blocks()  # eval mode alone (dropout off) still trains: still checkpointed
    with torch.no_grad():
        assert not m.checkpoints_blocks()
    with torch.inference_mode():
        assert not m.checkpoints_blocks()
    assert not m.checkpoints_blocks(m.new_kv_cache(1, 8))  # a cached forward writes the cache in place: never recomputed
    set_activation_checkpointing(m, False)
    assert not m.checkpoints_blocks()
    with pytest.raises(TypeError, match="switch of GPT models"):
        set_activation_checkpointing(torch.nn.Linear(2, 2), True)


def test_sampling_and_no_grad_scoring_are_unchanged_by_checkpointing():
    m = model("gpt").eval()
    ids, mask = left_padded()
    with torch.no_grad():
        before = m(ids, attention_mask=mask)
    off = generate(m, ids, mask, max_new_tokens=6, temperature=0.0)
    set_activation_checkpointing(m, True)
    runs_ = BlockRuns(m)
    on = generate(m, ids, mask, max_new_tokens=6, temperature=0.0)
    assert runs_.count == CONFIG["n_layer"] * on.tokens.size(1)  # prefill and each decode step: every block once
    runs_.close()
    with torch.no_grad():
        torch.testing.assert_close(m(ids, attention_mask=mask), before, rtol=0, atol=0)
    assert torch.equal(on.tokens, off.tokens)


def test_the_switch_is_a_runtime_setting_not_an_architecture_field():
    """memory_levers reads model.activation_checkpointing (default false); model_config_from and model.pt never hold it."""
    m = model("gpt")
    cfg = OmegaConf.create({"stage": "sft", "model": {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "activation_checkpointing": True, "compile": False}})
    memory_levers(cfg, m)
    assert m.activation_checkpointing
    memory_levers(OmegaConf.create({"stage": "sft", "model": {"n_layer": 2}}), m)  # a user config without the key: off
    assert not m.activation_checkpointing
    arch = model_config_from(cfg.model, 300).to_dict()
    assert "activation_checkpointing" not in arch and "compile" not in arch


def test_the_kv_cache_takes_the_autocast_dtype_and_cached_greedy_equals_the_full_forward():
    m = tiny_model(0)  # float32 weights
    assert m.new_kv_cache(2, 8).k.dtype == torch.float32
    prompts = [torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (5, 9, 3)]
    ids, mask = left_pad(prompts, 0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cache = m.new_kv_cache(2, 8)
        assert cache.k.dtype == cache.v.dtype == torch.bfloat16
        gen = generate(m, ids, mask, max_new_tokens=10, temperature=0.0)
        seq, att = ids, mask
        for _ in range(10):  # the uncached forward over the whole sequence, under the same autocast
            nxt = m(seq, attention_mask=att)[:, -1].argmax(-1, keepdim=True)
            seq, att = torch.cat([seq, nxt], 1), torch.cat([att, torch.ones_like(nxt)], 1)
    assert torch.equal(gen.tokens, seq[:, ids.size(1) :])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
        assert m.new_kv_cache(2, 8).k.dtype == torch.float32


# ---------------------------------------------------------------------------------------------
# One real stage run, in process: SFT with LoRA adapters and activation checkpointing on.


def count_to(n: int) -> str:
    return " ".join(str(k) for k in range(1, n + 1))


def test_an_sft_stage_with_lora_trains_under_activation_checkpointing(tmp_path, tokenizer, caplog):
    from pipeline.stages import sft

    base = finished_run(tmp_path / "outputs", "pretrain", "base", tiny_model(), tokenizer)
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Count to {n} ({i}):", "completion": count_to(n)}) + "\n" for i in range(4) for n in range(1, 9)))
    run_dir = tmp_path / "outputs" / "sft" / "ckpt"
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "stage=sft", "peft=lora", "logger=csv", f"paths.root={tmp_path / 'outputs'}", f"paths.run_dir={run_dir}", f"init_from={base}",
                f"data.path={data}", "data.batch_size=8", "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
                "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false", "model.activation_checkpointing=true",
            ],
        )
    check_config(cfg)
    with caplog.at_level(logging.INFO, logger="pipeline.training"):
        metrics = sft.run(cfg, run_dir)
    assert any("activation checkpointing on" in r.getMessage() for r in caplog.records)
    assert metrics["train/steps"] == 4 and torch.isfinite(torch.tensor(metrics["val/loss"]))
    assert runs.is_finished(run_dir)
    saved = runs.load_model_payload(run_dir / runs.MODEL_FILE)
    assert "activation_checkpointing" not in json.dumps(saved.get("config", {}))  # a runtime setting: not in model.pt
