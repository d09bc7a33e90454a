"""LoRA / QLoRA (pipeline/model/lora.py): starts as the base, trains only adapters, disables, merges, saves."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from pipeline.model import GPT, GPTConfig, ScalarGPT, generate, left_pad
from pipeline.model.lora import (
    LoraSettings,
    adapter_state_dict,
    adapters_disabled,
    apply_lora,
    base_digest,
    load_adapter_state_dict,
    merge_lora,
    trainable_parameters,
)

CONFIG = dict(vocab_size=96, block_size=32, n_layer=2, n_head=4, n_embd=32)


def base(cls=GPT, seed=0, **kw) -> GPT:
    torch.manual_seed(seed)
    return cls(GPTConfig(**{**CONFIG, **kw})).eval()


def tokens(seed=1) -> torch.Tensor:
    return torch.randint(0, CONFIG["vocab_size"], (3, 12), generator=torch.Generator().manual_seed(seed))


def toy_loss(model, x) -> torch.Tensor:
    out = model(x)
    if out.dim() == 2:  # ScalarGPT: push every score towards 1
        return (out - 1).pow(2).mean()
    return F.cross_entropy(out[:, :-1].flatten(0, 1), x[:, 1:].flatten())


def train(model, x, steps=3, lr=1e-2):
    opt = torch.optim.Adam(trainable_parameters(model), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        toy_loss(model, x).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model


def lora(model, **kw):
    return apply_lora(copy.deepcopy(model), LoraSettings(r=4, alpha=8, **kw))


def base_tensors(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k and not k.startswith("score_head")}


@pytest.mark.parametrize("cls", [GPT, ScalarGPT])
def test_fresh_lora_model_is_exactly_the_base(cls):
    plain = base(cls)
    model = lora(plain)
    assert type(model) is cls and model.config is not None
    x = tokens()
    assert torch.equal(model(x), plain(x))  # B = 0: the adapter adds exact zeros


@pytest.mark.parametrize("cls", [GPT, ScalarGPT])
def test_training_changes_logits_and_disabling_restores_the_base_exactly(cls):
    plain = base(cls)
    model, x = lora(plain), tokens()
    start = model(x).detach()
    train(model, x)
    trained = model(x).detach()
    assert not torch.allclose(trained, start, atol=1e-4)
    with adapters_disabled(model):
        off = model(x)
    again = model(x)
    if cls is GPT:
        assert torch.equal(off, start)
    else:  # a ScalarGPT's base is its backbone: score_head is trained in full and stays as trained
        reference = copy.deepcopy(plain)
        reference.score_head.load_state_dict(model.score_head.state_dict())
        assert torch.equal(off, reference(x))
    assert torch.equal(again, trained)


def test_adapters_come_back_after_an_exception():
    model, x = train(lora(base()), tokens()), tokens()
    trained = model(x).detach()
    with pytest.raises(RuntimeError, match="boom"):
        with adapters_disabled(model):
            raise RuntimeError("boom")
    assert torch.equal(model(x), trained)
    model.blocks[0].attn.q_proj.lora_A.requires_grad_(False)  # frozen on purpose: peft's re-enable would unfreeze it
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with adapters_disabled(model):
        assert not any(p.requires_grad for n, p in model.named_parameters() if ".lora_" in n)
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}  # peft's toggle of requires_grad undone


@pytest.mark.parametrize("cls", [GPT, ScalarGPT])
def test_merged_model_equals_the_lora_model_and_is_plain(cls):
    plain = base(cls, pos_emb="learned", norm="layernorm", mlp="gelu", bias=True)  # biases on the adapted layers too
    model, x = train(lora(plain), tokens()), tokens()
    merged = merge_lora(model)
    assert type(merged) is cls
    assert list(merged.state_dict()) == list(cls(plain.config).state_dict())
    assert not any("lora" in n for n, _ in merged.named_modules())
    torch.testing.assert_close(merged(x), model(x), rtol=0, atol=1e-5)
    assert not torch.allclose(merged(x), plain(x), atol=1e-4)  # the merge did carry the update
    with adapters_disabled(model):
        assert torch.equal(merge_lora(model).state_dict()["blocks.0.attn.q_proj.weight"], plain.blocks[0].attn.q_proj.weight)


@pytest.mark.parametrize("cls", [GPT, ScalarGPT])
def test_only_adapters_train_all_get_gradients_and_the_base_stays_bit_identical(cls):
    plain = base(cls)
    model, x = lora(plain), tokens()
    expected = {n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    assert len(expected) == 2 * 5 * CONFIG["n_layer"]  # A and B on five projections per block
    if cls is ScalarGPT:
        expected |= {"score_head.weight", "score_head.bias"}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    before = base_tensors(model)
    train(model, x, steps=1)  # at init B = 0, so A's gradient is exactly 0; after one step it is not
    toy_loss(model, x).backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    after = base_tensors(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("cls", [GPT, ScalarGPT])
def test_adapter_state_round_trips_strictly(cls):
    plain = base(cls)
    model, x = train(lora(plain), tokens()), tokens()
    state = adapter_state_dict(model)
    assert all(".lora_" in k or k.startswith("score_head.") for k in state)
    assert any(k.startswith("score_head.") for k in state) == (cls is ScalarGPT)
    fresh = lora(plain)
    load_adapter_state_dict(fresh, state)
    assert torch.equal(fresh(x), model(x))

    missing = dict(state)
    gone = missing.pop("blocks.1.mlp.down_proj.lora_B.default.weight")
    with pytest.raises(ValueError, match=r"missing keys \['blocks\.1\.mlp\.down_proj\.lora_B\.default\.weight'\]"):
        load_adapter_state_dict(lora(plain), missing)
    with pytest.raises(ValueError, match=r"unexpected keys \['lm_head\.lora_A\.default\.weight'\]"):
        load_adapter_state_dict(lora(plain), {**state, "lm_head.lora_A.default.weight": gone})
    with pytest.raises(ValueError, match="blocks.0.attn.q_proj.lora_A.default.weight has shape"):
        load_adapter_state_dict(lora(plain), {**state, "blocks.0.attn.q_proj.lora_A.default.weight": torch.zeros(2, 2)})


def test_base_digest_ignores_training_and_tells_bases_apart():
    plain = base()
    model = lora(plain)
    digest = base_digest(model)
    assert digest == base_digest(plain)  # a LoRA model and its base agree (names without peft's base_layer)
    train(model, tokens())
    assert base_digest(model) == digest
    assert base_digest(lora(base(seed=1))) != digest
    changed = copy.deepcopy(plain)
    with torch.no_grad():
        changed.norm_f.weight[0] += 1e-3  # one number of a layer that never gets an adapter
    assert base_digest(changed) != digest
    assert base_digest(base(rope_theta=5000.0)) != digest  # same weights (same seed), another model


def test_kv_cache_generation_of_lora_equals_its_merged_model():
    model = train(lora(base()), tokens(), steps=5, lr=3e-2)
    ids, mask = left_pad([[5, 6, 7, 8], [9, 10], [11, 12, 13]], pad_id=0)
    ours = generate(model, ids, mask, max_new_tokens=10, temperature=0.0)
    theirs = generate(merge_lora(model), ids, mask, max_new_tokens=10, temperature=0.0)
    with adapters_disabled(model):
        reference = generate(model, ids, mask, max_new_tokens=10, temperature=0.0)
    assert torch.equal(ours.tokens, theirs.tokens)
    assert not torch.equal(ours.tokens, reference.tokens)  # the adapter changed what it says


def test_settings_are_checked():
    assert LoraSettings().target_modules == ("q_proj", "kv_proj", "out_proj", "up_proj", "down_proj")
    assert LoraSettings.from_dict(LoraSettings(r=2).to_dict()) == LoraSettings(r=2)
    for bad in ({"r": 0}, {"alpha": 0}, {"dropout": 1.0}, {"target_modules": ["lm_head"]}, {"target_modules": []}, {"quantize": "int8"}):
        with pytest.raises(ValueError):
            LoraSettings(**bad)
    with pytest.raises(ValueError, match="unknown keys"):
        LoraSettings.from_dict({"rank": 4})
    model = lora(base(), target_modules=["q_proj"])
    assert {n.split(".lora_")[0] for n, p in model.named_parameters() if p.requires_grad} == {"blocks.0.attn.q_proj", "blocks.1.attn.q_proj"}
    with pytest.raises(ValueError, match="already has adapters"):
        apply_lora(model, LoraSettings())


# QLoRA. Measured max |logits - float logits| at initialisation on tokens(), this config (n_embd 32):
# 0.027 (seed 0) on one machine; 0.064 on another (2026-12-01, an AVX512-BF16 CPU), where bitsandbytes'
# NF4 round trip equals a hand-written NF4 exactly (relative RMS error 0.092 on a Gaussian matrix).
# NF4 keeps 16 levels per block of 64 weights: this is the quantisation error of the base itself.
QLORA_LOGIT_ATOL = 0.1


@pytest.fixture(scope="module")
def qlora():
    pytest.importorskip("bitsandbytes")
    plain = base()
    return plain, lora(plain, quantize="nf4")


def test_qlora_base_is_stored_in_4_bit(qlora):
    import bitsandbytes as bnb

    _, model = qlora
    layers = [(n, m) for n, m in model.named_modules() if n.endswith(".base_layer")]
    assert len(layers) == 5 * CONFIG["n_layer"]
    for name, layer in layers:
        assert isinstance(layer, bnb.nn.Linear4bit) and layer.weight.quant_type == "nf4", name
        w = layer.weight
        assert w.dtype == torch.uint8 and w.numel() * w.element_size() * 8 == w.quant_state.shape.numel() * 4, name  # 4 bits a weight
        assert w.numel() * w.element_size() * 8 == layer.in_features * layer.out_features * 4
    assert isinstance(model.lm_head, torch.nn.Linear) and model.lm_head.weight.dtype == torch.float32  # tied to wte: not quantised
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if ".lora_" in n)


def test_qlora_forward_is_close_to_the_float_model(qlora):
    plain, model = qlora
    x = tokens()
    diff = (model(x) - plain(x)).abs().max().item()
    assert 0 < diff < QLORA_LOGIT_ATOL  # not 0: the base really is quantised


def test_qlora_gradients_reach_every_block_and_match_a_float_twin(qlora):
    """Backward through the 4-bit base: the adapters' gradients equal those of a float model with the same numbers."""
    _, q = qlora
    q = copy.deepcopy(q)
    x = tokens()
    train(q, x, steps=1)  # B != 0, so every A gets a gradient too
    with adapters_disabled(q):
        dequantised = merge_lora(q)  # the 4-bit base as float weights
    twin = lora(dequantised)
    load_adapter_state_dict(twin, adapter_state_dict(q))
    torch.testing.assert_close(twin(x), q(x), rtol=0, atol=1e-5)
    toy_loss(q, x).backward()
    toy_loss(twin, x).backward()
    grads = {n: p.grad for n, p in q.named_parameters() if p.requires_grad}
    assert len(grads) == 2 * 5 * CONFIG["n_layer"]
    for (n, g), (n2, p2) in zip(grads.items(), ((n, p) for n, p in twin.named_parameters() if p.requires_grad)):
        assert n == n2 and g is not None and g.abs().sum() > 0, n
        torch.testing.assert_close(g, p2.grad, rtol=1e-4, atol=1e-6, msg=n)
    base_before = base_digest(qlora[1])
    assert base_digest(q) == base_before  # training left the 4-bit base as it was


def test_qlora_merge_dequantises(qlora):
    _, q = qlora
    q = train(copy.deepcopy(q), tokens(), steps=2)
    merged = merge_lora(q)
    x = tokens(seed=2)
    assert list(merged.state_dict()) == list(GPT(q.config).state_dict())
    assert merged.blocks[0].attn.q_proj.weight.dtype == torch.float32
    # Measured max diff 9e-8 (dequantised weight @ x versus bnb's own 4-bit matmul): float rounding only.
    torch.testing.assert_close(merged(x), q(x), rtol=0, atol=1e-5)
