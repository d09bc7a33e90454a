"""Structured pruning (pipeline/model/prune.py): removing units that compute nothing keeps the function exactly;
the planner meets the ratio; a pruned model is an ordinary model (saves, loads, exports, generates).

The stage (`python -m pipeline stage=prune`) is tests/stages/test_prune.py.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from helpers import GPT2_STYLE, VOCAB, tiny_model
from pipeline import runs
from pipeline.errors import UserError
from pipeline.model import GPT, generate
from pipeline.model import prune as P
from pipeline.model.hf import architecture_of, export

ARCHS = {
    "llama": dict(n_head=4),
    "gqa": dict(n_head=4, n_kv_head=2),
    "gpt2-bias": dict(GPT2_STYLE, n_head=4, bias=True),
}
EXACT = dict(atol=1e-5, rtol=1e-5)  # float32: only the order of the sums may differ


def model_of(arch: str, n_layer: int = 3) -> GPT:
    return tiny_model(seed=0, n_layer=n_layer, **ARCHS[arch])


def sequences(n: int = 6, length: int = 20) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, VOCAB, (length - i,), generator=g).tolist() for i in range(n)]


def probe() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(7))


def zero_group(model: GPT, block: int, group: int) -> None:
    """Zero one head group's weights in one block: its query, key and value rows (and biases), its out_proj columns."""
    c = model.config
    hs, per = c.head_size, c.n_head // c.n_kv_head
    attn = model.blocks[block].attn
    q = slice(group * per * hs, (group + 1) * per * hs)
    k, v = slice(group * hs, (group + 1) * hs), slice((c.n_kv_head + group) * hs, (c.n_kv_head + group + 1) * hs)
    with torch.no_grad():
        for rows, proj in ((q, attn.q_proj), (k, attn.kv_proj), (v, attn.kv_proj)):
            proj.weight[rows] = 0
            if proj.bias is not None:
                proj.bias[rows] = 0
        attn.out_proj.weight[:, q] = 0


def zero_channel(model: GPT, block: int, channel: int) -> None:
    mlp, hidden = model.blocks[block].mlp, model.config.mlp_hidden
    rows = [channel, hidden + channel] if mlp.gated else [channel]
    with torch.no_grad():
        mlp.up_proj.weight[rows] = 0
        if mlp.up_proj.bias is not None:
            mlp.up_proj.bias[rows] = 0
        mlp.down_proj.weight[:, channel] = 0


def ratio_removing(model: GPT, kind: str, count: int) -> float:
    """The ratio that removes `count` units of one kind (from every block, for groups and channels)."""
    cost = P.unit_costs(model.config)[kind] * (1 if kind == "blocks" else model.config.n_layer)
    return 1 - count * cost / model.num_params()


@pytest.mark.parametrize("method", P.METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_pruning_zeroed_head_groups_keeps_the_logits(arch, method):
    model = model_of(arch)
    zeroed = [1, 0, model.config.n_kv_head - 1]  # a different group in each block
    for block, group in enumerate(zeroed):
        zero_group(model, block, group)
    scores = P.importance(model, method, P.calibrate(model, sequences(), pad_id=0))
    assert [int(s.argmin()) for s in scores.groups] == zeroed and (scores.groups.min(dim=1).values == 0).all()
    # heads=True: any count (the planner's own choice keeps what the export can say: GPT-2 style none, Llama n_head dividing n_embd).
    plan = P.plan_pruning(model, ratio_removing(model, "heads", 1), {"heads": 1.0}, scores, heads=True)
    assert plan.counts == {"blocks": 0, "heads": 1, "channels": 0}
    assert all(z not in kept for z, kept in zip(zeroed, plan.groups))
    smaller = P.apply_plan(model, plan)
    c = smaller.config
    assert c.n_kv_head == model.config.n_kv_head - 1 and c.n_head == c.n_kv_head * (model.config.n_head // model.config.n_kv_head)
    assert c.head_size == model.config.head_size and c.n_head * c.head_size < c.n_embd
    assert smaller.num_params() == plan.params < model.num_params()
    with torch.no_grad():
        torch.testing.assert_close(smaller(probe()), model(probe()), **EXACT)


@pytest.mark.parametrize("method", P.METHODS)
@pytest.mark.parametrize("arch", ARCHS)
def test_pruning_zeroed_mlp_channels_keeps_the_logits(arch, method):
    model = model_of(arch)
    zeroed = {0: [3, 17], 1: [0, 5], 2: [40, 63]}
    for block, channels in zeroed.items():
        for ch in channels:
            zero_channel(model, block, ch)
    scores = P.importance(model, method, P.calibrate(model, sequences(), pad_id=0))
    plan = P.plan_pruning(model, ratio_removing(model, "channels", 2), {"channels": 1.0}, scores)
    assert plan.counts["channels"] == 2 and all(set(zeroed[b]).isdisjoint(kept) for b, kept in zip(plan.blocks, plan.channels))
    smaller = P.apply_plan(model, plan)
    assert smaller.config.mlp_hidden == model.config.mlp_hidden - 2
    with torch.no_grad():
        torch.testing.assert_close(smaller(probe()), model(probe()), **EXACT)


@pytest.mark.parametrize("arch", ARCHS)
def test_removing_a_block_that_changes_nothing_keeps_the_logits(arch):
    model = model_of(arch, n_layer=4)
    with torch.no_grad():  # both residual branches of block 2 add zero: the block passes its input through
        for proj in (model.blocks[2].attn.out_proj, model.blocks[2].mlp.down_proj):
            proj.weight.zero_()
            if proj.bias is not None:
                proj.bias.zero_()
    scores = P.importance(model, "magnitude", P.calibrate(model, sequences(), pad_id=0))
    assert int(scores.blocks.argmin()) == 2 and abs(float(scores.blocks[2])) < 1e-6 < float(scores.blocks.sort().values[1])
    plan = P.plan_pruning(model, ratio_removing(model, "blocks", 1), {"blocks": 1.0}, scores)
    assert plan.blocks == [0, 1, 3]
    smaller = P.apply_plan(model, plan)
    assert smaller.config.n_layer == 3 and [b.attn.layer for b in smaller.blocks] == [0, 1, 2]  # KV-cache slots renumbered
    with torch.no_grad():
        torch.testing.assert_close(smaller(probe()), model(probe()), **EXACT)


@pytest.mark.parametrize(
    "targets",
    [{"heads": 0.3, "channels": 0.7}, {"channels": 1.0}, {"blocks": 0.3, "heads": 0.2, "channels": 0.5}, {"blocks": 0.5, "channels": 0.5}],
)
@pytest.mark.parametrize("ratio", [0.5, 0.7, 0.9])
def test_the_planner_meets_the_ratio_within_one_channel_per_block(targets, ratio):
    model = tiny_model(seed=0, n_layer=4, n_head=4, n_embd=64)
    scores = P.importance(model, "magnitude", P.calibrate(model, sequences(), pad_id=0))
    plan = P.plan_pruning(model, ratio, targets, scores)
    smaller = P.apply_plan(model, plan)
    assert smaller.num_params() == plan.params
    assert smaller.config.n_embd % smaller.config.n_head == 0  # transformers' LlamaConfig loads nothing else, head_dim or not
    blocks = len(plan.blocks)
    # The tolerance the planner promises: half a channel in every kept block (stated here twice as loose, as a bound).
    assert abs(plan.ratio - ratio) <= P.unit_costs(model.config)["channels"] * blocks / model.num_params()
    if ratio == 0.5:  # a share large enough for whole units of each kind
        assert (blocks < model.config.n_layer) == bool(targets.get("blocks"))
        assert (smaller.config.n_head < model.config.n_head) == bool(targets.get("heads"))


def test_the_planner_keeps_gpt2_heads_and_refuses_what_it_cannot_reach():
    model = model_of("gpt2-bias")
    scores = P.importance(model, "magnitude", P.calibrate(model, sequences(), pad_id=0))
    plan = P.plan_pruning(model, 0.7, {"heads": 0.5, "channels": 0.5}, scores)
    assert plan.counts["heads"] == 0 and abs(plan.ratio - 0.7) < 0.01  # the heads' share went to the channels
    with pytest.raises(UserError, match="cannot lose any and still export"):
        P.plan_pruning(model, 0.7, {"heads": 1.0}, scores)
    with pytest.raises(UserError, match=r"prune.ratio=0.05: .*token embedding alone holds"):
        P.plan_pruning(model, 0.05, {"channels": 1.0}, scores)
    with pytest.raises(ValueError, match="unknown"):
        P.plan_pruning(model, 0.7, {"layers": 1.0}, scores)


def test_calibration_ignores_padding():
    model = model_of("gqa")
    seqs = sequences(n=4)
    together = P.calibrate(model, seqs, pad_id=0, batch_size=4)  # right-padded to the longest
    alone = P.calibrate(model, seqs, pad_id=0, batch_size=1)
    assert together.tokens == alone.tokens == sum(map(len, seqs))
    torch.testing.assert_close(together.block_influence, alone.block_influence, atol=1e-6, rtol=1e-5)
    for a, b in zip(together.mlp_out + together.attn_out, alone.mlp_out + alone.attn_out):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gqa"])
def test_a_pruned_model_saves_loads_exports_and_generates(arch, tokenizer, tmp_path):
    model = model_of(arch)
    smaller, plan = P.prune_model(model, 0.5, {"blocks": 0.5, "heads": 0.2, "channels": 0.3}, "wanda", P.calibrate(model, sequences(), pad_id=0))
    assert smaller.config.n_layer < 3 and smaller.config.head_dim is not None and smaller.config.mlp_hidden_size is not None
    ids = probe()
    with torch.no_grad():
        ours = smaller(ids)
    # model.pt: the smaller config travels in the file; load_model_payload + build_model give the same model back.
    runs.save_model(tmp_path / "model.pt", smaller, kind="lm", stage="sft")
    payload = runs.load_model_payload(tmp_path / "model.pt")
    assert payload["config"] == smaller.config.to_dict()
    loaded = runs.build_model(payload, GPT, tmp_path / "model.pt").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids), ours, atol=0, rtol=0)
    # transformers: a LlamaForCausalLM with head_dim, equal logits, equal greedy generations; and back.
    export(loaded, tokenizer, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.head_dim == smaller.config.head_dim and hf.config.num_hidden_layers == smaller.config.n_layer
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, ours, **EXACT)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    ids = ids.masked_fill(mask == 0, tokenizer.pad_token_id)
    new = 8
    theirs = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=tokenizer.pad_token_id)
    out = generate(loaded, ids, mask, max_new_tokens=new, temperature=0.0, pad_id=tokenizer.pad_token_id)  # the KV cache of the narrower heads
    assert torch.equal(theirs[:, ids.size(1) :], out.tokens)
    back = runs.load_model_payload(runs.model_file(tmp_path / "hf"))
    assert back["config"] == smaller.config.to_dict()


def test_gpt2_export_of_narrow_heads_is_refused_by_name():
    model = model_of("gpt2-bias")
    scores = P.importance(model, "magnitude", P.calibrate(model, sequences(), pad_id=0))
    narrow = P.apply_plan(model, P.plan_pruning(model, ratio_removing(model, "heads", 1), {"heads": 1.0}, scores, heads=True))
    with pytest.raises(UserError, match=r"head_dim=8 with n_head=3 and n_embd=32 .* has no GPT-2 counterpart"):
        architecture_of(narrow.config)


def test_pruning_to_a_given_shape_keeps_the_function_where_the_dropped_units_compute_nothing():
    """plan_for_config (stage=distill's start from the teacher): the kept blocks, groups and channels are the ones that matter."""
    model = model_of("gqa", n_layer=3)
    with torch.no_grad():  # block 1 passes its input through; in the others, channels 0-9 and head group 1 add nothing
        for proj in (model.blocks[1].attn.out_proj, model.blocks[1].mlp.down_proj):
            proj.weight.zero_()
    for block in (0, 2):
        zero_group(model, block, 1)
        for ch in range(10):
            zero_channel(model, block, ch)
    c = model.config
    target = P.GPTConfig.from_dict({**c.to_dict(), "n_layer": 2, "n_head": 2, "n_kv_head": 1, "head_dim": c.head_size, "mlp_ratio": 4.0, "mlp_hidden_size": c.mlp_hidden - 10})
    assert P.shape_mismatch(c, target) is None
    plan = P.plan_for_config(model, target, P.importance(model, "wanda", P.calibrate(model, sequences(), pad_id=0)))
    assert plan.blocks == [0, 2] and plan.groups == [[0], [0]] and plan.channels == [list(range(10, c.mlp_hidden))] * 2
    assert plan.counts == {"blocks": 1, "heads": 1, "channels": 10}
    smaller = P.apply_plan(model, plan)
    assert smaller.num_params() == plan.params and (smaller.config.n_layer, smaller.config.n_kv_head, smaller.config.mlp_hidden) == (2, 1, c.mlp_hidden - 10)
    with torch.no_grad():
        torch.testing.assert_close(smaller(probe()), model(probe()), **EXACT)


def test_a_shape_that_is_not_a_part_of_the_source_is_named():
    c = model_of("gqa").config
    wider = P.GPTConfig.from_dict({**c.to_dict(), "n_embd": 64, "n_layer": 5})
    why = P.shape_mismatch(c, wider)
    assert "n_embd=64 (the source's 32)" in why and "n_layer=5 (the source has 3)" in why
    other_ratio = P.GPTConfig.from_dict({**c.to_dict(), "n_kv_head": 4})
    assert "1 query heads per key/value head (the source's 2)" in P.shape_mismatch(c, other_ratio)
    with pytest.raises(ValueError, match="not a part of the source model"):
        P.plan_for_config(model_of("gqa"), wider, None)
