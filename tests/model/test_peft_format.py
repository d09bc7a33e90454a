"""Our LoRA adapters in peft's own format (pipeline/model/peft_format.py): real PeftModel on the real exported base gives our logits.

Every adapter here has random B matrices: a fresh LoRA (B = 0) computes its base, so equal logits
would prove nothing about the mapping. The export stage itself: tests/stages/test_export_lora.py.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from helpers import ARCHS, VOCAB, tiny_model
from pipeline.model import ScalarGPT
from pipeline.model.hf import export
from pipeline.model.lora import LoraSettings, adapter_state_dict, apply_lora, merge_lora
from pipeline.model.peft_format import SAFETENSORS, load_peft, write_peft_export

ALL = ("q_proj", "kv_proj", "out_proj", "up_proj", "down_proj")


def trained_lora(base, **settings):
    """A LoRA copy of base whose adapters are far from their init: A and B random."""
    model = apply_lora(copy.deepcopy(base), LoraSettings(**{"r": 4, "alpha": 8.0, **settings}))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model.eval()


def ids(seed=3):
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


def peft_on_export(out):
    """What a user of the export does: plain transformers for the base, plain peft for the adapter."""
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "base"), out / "adapter").eval()


def adapted_modules(peft_model) -> set[str]:
    """The names of the transformers modules that carry a LoRA layer, with the block index dropped."""
    from peft.tuners.lora import LoraLayer

    return {re.sub(r"^.*?\.\d+\.", "", name) for name, m in peft_model.base_model.model.named_modules() if isinstance(m, LoraLayer)}


CASES = {
    # arch, target_modules, the transformers modules that must carry an adapter (per block)
    "llama-gqa-all": ("llama-gqa", ALL, {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}),
    "llama-gqa-kv": ("llama-gqa", ("kv_proj",), {"self_attn.k_proj", "self_attn.v_proj"}),
    "llama-bias-up": ("llama-bias-untied", ("q_proj", "up_proj"), {"self_attn.q_proj", "mlp.gate_proj", "mlp.up_proj"}),
    "gpt2-all": ("gpt2", ALL, {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}),
    "gpt2-q": ("gpt2", ("q_proj",), {"attn.c_attn"}),
    "gpt2-kv-down": ("gpt2", ("kv_proj", "down_proj"), {"attn.c_attn", "mlp.c_proj"}),  # mlp.c_proj only, not attn.c_proj
}


@pytest.mark.parametrize("case", CASES)
def test_peft_on_the_exported_base_computes_our_lora_logits(case, tmp_path):
    arch, targets, modules = CASES[case]
    base = tiny_model(**ARCHS[arch])
    lora = trained_lora(base, target_modules=targets)
    x = ids()
    with torch.no_grad():
        ours, plain = lora(x), base(x)
    assert (ours - plain).abs().max() > 0.1  # the adapter matters: the comparison below can fail

    figures = write_peft_export(tmp_path, copy.deepcopy(base), adapter_state_dict(lora), lora.lora_settings, merged=merge_lora(lora))
    assert figures["check/adapter_max_abs_logit_diff"] < 1e-5 and figures["check/base_max_abs_logit_diff"] < 1e-5
    assert figures["check/adapter_vs_merged_max_abs_logit_diff"] < 1e-4
    peft_model = peft_on_export(tmp_path)
    assert type(peft_model).__name__ == "PeftModelForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=x).logits, ours, atol=1e-5, rtol=1e-5)
        # The base folder is the base, not the merged model: with the adapter off peft computes our base.
        with peft_model.disable_adapter():
            torch.testing.assert_close(peft_model(input_ids=x).logits, plain, atol=1e-5, rtol=1e-5)
    assert adapted_modules(peft_model) == modules

    # The files are what peft itself writes for this model: the same keys and tensors after its own save_pretrained.
    ours_file = load_file(tmp_path / "adapter" / SAFETENSORS)
    peft_model.save_pretrained(tmp_path / "resaved")
    theirs = load_file(tmp_path / "resaved" / SAFETENSORS)
    assert sorted(ours_file) == sorted(theirs) and all(torch.equal(ours_file[k], theirs[k]) for k in theirs)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["fan_in_fan_out"] == arch.startswith("gpt2")
    assert config["r"] == 4 and config["lora_alpha"] == 8
    if arch.startswith("llama"):
        assert "base_model.model.model.layers.0.self_attn.k_proj.lora_A.weight" in ours_file or "kv_proj" not in targets
    else:
        both = {"q_proj", "kv_proj"} <= set(targets)
        # c_attn's fused adapter: rank 2r at alpha 2*alpha when it carries both, so the scale stays alpha / r.
        assert (config["rank_pattern"], config["alpha_pattern"]) == (({"c_attn": 8}, {"c_attn": 16}) if both else ({}, {}))
        assert ours_file["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (8 if both else 4, 32)


def test_bfloat16_export_writes_a_bfloat16_adapter_and_base(tmp_path):
    base = tiny_model(**ARCHS["llama-gqa"])
    lora = trained_lora(base)
    figures = write_peft_export(tmp_path, copy.deepcopy(base), adapter_state_dict(lora), lora.lora_settings, dtype="bfloat16", merged=merge_lora(lora))
    assert {t.dtype for t in load_file(tmp_path / "adapter" / SAFETENSORS).values()} == {torch.bfloat16}
    assert {t.dtype for t in load_file(tmp_path / "base" / "model.safetensors").values()} == {torch.bfloat16}
    # The check compares against our LoRA model holding the file's (rounded) values: still exact.
    assert figures["check/adapter_max_abs_logit_diff"] < 1e-5
    assert 0 < figures["check/adapter_vs_merged_max_abs_logit_diff"] < 0.5  # the rounding of A and B, against the float32 run


def test_a_qlora_adapter_is_written_for_the_float_base(tmp_path):
    base = tiny_model(**ARCHS["llama-gqa"])
    qlora = trained_lora(base, quantize="nf4")
    adapter = adapter_state_dict(qlora)
    figures = write_peft_export(tmp_path, copy.deepcopy(base), adapter, qlora.lora_settings, merged=merge_lora(qlora))
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 4
    float_lora = trained_lora(base)  # the same random A and B (same generator), on the float base
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(peft_on_export(tmp_path)(input_ids=x).logits, float_lora(x), atol=1e-5, rtol=1e-5)
    # Against the QLoRA model itself only the NF4 rounding of the base differs.
    assert figures["check/adapter_max_abs_logit_diff"] < 1e-5 < figures["check/adapter_vs_merged_max_abs_logit_diff"]


def test_a_reward_models_adapter_goes_without_its_score_head(tmp_path):
    base = tiny_model(**ARCHS["gpt2"])
    scalar = ScalarGPT(base.config)
    scalar.load_state_dict(base.state_dict(), strict=False)
    reward = trained_lora(scalar)
    adapter = adapter_state_dict(reward)
    assert any(k.startswith("score_head.") for k in adapter)
    write_peft_export(tmp_path, copy.deepcopy(base), adapter, reward.lora_settings)
    assert not any("score" in k for k in load_file(tmp_path / "adapter" / SAFETENSORS))
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(peft_on_export(tmp_path)(input_ids=x).logits, reward.lm_head(reward.hidden_states(x)), atol=1e-5, rtol=1e-5)


def test_an_adapter_tensor_that_does_not_arrive_is_an_error_not_a_warning(tmp_path):
    base = tiny_model(**ARCHS["gpt2"])
    lora = trained_lora(base, target_modules=("q_proj", "down_proj"))
    write_peft_export(tmp_path, copy.deepcopy(base), adapter_state_dict(lora), lora.lora_settings)
    path = tmp_path / "adapter" / SAFETENSORS
    written = load_file(path)
    key = "base_model.model.transformer.h.1.mlp.c_proj.lora_B.weight"
    save_file({k: v for k, v in written.items() if k != key}, path, metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match="peft loaded other values than the file holds for .*h.1.mlp.c_proj.lora_B"):
        load_peft(tmp_path / "base", tmp_path / "adapter", written)


def test_a_failed_adapter_check_leaves_the_previous_export_as_it_was(tmp_path):
    out = tmp_path / "hf"
    export(tiny_model(seed=1), None, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def failing(folder):  # what write_peft_export does when a check fails: raise after writing part of adapter/
        (folder / "adapter").mkdir()
        (folder / "adapter" / "adapter_config.json").write_text("{}")
        raise RuntimeError("the peft adapter on the exported base disagrees with our LoRA model")

    with pytest.raises(RuntimeError, match="disagrees"):
        export(tiny_model(seed=2), None, out, extra=failing)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary folder left beside it
