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
import warnings
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
        # bitsandbytes 0.50 repacks the weight in place for its AVX512-BF16 CPU kernel on the first eval-mode,
        # no-grad forward: that layout fails for layers narrower than a quantisation block (64), breaks
        # dequantize_4bit (merge_lora, base_digest) and differs between machines. The plain 4-bit path everywhere.
        q.support_avx512bf16_for_cpu = False
        # Params4bit quantises when it is moved to a device (.to below), on CPU as on CUDA.
        q.weight = bnb.nn.Params4bit(w.data, requires_grad=False, quant_type="nf4")
        if layer.bias is not None:
            q.bias = nn.Parameter(layer.bias.data, requires_grad=False)
        setattr(parent, attr, q.to(w.device))


def _peft_config(settings: LoraSettings) -> LoraConfig:
    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        # Anchored on the full module name: only the blocks' projections, whatever else is called *_proj.
        target_modules=rf"blocks\.\d+\.(attn|mlp)\.({'|'.join(settings.target_modules)})",
        bias="none",
    )  # no task_type: peft's causal-LM wrapper expects transformers' generation hooks


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
    try:
        inject_adapter_in_model(_peft_config(settings), model, adapter_name=ADAPTER)  # also freezes every non-adapter parameter
    finally:
        if settings.quantize == "nf4":
            del model.is_loaded_in_4bit
    if hasattr(model, "score_head"):
        model.score_head.requires_grad_(True)
    model.lora_settings = settings  # what runs.save_model writes beside the adapter
    return model


def adapter_names(model: nn.Module) -> list[str]:
    """The names of the adapters on the model's layers, the model's own ("default") first."""
    names = {name for _, layer in lora_layers(model) for name in layer.lora_A}
    return sorted(names, key=lambda n: (n != ADAPTER, n))


def _restore_flags(flags: list[tuple[nn.Parameter, bool]]) -> None:
    for p, flag in flags:
        p.requires_grad_(flag)


def add_adapter(model: GPT, name: str, settings: LoraSettings, trainable: bool) -> None:
    """Another named adapter on the same frozen base, beside the model's own ("default").

    PPO's critic and reward model are adapters of this kind on the actor's base: one base in memory
    for four models. The new adapter starts at zero (load_adapter_state_dict(..., adapter=name) fills
    it) and is used only inside `adapter_active(model, name)`: the model's forward stays "default"'s,
    and every other parameter keeps its requires_grad. peft makes the newest adapter the active one
    and toggles requires_grad as it does; both are put back here.
    """
    if not has_lora(model):
        raise ValueError("add_adapter: the model has no adapters of its own yet (apply_lora first)")
    if name == ADAPTER or name in adapter_names(model):
        raise ValueError(f"add_adapter: the model has an adapter named {name!r} already")
    own = getattr(model, "lora_settings", None)
    if own is not None and own.quantize != settings.quantize:
        raise ValueError(f"add_adapter: adapter {name!r} is for a {settings.quantize or 'float'} base; the model's base is {own.quantize or 'float'}")
    flags = [(p, p.requires_grad) for p in model.parameters()]
    if settings.quantize == "nf4":
        model.is_loaded_in_4bit = True  # see apply_lora: a layer not adapted yet must get peft's bnb LoRA layer
    try:
        with warnings.catch_warnings():  # "multiple adapters in the model": that is the point here
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            inject_adapter_in_model(_peft_config(settings), model, adapter_name=name)
    finally:
        if settings.quantize == "nf4":
            del model.is_loaded_in_4bit
    for _, layer in lora_layers(model):
        layer.set_adapter(ADAPTER)
    _restore_flags(flags)
    adapter_parameters(model, name)  # raises if no layer got the adapter
    for p in adapter_parameters(model, name):
        p.requires_grad_(trainable)


def adapter_parameters(model: nn.Module, name: str = ADAPTER) -> list[nn.Parameter]:
    """The parameters of one named adapter (its lora_A and lora_B of every layer), in module order."""
    found = [p for n, p in model.named_parameters() if ".lora_" in n and n.split(".")[-2] == name]
    if not found:
        raise ValueError(f"the model has no adapter named {name!r}; it has {adapter_names(model)}")
    return found


@contextlib.contextmanager
def adapter_active(model: nn.Module, name: str):
    """Inside the block the model computes its base plus adapter `name` alone; "default" again on exit.

    A layer that the adapter does not target computes its base. requires_grad flags are left as they
    were (peft's set_adapter would freeze every inactive adapter), so a critic's forward and the
    actor's can share one backward.
    """
    if name not in adapter_names(model):
        raise ValueError(f"adapter_active: the model has no adapter named {name!r}; it has {adapter_names(model)}")
    layers = [layer for _, layer in lora_layers(model)]
    before = [list(layer.active_adapters) for layer in layers]
    flags = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
    for layer in layers:
        layer.set_adapter(name)
    _restore_flags(flags)
    try:
        yield model
    finally:
        for layer, names in zip(layers, before):
            layer.set_adapter(names)
        _restore_flags(flags)


class AdapterHead(nn.Module):
    """A scalar model (PPO's critic or reward model) made of a LoRA backbone it shares and a head of its own.

    forward is the backbone's hidden states with adapter `adapter` active (None: every adapter off,
    the plain base) through `score_head`: (B, T), as a ScalarGPT gives. The backbone belongs to
    another module (it is kept outside this module's tree, as in AdaptersOff), so state_dict and .to()
    see it once; the trainable parameters are `parameters_to_train()`.
    """

    def __init__(self, backbone: GPT, adapter: str | None, head: nn.Linear):
        super().__init__()
        object.__setattr__(self, "backbone", backbone)  # not a submodule
        if adapter is not None and adapter not in adapter_names(backbone):
            raise ValueError(f"AdapterHead: the backbone has no adapter named {adapter!r}; it has {adapter_names(backbone)}")
        self.adapter = adapter
        self.score_head = head

    @property
    def config(self):
        return self.backbone.config

    def forward(self, idx, attention_mask=None) -> torch.Tensor:
        context = adapters_disabled(self.backbone) if self.adapter is None else adapter_active(self.backbone, self.adapter)
        with context:
            hidden = self.backbone.hidden_states(idx, attention_mask)
        return self.score_head(hidden).squeeze(-1)

    def parameters_to_train(self) -> list[nn.Parameter]:
        own = adapter_parameters(self.backbone, self.adapter) if self.adapter is not None else []
        return [p for p in [*own, *self.score_head.parameters()] if p.requires_grad]


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
                delta = 0.0 if layer.disable_adapters or ADAPTER not in layer.lora_A else layer.get_delta_weight(ADAPTER)
                state[key] = (_base_weight(base).float() + delta).to(dtype)
            else:
                state[key] = getattr(base, leaf).detach()
        else:
            state[key] = source[key]
    merged.load_state_dict(state, strict=True)
    merged.train(model.training)
    return merged


def _adapter_keys(model: nn.Module, adapter: str = ADAPTER) -> dict[str, str]:
    """{file key: model key} of one adapter's tensors (lora_A / lora_B of each layer), and for the
    model's own adapter a ScalarGPT's score_head. Files name every adapter "default"."""
    prefixes = tuple(f"{name}.lora_" for name, _ in lora_layers(model))
    keys = {}
    for k in model.state_dict():
        if k.startswith(prefixes) and k.split(".")[-2] == adapter:
            head, _, leaf = k.rpartition(f".{adapter}.")
            keys[f"{head}.{ADAPTER}.{leaf}"] = k
        elif adapter == ADAPTER and k.startswith("score_head."):
            keys[k] = k
    return keys


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the model's own adapter tensors (and score_head): all that training changed, a few KB to MB."""
    if not has_lora(model):
        raise ValueError("adapter_state_dict: the model has no adapters")
    state = model.state_dict()
    return {k: state[k].detach().clone() for k in _adapter_keys(model)}


@torch.no_grad()
def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor], adapter: str = ADAPTER) -> None:
    """Load adapter tensors saved by adapter_state_dict into the model's adapter `adapter`; strict.

    Into the model's own adapter the file's score_head goes too; into another one (a second adapter
    on a shared base, add_adapter) the lora tensors alone, the head being the caller's.
    """
    own = model.state_dict()
    expected = _adapter_keys(model, adapter)
    given = set(state) if adapter == ADAPTER else {k for k in state if not k.startswith("score_head.")}
    missing = sorted(set(expected) - given)
    unexpected = sorted(given - set(expected))
    if missing or unexpected:
        raise ValueError(f"load_adapter_state_dict: missing keys {missing}, unexpected keys {unexpected}")
    for key, target in expected.items():
        if tuple(state[key].shape) != tuple(own[target].shape):
            raise ValueError(f"load_adapter_state_dict: {key} has shape {tuple(state[key].shape)}, the model's is {tuple(own[target].shape)}")
        own[target].copy_(state[key])  # state_dict tensors share storage with the parameters


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
