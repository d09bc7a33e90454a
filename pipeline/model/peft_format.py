"""A LoRA run's adapter in Hugging Face peft's own format, for the transformers model that hf.py exports.

`stage=export` of a LoRA run writes, beside the merged folder, `adapter/` (what peft's
`save_pretrained` writes: adapter_config.json + adapter_model.safetensors) and `base/` (the base as a
plain transformers folder), so that

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "base"), out / "adapter")

computes the logits of our LoRA model. Our GPT fuses some projections that transformers keeps apart
(or the other way round); the mapping is exact in every case, because LoRA is linear in B:

    Llama  q_proj -> q_proj, out_proj -> o_proj, down_proj -> down_proj
           kv_proj (A: r x C, B: 2kv x r)  -> k_proj (A, B[:kv]) and v_proj (A, B[kv:])
           up_proj (gate | up)             -> gate_proj (A, B[:hidden]) and up_proj (A, B[hidden:])
    GPT-2  q_proj and kv_proj -> attn.c_attn (fused q | k | v): A = cat(A_q, A_kv), B block-diagonal,
           rank 2r with alpha 2*alpha (rank_pattern / alpha_pattern) so the scale stays alpha / r;
           only one of the two adapted: rank r, zero rows of B for the other's outputs
           out_proj -> attn.c_proj, up_proj -> mlp.c_fc, down_proj -> mlp.c_proj (Conv1D: fan_in_fan_out)

A QLoRA run's adapter is written against the float base: whoever wants QLoRA again loads that base
in 4 bit themselves (transformers' BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")).
A reward model's adapter goes without its score head, as the merged export does.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.model.gpt import GPT, GPTConfig
from pipeline.model.hf import DTYPES, architecture_of, checked_transformers, max_logit_difference, save_transformers
from pipeline.model.lora import ADAPTER, LoraSettings, apply_lora, load_adapter_state_dict

ADAPTER_DIR, BASE_DIR = "adapter", "base"  # inside the merged export folder
PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model, as peft names the saved tensors
SAFETENSORS = "adapter_model.safetensors"  # peft's SAFETENSORS_WEIGHTS_NAME
# Where each of our projections lives in a block, and the transformers modules it becomes.
PARENT = {"q_proj": "attn", "kv_proj": "attn", "out_proj": "attn", "up_proj": "mlp", "down_proj": "mlp"}
LLAMA_TARGETS = {
    "q_proj": ("self_attn.q_proj",),
    "kv_proj": ("self_attn.k_proj", "self_attn.v_proj"),
    "out_proj": ("self_attn.o_proj",),
    "up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "down_proj": ("mlp.down_proj",),
}
# GPT-2's attn.c_proj and mlp.c_proj share a name: target_modules names them with their parent.
GPT2_TARGETS = {"q_proj": "attn.c_attn", "kv_proj": "attn.c_attn", "out_proj": "attn.c_proj", "up_proj": "mlp.c_fc", "down_proj": "mlp.c_proj"}


def _pair(adapter: dict, block: int, proj: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(A, B) of one of our projections (A: r x in, B: out x r), None if it has no adapter."""
    key = f"blocks.{block}.{PARENT[proj]}.{proj}.lora_{{}}.{ADAPTER}.weight"
    if key.format("A") not in adapter:
        return None
    return adapter[key.format("A")].float(), adapter[key.format("B")].float()


def _gpt2_c_attn(q: tuple | None, kv: tuple | None, config: GPTConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """One LoRA on the fused q | k | v projection that computes q's and kv's adapters exactly."""
    C, kv_out = config.n_embd, 2 * config.n_kv_head * config.head_size
    parts = [(p, rows) for p, rows in ((q, slice(0, C)), (kv, slice(C, C + kv_out))) if p is not None]
    A = torch.cat([a for (a, _), _ in parts])  # (sum of ranks, C)
    B = torch.zeros(C + kv_out, A.size(0))  # block-diagonal: each adapter writes only its own outputs
    col = 0
    for (a, b), rows in parts:
        B[rows, col : col + a.size(0)] = b
        col += a.size(0)
    return A, B


def peft_state_dict(adapter: dict[str, torch.Tensor], config: GPTConfig) -> dict[str, torch.Tensor]:
    """Our adapter tensors (`blocks.0.attn.kv_proj.lora_A.default.weight`, ...) -> peft's keys for the transformers model.

    float32, each tensor its own storage (safetensors refuses shared ones). A score head is left out.
    """
    arch = architecture_of(config)
    kv, hidden = config.n_kv_head * config.head_size, config.mlp_hidden
    out: dict[str, torch.Tensor] = {}

    def put(module: str, A: torch.Tensor, B: torch.Tensor) -> None:
        out[f"{PREFIX}{module}.lora_A.weight"] = A.clone().contiguous()
        out[f"{PREFIX}{module}.lora_B.weight"] = B.clone().contiguous()

    for i in range(config.n_layer):
        pairs = {proj: _pair(adapter, i, proj) for proj in PARENT}
        if arch == "llama":
            h = f"model.layers.{i}."
            for proj, (A, B) in ((p, ab) for p, ab in pairs.items() if ab is not None):
                names = LLAMA_TARGETS[proj]
                # kv_proj's outputs are all keys then all values; up_proj's the gate half then the up half (gpt.py).
                halves = B.split([kv, kv] if proj == "kv_proj" else [hidden, hidden]) if len(names) == 2 else (B,)
                for name, b in zip(names, halves):
                    put(h + name, A, b)
        else:
            h = f"transformer.h.{i}."
            if pairs["q_proj"] is not None or pairs["kv_proj"] is not None:
                put(h + "attn.c_attn", *_gpt2_c_attn(pairs["q_proj"], pairs["kv_proj"], config))
            for proj in ("out_proj", "up_proj", "down_proj"):
                if pairs[proj] is not None:
                    put(h + GPT2_TARGETS[proj], *pairs[proj])
    if not out:
        raise ValueError("peft_state_dict: no adapter tensors (keys like blocks.0.attn.q_proj.lora_A.default.weight)")
    return out


def peft_config(config: GPTConfig, settings: LoraSettings, base_model_name_or_path: str | None = None):
    """peft's LoraConfig for the adapter that peft_state_dict maps (its scale: alpha / r, as ours)."""
    from peft import LoraConfig

    arch = architecture_of(config)
    targets = settings.target_modules
    if arch == "llama":
        names = sorted({n for t in targets for n in LLAMA_TARGETS[t]})
        rank_pattern, alpha_pattern = {}, {}
    else:
        names = sorted({GPT2_TARGETS[t] for t in targets})
        both = {"q_proj", "kv_proj"} <= set(targets)
        # c_attn carries both adapters side by side: rank 2r; alpha 2 * alpha keeps the scale alpha / r.
        rank_pattern = {"c_attn": 2 * settings.r} if both else {}
        alpha_pattern = {"c_attn": 2 * settings.alpha} if both else {}
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=names,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        fan_in_fan_out=arch == "gpt2",  # GPT-2's Conv1D stores its weight as (in, out)
        bias="none",
        task_type="CAUSAL_LM",  # PeftModel.from_pretrained gives a PeftModelForCausalLM, with generate
        inference_mode=True,  # as peft's save_pretrained writes it
        base_model_name_or_path=base_model_name_or_path,
    )


def save_adapter(directory: Path, adapter: dict[str, torch.Tensor], config: GPTConfig, settings: LoraSettings, dtype: str = "float32", base_model_name_or_path: str | None = None) -> dict[str, torch.Tensor]:
    """Write adapter_config.json + adapter_model.safetensors into directory (peft's save_pretrained layout); return what was written.

    Not atomic by itself: the export calls it inside write_dir_atomically.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(DTYPES[dtype]) for k, v in peft_state_dict(adapter, config).items()}
    peft_config(config, settings, base_model_name_or_path).save_pretrained(str(directory))
    save_file(state, str(directory / SAFETENSORS), metadata={"format": "pt"})  # the metadata peft writes
    return state


def lora_reference(base: GPT, adapter: dict[str, torch.Tensor], settings: LoraSettings) -> GPT:
    """Our LoRA model on the float base (in place on `base`): what base/ + adapter/ compute. A QLoRA run's adapter on its float base."""
    float_settings = LoraSettings.from_dict({**settings.to_dict(), "quantize": None})
    model = apply_lora(base, float_settings)
    load_adapter_state_dict(model, {k: v for k, v in adapter.items() if not k.startswith("score_head.")})
    return model.eval()


def load_peft(base_dir_or_model, adapter_dir: Path, written: dict[str, torch.Tensor] | None = None):
    """PeftModel.from_pretrained on a transformers model (or folder); with `written`, every adapter tensor is checked to have arrived.

    peft only warns about missing keys and ignores unexpected ones: a key that maps nowhere would leave
    an adapter at its initial value, so the check compares what peft holds with what the file holds.
    """
    from peft import PeftModel, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    base = base_dir_or_model
    if isinstance(base, (str, Path)):
        base = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    if written is not None:
        held = get_peft_model_state_dict(model, save_embedding_layers=False)  # "auto" would look for the base on the hub
        if set(held) != set(written):
            raise RuntimeError(f"peft's model holds adapter tensors {sorted(set(held) ^ set(written))[:4]} that differ from the file's keys")
        wrong = [k for k in written if not torch.equal(held[k].float(), written[k].float())]
        if wrong:
            raise RuntimeError(f"peft loaded other values than the file holds for {wrong[:4]}")
    return model


def write_peft_export(
    directory: Path,
    base: GPT,
    adapter: dict[str, torch.Tensor],
    settings: LoraSettings,
    tokenizer=None,
    dtype: str = "float32",
    merged: GPT | None = None,
    base_model_name_or_path: str | None = None,
) -> dict:
    """directory/adapter (peft format) and directory/base (transformers), each checked against our models; figures about them.

    `base` is the float base GPT (changed in place into the LoRA reference); `adapter` our adapter
    tensors; `merged` the run's merged model, if given, for the figure of how far base + adapter is from it
    (a QLoRA run's quantisation gap; rounding otherwise). Meant for write_dir_atomically's fill: a failed
    check raises before the folder is swapped in.
    """
    directory = Path(directory)
    hf_base, base_figures = checked_transformers(base, tokenizer)  # float32, its own copy of the weights
    written = save_adapter(directory / ADAPTER_DIR, adapter, base.config, settings, dtype, base_model_name_or_path)
    # The reference holds the file's adapter values (rounded to dtype like the file), so the check is exact for any dtype.
    rounded = {k: v.to(DTYPES[dtype]).float() for k, v in adapter.items()}
    reference = lora_reference(base, rounded, settings)
    peft_model = load_peft(hf_base, directory / ADAPTER_DIR, written)
    diff, scale = max_logit_difference(reference, peft_model)
    if diff > 1e-4 * max(1.0, scale):
        raise RuntimeError(f"the peft adapter on the exported base disagrees with our LoRA model: max logit difference {diff:.3g} on logits up to {scale:.3g}")
    figures = {"check/base_max_abs_logit_diff": base_figures["check/max_abs_logit_diff"], "check/adapter_max_abs_logit_diff": diff}
    if merged is not None:
        figures["check/adapter_vs_merged_max_abs_logit_diff"] = max_logit_difference(merged, peft_model)[0]
    # unload: the transformers base back without the LoRA layers and unmerged, as it was written into the check.
    save_transformers(peft_model.unload(), tokenizer, directory / BASE_DIR, dtype)
    figures["adapter/tensors"] = len(written)
    return figures
