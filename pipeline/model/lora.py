"""LoRA and QLoRA on our GPT: low-rank adapters on the projections, the base frozen (and optionally 4-bit).

HF `peft` does the LoRA math. `inject_adapter_in_model` swaps each target nn.Linear for a peft LoRA
layer in place, so the model stays a `GPT` / `ScalarGPT`: `.config`, `.blocks`, `new_kv_cache` and
`engine.generate` work unchanged. Adapter B starts at zero (peft's default), so a fresh LoRA model
computes exactly its base.

QLoRA (`quantize="nf4"`) first replaces the target layers with bitsandbytes `Linear4bit` (NF4, compute
in the weights' dtype); peft then puts its bnb LoRA layer on them. Only the adapted layers are
quantised; embeddings, norms, lm_head (tied to the embedding) and score_head stay as they are.

`adapters_disabled(model)` turns every adapter off for a block of code: the frozen base inside it is
the DPO/PPO/GRPO reference, with no second copy of the model. `merge_lora` returns a plain model of
the same class whose state_dict has exactly the keys of a fresh one (what hf.py and the checkpoints expect).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Iterator

import torch
import torch.nn as nn
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer

from pipeline.model.gpt import GPT

# The Linear layers of a block (gpt.py); kv_proj and up_proj are fused (k|v and gate|up), so one
# adapter covers both halves. lm_head is tied to the embedding and score_head is trained in full: neither is a target.
PROJECTIONS = ("q_proj", "kv_proj", "out_proj", "up_proj", "down_proj")
QUANTIZE = (None, "nf4")
ADAPTER = "default"  # peft's adapter name; we only ever have one


@dataclass
class LoraSettings:
    r: int = 8  # rank of the update B @ A
    alpha: float = 16.0  # the update is scaled by alpha / r, so changing r does not rescale the learning rate
    dropout: float = 0.0  # on the adapter's input only (the base path sees x unchanged)
    target_modules: tuple[str, ...] = PROJECTIONS  # which projections of every block get an adapter
    quantize: str | None = None  # None: float base; "nf4": QLoRA, the adapted base layers in 4-bit NF4

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)  # a list from a config file, a tuple here
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"lora: r={self.r!r} must be an integer >= 1")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(f"lora: alpha={self.alpha!r} must be > 0")
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"lora: dropout={self.dropout!r} must be in [0, 1)")
        unknown = [t for t in self.target_modules if t not in PROJECTIONS]
        if not self.target_modules or unknown:
            raise ValueError(f"lora: target_modules={list(self.target_modules)} must be a non-empty subset of {list(PROJECTIONS)}")
        if self.quantize not in QUANTIZE:
            raise ValueError(f"lora: quantize={self.quantize!r} must be one of {list(QUANTIZE)}")

    def to_dict(self) -> dict:
        return {**asdict(self), "target_modules": list(self.target_modules)}

    @classmethod
    def from_dict(cls, values: dict) -> "LoraSettings":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"lora: unknown keys {unknown}; known keys are {sorted(known)}")
        return cls(**values)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """(name, layer) of every peft LoRA layer in the model, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def has_lora(model: nn.Module) -> bool:
    return next(lora_layers(model), None) is not None


def _targets(model: GPT, settings: LoraSettings) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, layer) of every target Linear of every block."""
    found = []
    for block in model.blocks:
        for parent in (block.attn, block.mlp):
            for attr in settings.target_modules:
                layer = getattr(parent, attr, None)
                if isinstance(layer, nn.Linear):
                    found.append((parent, attr, layer))
    return found


def _quantize_nf4(model: GPT, settings: LoraSettings) -> None:
    """Replace the target Linear layers by bitsandbytes NF4 Linear4bit layers holding the same weights."""
    import bitsandbytes as bnb  # imported here: it is slow to import and only QLoRA needs it

    for parent, attr, layer in _targets(model, settings):
        w = layer.weight
        q = bnb.nn.Linear4bit(
            layer.in_features, layer.out_features, bias=layer.bias is not None,
            compute_dtype=w.dtype, quant_type="nf4", device="meta",
        )
        # Params4bit quantises when it is moved to a device (.to below), on CPU as on CUDA.
        q.weight = bnb.nn.Params4bit(w.data, requires_grad=False, quant_type="nf4")
        if layer.bias is not None:
            q.bias = nn.Parameter(layer.bias.data, requires_grad=False)
        setattr(parent, attr, q.to(w.device))


def apply_lora(model: GPT, settings: LoraSettings) -> GPT:
    """Put adapters on the target projections of a GPT or ScalarGPT, in place, and freeze everything else.

    Trainable afterwards: the adapters, and a ScalarGPT's score_head (a new head must learn in full).
    Returns the same object, still a GPT / ScalarGPT.
    """
    if has_lora(model):
        raise ValueError("apply_lora: the model already has adapters")
    if settings.quantize == "nf4":
        _quantize_nf4(model, settings)
        # peft chooses its bnb LoRA layer only when the model says it is loaded in 4 bit (tuners/lora/model.py);
        # otherwise it would wrap Linear4bit (a subclass of nn.Linear) as a plain Linear and merge wrongly.
        model.is_loaded_in_4bit = True
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        # Anchored on the full module name: only the blocks' projections, whatever else is called *_proj.
        target_modules=rf"blocks\.\d+\.(attn|mlp)\.({'|'.join(settings.target_modules)})",
        bias="none",
    )  # no task_type: peft's causal-LM wrapper expects transformers' generation hooks
    try:
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)  # also freezes every non-adapter parameter
    finally:
        if settings.quantize == "nf4":
            del model.is_loaded_in_4bit
    if hasattr(model, "score_head"):
        model.score_head.requires_grad_(True)
    model.lora_settings = settings  # what runs.save_model writes beside the adapter
    return model


PEFT_METHODS = ("none", "lora", "qlora")


def settings_from_config(peft: dict) -> LoraSettings | None:
    """LoraSettings from the `peft` config section (conf/peft/): None for full finetuning (method none)."""
    values = dict(peft)
    method = values.pop("method", "none")
    if method not in PEFT_METHODS:
        raise ValueError(f"peft.method={method!r} must be one of {list(PEFT_METHODS)}")
    if method == "none":
        return None
    return LoraSettings.from_dict({**values, "quantize": "nf4" if method == "qlora" else None})


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters an optimiser should get: those with requires_grad (adapters, score_head)."""
    return [p for p in model.parameters() if p.requires_grad]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """Inside the block the model computes exactly its base: every adapter off, restored on exit.

    A ScalarGPT's score_head is not an adapter and stays as trained. peft's enable_adapters also
    toggles the adapters' requires_grad, so the flags are saved and put back exactly as they were.
    """
    layers = [layer for _, layer in lora_layers(model)]
    if not layers:
        raise ValueError("adapters_disabled: the model has no adapters")
    was_disabled = [layer.disable_adapters for layer in layers]
    flags = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer, disabled in zip(layers, was_disabled):
            layer.enable_adapters(not disabled)
        for p, flag in flags:
            p.requires_grad_(flag)


class AdaptersOff(nn.Module):
    """A LoRA model's frozen base as a model of its own: every call runs with the adapters off.

    A view, not a copy (the online RL stages' reference): it holds no parameters and no state, and
    the LoRA model is kept outside the module tree, so neither state_dict nor .to() sees it twice.
    """

    def __init__(self, model: GPT):
        super().__init__()
        object.__setattr__(self, "lora_model", model)  # not a submodule

    @property
    def config(self):
        return self.lora_model.config

    def forward(self, *args, **kwargs):
        with adapters_disabled(self.lora_model):
            return self.lora_model(*args, **kwargs)


def _base_weight(base: nn.Linear) -> torch.Tensor:
    """The weight a base layer computes with: a 4-bit one dequantised to its compute dtype."""
    w = base.weight
    if type(w).__name__ == "Params4bit":
        import bitsandbytes as bnb

        return bnb.functional.dequantize_4bit(w.data, w.quant_state).to(base.compute_dtype)
    return w.detach()


@torch.no_grad()
def merge_lora(model: GPT) -> GPT:
    """A new plain model (same class and config) with W + (alpha/r) B @ A in each adapted layer.

    The LoRA model is left as it is (inside adapters_disabled the copy is its base). A 4-bit base is dequantised first, so the merged model is
    float and computes what the QLoRA model computes (up to rounding; tests/model/test_lora.py).
    """
    adapted = dict(lora_layers(model))
    if not adapted:
        raise ValueError("merge_lora: the model has no adapters")
    source = model.state_dict()
    dtype = model.wte.weight.dtype
    with torch.random.fork_rng(devices=[]):  # the throwaway init must not move the caller's random stream
        merged = type(model)(model.config).to(device=model.wte.weight.device, dtype=dtype)
    state = {}
    for key in merged.state_dict():
        module, _, leaf = key.rpartition(".")
        if module in adapted:
            layer = adapted[module]
            base = layer.get_base_layer()
            if leaf == "weight":
                # Inside adapters_disabled the model computes its base, and so does the merged copy.
                delta = 0.0 if layer.disable_adapters else layer.get_delta_weight(ADAPTER)
                state[key] = (_base_weight(base).float() + delta).to(dtype)
            else:
                state[key] = getattr(base, leaf).detach()
        else:
            state[key] = source[key]
    merged.load_state_dict(state, strict=True)
    merged.train(model.training)
    return merged


def _adapter_keys(model: nn.Module) -> list[str]:
    """state_dict keys of the adapters (lora_A / lora_B of each layer) and of a ScalarGPT's score_head."""
    prefixes = tuple(f"{name}.lora_" for name, _ in lora_layers(model))
    return [k for k in model.state_dict() if k.startswith(prefixes) or k.startswith("score_head.")]


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the adapter tensors (and score_head): all that training changed, a few KB to MB."""
    if not has_lora(model):
        raise ValueError("adapter_state_dict: the model has no adapters")
    state = model.state_dict()
    return {k: state[k].detach().clone() for k in _adapter_keys(model)}


@torch.no_grad()
def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load adapter tensors saved by adapter_state_dict into a model with the same adapters; strict."""
    own = model.state_dict()
    expected = _adapter_keys(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"load_adapter_state_dict: missing keys {missing}, unexpected keys {unexpected}")
    for key in expected:
        if tuple(state[key].shape) != tuple(own[key].shape):
            raise ValueError(f"load_adapter_state_dict: {key} has shape {tuple(state[key].shape)}, the model's is {tuple(own[key].shape)}")
        own[key].copy_(state[key])  # state_dict tensors share storage with the parameters


def base_digest(model: GPT) -> str:
    """sha256 of the frozen base: the config, then each base tensor's name, dtype, shape and bytes, in module order.

    Names are the plain model's (peft's `.base_layer` removed), so a LoRA model and its base give the
    same digest; adapters and score_head are left out, so training does not change it. A 4-bit base
    is hashed as the weights it computes with (dequantised): it differs from its float original's.
    """
    h = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    adapted = dict(lora_layers(model))
    for name, module in model.named_modules():
        if name in adapted or any(name.startswith(f"{a}.lora_") for a in adapted) or name.startswith("score_head"):
            continue  # an adapted layer is hashed through its base_layer; adapters and score_head are not the base
        plain = name.replace(".base_layer", "")
        tensors = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for leaf, t in tensors:
            if leaf in getattr(module, "_non_persistent_buffers_set", ()):
                continue  # the rotary tables follow from the config
            if leaf == "weight" and type(t).__name__ == "Params4bit":
                t = _base_weight(module)
            t = t.detach().contiguous().cpu()
            h.update(f"{plain}.{leaf}|{t.dtype}|{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
