"""Our GPT <-> Hugging Face `transformers` models, both ways (the export stage is stages/export.py).

The backbone maps onto an existing architecture, so the exported folder loads with plain
`AutoModelForCausalLM.from_pretrained` (no custom code):

    pos_emb=learned, norm=layernorm, mlp=gelu  ->  GPT2LMHeadModel
    pos_emb=rope,    norm=rmsnorm,   mlp=swiglu ->  LlamaForCausalLM

The mapping between the two state dicts lives here only; `runs.load_model_payload` calls
`load_transformers` for a transformers folder, so every stage's init_from takes one. A LoRA run's
adapter in peft's format for these models is pipeline/model/peft_format.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from pipeline.errors import UserError
from pipeline.files import write_dir_atomically
from pipeline.model.gpt import GPT, GPTConfig, pad_vocab

# The architecture fields that decide which transformers model matches ours.
ARCHITECTURES = {
    "gpt2": {"pos_emb": "learned", "norm": "layernorm", "mlp": "gelu"},
    "llama": {"pos_emb": "rope", "norm": "rmsnorm", "mlp": "swiglu"},
}
HF_CLASS = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}
# GPT-2's GELU in transformers' names: both are the tanh approximation that our MLP uses.
GPT2_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")


def architecture_of(config: GPTConfig) -> str:
    """'gpt2' or 'llama'; a UserError naming the fields that have no transformers counterpart otherwise."""
    for name, wanted in ARCHITECTURES.items():
        if all(getattr(config, k) == v for k, v in wanted.items()):
            if name == "gpt2" and config.n_kv_head != config.n_head:
                raise UserError(
                    f"model config n_kv_head={config.n_kv_head} (grouped-query attention) has no GPT-2 counterpart: "
                    f"GPT-2 needs n_kv_head = n_head = {config.n_head}"
                )
            if name == "gpt2" and config.head_dim is not None:
                # GPT2Config derives the head width from n_embd / n_head; a model with pruned heads has narrower attention.
                raise UserError(
                    f"model config head_dim={config.head_dim} with n_head={config.n_head} and n_embd={config.n_embd} (attention narrower "
                    f"than the residual stream, as after pruning heads) has no GPT-2 counterpart: GPT-2 needs n_head * head_dim = n_embd"
                )
            return name
    wrong = {
        name: [f"{k}={getattr(config, k)}" for k, v in wanted.items() if getattr(config, k) != v] for name, wanted in ARCHITECTURES.items()
    }
    raise UserError(
        f"model config {', '.join(wrong['gpt2'] if len(wrong['gpt2']) <= len(wrong['llama']) else wrong['llama'])} has no transformers "
        f"counterpart: GPT-2 needs pos_emb=learned, norm=layernorm, mlp=gelu; Llama needs pos_emb=rope, norm=rmsnorm, mlp=swiglu"
    )


def hf_config(config: GPTConfig, tokenizer=None):
    """The transformers config of the architecture that computes exactly what our config does."""
    from transformers import GPT2Config, LlamaConfig

    arch = architecture_of(config)
    # The padded vocabulary stays: exported embeddings keep every row, so the shapes match ours.
    # Without a tokenizer no ids at all: GPT2Config's and LlamaConfig's defaults (50256; 1, 2) belong to other vocabularies.
    special = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if tokenizer is not None:
        special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=config.vocab_size,
            n_positions=config.block_size,
            n_embd=config.n_embd,
            n_layer=config.n_layer,
            n_head=config.n_head,
            n_inner=config.mlp_hidden,
            activation_function="gelu_new",
            resid_pdrop=config.dropout,
            embd_pdrop=config.dropout,
            attn_pdrop=config.dropout,
            layer_norm_epsilon=config.norm_eps,
            tie_word_embeddings=config.tie_embeddings,
            architectures=[HF_CLASS[arch]],
            **special,
        )
    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.n_embd,
        intermediate_size=config.mlp_hidden,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        num_key_value_heads=config.n_kv_head,
        head_dim=config.head_size,
        hidden_act="silu",
        max_position_embeddings=config.block_size,
        rms_norm_eps=config.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        attention_bias=config.bias,
        mlp_bias=config.bias,
        attention_dropout=config.dropout,
        tie_word_embeddings=config.tie_embeddings,
        architectures=[HF_CLASS[arch]],
        **special,
    )


def ours_to_hf_state(state: dict, config: GPTConfig) -> dict:
    """Our state dict -> the transformers model's, for the architecture of config."""
    arch = architecture_of(config)
    C, kv = config.n_embd, config.n_kv_head * config.head_size
    out = {}

    def bias(key: str, size: int) -> torch.Tensor:
        # GPT-2 always has biases; ours may not: zeros compute the same thing.
        return state[key] if key in state else torch.zeros(size, dtype=state["wte.weight"].dtype)

    if arch == "gpt2":
        p = "transformer."
        out[p + "wte.weight"] = state["wte.weight"]
        out[p + "wpe.weight"] = state["wpe.weight"]
        for i in range(config.n_layer):
            b, h = f"blocks.{i}.", f"{p}h.{i}."
            for ours, theirs in (("norm_1", "ln_1"), ("norm_2", "ln_2")):
                out[f"{h}{theirs}.weight"] = state[f"{b}{ours}.weight"]
                out[f"{h}{theirs}.bias"] = bias(f"{b}{ours}.bias", C)
            # Conv1D stores (in, out): the transpose of nn.Linear's weight. c_attn's outputs are q, k, v.
            out[f"{h}attn.c_attn.weight"] = torch.cat([state[f"{b}attn.q_proj.weight"], state[f"{b}attn.kv_proj.weight"]]).T
            out[f"{h}attn.c_attn.bias"] = torch.cat([bias(f"{b}attn.q_proj.bias", C), bias(f"{b}attn.kv_proj.bias", 2 * kv)])
            out[f"{h}attn.c_proj.weight"] = state[f"{b}attn.out_proj.weight"].T
            out[f"{h}attn.c_proj.bias"] = bias(f"{b}attn.out_proj.bias", C)
            out[f"{h}mlp.c_fc.weight"] = state[f"{b}mlp.up_proj.weight"].T
            out[f"{h}mlp.c_fc.bias"] = bias(f"{b}mlp.up_proj.bias", config.mlp_hidden)
            out[f"{h}mlp.c_proj.weight"] = state[f"{b}mlp.down_proj.weight"].T
            out[f"{h}mlp.c_proj.bias"] = bias(f"{b}mlp.down_proj.bias", C)
        out[p + "ln_f.weight"] = state["norm_f.weight"]
        out[p + "ln_f.bias"] = bias("norm_f.bias", C)
    else:
        p = "model."
        out[p + "embed_tokens.weight"] = state["wte.weight"]
        for i in range(config.n_layer):
            b, h = f"blocks.{i}.", f"{p}layers.{i}."
            out[f"{h}input_layernorm.weight"] = state[f"{b}norm_1.weight"]
            out[f"{h}post_attention_layernorm.weight"] = state[f"{b}norm_2.weight"]
            for kind in ("weight", "bias") if config.bias else ("weight",):
                out[f"{h}self_attn.q_proj.{kind}"] = state[f"{b}attn.q_proj.{kind}"]
                # kv_proj's outputs are all keys, then all values (see CausalSelfAttention.forward).
                out[f"{h}self_attn.k_proj.{kind}"], out[f"{h}self_attn.v_proj.{kind}"] = state[f"{b}attn.kv_proj.{kind}"].split(kv)
                out[f"{h}self_attn.o_proj.{kind}"] = state[f"{b}attn.out_proj.{kind}"]
                # up_proj's outputs are the gate half, then the up half (see MLP.forward).
                out[f"{h}mlp.gate_proj.{kind}"], out[f"{h}mlp.up_proj.{kind}"] = state[f"{b}mlp.up_proj.{kind}"].split(config.mlp_hidden)
                out[f"{h}mlp.down_proj.{kind}"] = state[f"{b}mlp.down_proj.{kind}"]
        out[p + "norm.weight"] = state["norm_f.weight"]
    out["lm_head.weight"] = state["lm_head.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def hf_to_ours_state(hf_state: dict, config: GPTConfig, arch: str) -> dict:
    """The transformers model's state dict -> ours (the inverse of ours_to_hf_state)."""
    C, kv = config.n_embd, config.n_kv_head * config.head_size
    out = {}
    if arch == "gpt2":
        p = "transformer."
        out["wte.weight"] = hf_state[p + "wte.weight"]
        out["wpe.weight"] = hf_state[p + "wpe.weight"]
        for i in range(config.n_layer):
            b, h = f"blocks.{i}.", f"{p}h.{i}."
            out[f"{b}norm_1.weight"], out[f"{b}norm_2.weight"] = hf_state[f"{h}ln_1.weight"], hf_state[f"{h}ln_2.weight"]
            q, k_v = hf_state[f"{h}attn.c_attn.weight"].T.split([C, 2 * kv])
            out[f"{b}attn.q_proj.weight"], out[f"{b}attn.kv_proj.weight"] = q, k_v
            out[f"{b}attn.out_proj.weight"] = hf_state[f"{h}attn.c_proj.weight"].T
            out[f"{b}mlp.up_proj.weight"] = hf_state[f"{h}mlp.c_fc.weight"].T
            out[f"{b}mlp.down_proj.weight"] = hf_state[f"{h}mlp.c_proj.weight"].T
            if config.bias:
                out[f"{b}norm_1.bias"], out[f"{b}norm_2.bias"] = hf_state[f"{h}ln_1.bias"], hf_state[f"{h}ln_2.bias"]
                out[f"{b}attn.q_proj.bias"], out[f"{b}attn.kv_proj.bias"] = hf_state[f"{h}attn.c_attn.bias"].split([C, 2 * kv])
                out[f"{b}attn.out_proj.bias"] = hf_state[f"{h}attn.c_proj.bias"]
                out[f"{b}mlp.up_proj.bias"] = hf_state[f"{h}mlp.c_fc.bias"]
                out[f"{b}mlp.down_proj.bias"] = hf_state[f"{h}mlp.c_proj.bias"]
        out["norm_f.weight"] = hf_state[p + "ln_f.weight"]
        if config.bias:
            out["norm_f.bias"] = hf_state[p + "ln_f.bias"]
    else:
        p = "model."
        out["wte.weight"] = hf_state[p + "embed_tokens.weight"]
        for i in range(config.n_layer):
            b, h = f"blocks.{i}.", f"{p}layers.{i}."
            out[f"{b}norm_1.weight"] = hf_state[f"{h}input_layernorm.weight"]
            out[f"{b}norm_2.weight"] = hf_state[f"{h}post_attention_layernorm.weight"]
            for kind in ("weight", "bias") if config.bias else ("weight",):
                out[f"{b}attn.q_proj.{kind}"] = hf_state[f"{h}self_attn.q_proj.{kind}"]
                out[f"{b}attn.kv_proj.{kind}"] = torch.cat([hf_state[f"{h}self_attn.k_proj.{kind}"], hf_state[f"{h}self_attn.v_proj.{kind}"]])
                out[f"{b}attn.out_proj.{kind}"] = hf_state[f"{h}self_attn.o_proj.{kind}"]
                out[f"{b}mlp.up_proj.{kind}"] = torch.cat([hf_state[f"{h}mlp.gate_proj.{kind}"], hf_state[f"{h}mlp.up_proj.{kind}"]])
                out[f"{b}mlp.down_proj.{kind}"] = hf_state[f"{h}mlp.down_proj.{kind}"]
        out["norm_f.weight"] = hf_state[p + "norm.weight"]
    out["lm_head.weight"] = hf_state["lm_head.weight"]
    return {k: v.contiguous() for k, v in out.items()}


def to_transformers(model: GPT, tokenizer=None):
    """A transformers causal LM (float32) that computes the same logits as our model."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_config(hf_config(model.config, tokenizer), dtype=torch.float32)
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    # strict: a key that the mapping misses is a bug here, not something to skip silently.
    hf.load_state_dict(ours_to_hf_state(state, model.config), strict=True)
    return hf.eval()


def mlp_fields(hidden: int, n_embd: int, mlp: str) -> dict:
    """mlp_ratio when one reproduces the width (our default 4 first, so round trips keep our config), else the explicit width."""
    natural = hidden / n_embd * (1.5 if mlp == "swiglu" else 1.0)
    for ratio in (4.0, natural):
        if GPTConfig(n_embd=n_embd, n_head=1, mlp=mlp, mlp_ratio=ratio).mlp_hidden == hidden:
            return {"mlp_ratio": ratio}
    return {"mlp_ratio": natural, "mlp_hidden_size": hidden}


def config_from_hf(hf_cfg, source: Path) -> tuple[GPTConfig, str]:
    """Our config for a transformers GPT-2 or Llama config; a UserError naming any field we cannot represent."""
    model_type = getattr(hf_cfg, "model_type", None)
    where = f"{source / 'config.json'}"

    def require(ok: bool, field: str, value, wanted: str) -> None:
        if not ok:
            raise UserError(f"{where}: {field}={value!r} has no counterpart in this pipeline's model ({wanted})")

    if model_type == "gpt2":
        require(hf_cfg.activation_function in GPT2_TANH_GELU, "activation_function", hf_cfg.activation_function, f"one of {GPT2_TANH_GELU}")
        require(hf_cfg.scale_attn_weights, "scale_attn_weights", hf_cfg.scale_attn_weights, "true")
        require(not hf_cfg.scale_attn_by_inverse_layer_idx, "scale_attn_by_inverse_layer_idx", hf_cfg.scale_attn_by_inverse_layer_idx, "false")
        hidden = hf_cfg.n_inner or 4 * hf_cfg.n_embd
        values = dict(
            vocab_size=hf_cfg.vocab_size,
            block_size=hf_cfg.n_positions,
            n_layer=hf_cfg.n_layer,
            n_head=hf_cfg.n_head,
            n_kv_head=hf_cfg.n_head,
            n_embd=hf_cfg.n_embd,
            bias=True,
            pos_emb="learned",
            norm="layernorm",
            mlp="gelu",
            tie_embeddings=bool(hf_cfg.tie_word_embeddings),
            norm_eps=hf_cfg.layer_norm_epsilon,
            **mlp_fields(hidden, hf_cfg.n_embd, "gelu"),
        )
    elif model_type == "llama":
        require(hf_cfg.hidden_act == "silu", "hidden_act", hf_cfg.hidden_act, "silu")
        rope = getattr(hf_cfg, "rope_parameters", None) or {"rope_type": "default", "rope_theta": getattr(hf_cfg, "rope_theta", 10000.0)}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        require(rope_type == "default", "rope_parameters.rope_type", rope_type, "default: no rope scaling")
        head_dim = getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // hf_cfg.num_attention_heads
        require(hf_cfg.attention_bias == hf_cfg.mlp_bias, "attention_bias", hf_cfg.attention_bias, f"equal to mlp_bias={hf_cfg.mlp_bias}")
        values = dict(
            vocab_size=hf_cfg.vocab_size,
            block_size=hf_cfg.max_position_embeddings,
            n_layer=hf_cfg.num_hidden_layers,
            n_head=hf_cfg.num_attention_heads,
            n_kv_head=hf_cfg.num_key_value_heads or hf_cfg.num_attention_heads,
            n_embd=hf_cfg.hidden_size,
            head_dim=head_dim,  # GPTConfig keeps it only where it differs from hidden_size / num_attention_heads
            bias=bool(hf_cfg.attention_bias),
            pos_emb="rope",
            norm="rmsnorm",
            mlp="swiglu",
            rope_theta=float(rope["rope_theta"]),
            tie_embeddings=bool(hf_cfg.tie_word_embeddings),
            norm_eps=hf_cfg.rms_norm_eps,
            **mlp_fields(hf_cfg.intermediate_size, hf_cfg.hidden_size, "swiglu"),
        )
    else:
        raise UserError(f"{where}: model_type={model_type!r} is not supported; this pipeline imports 'gpt2' and 'llama' models")
    try:
        return GPTConfig(**values), model_type
    except ValueError as e:
        raise UserError(f"{where}: {e}") from None


def one_line(error: Exception, limit: int = 300) -> str:
    """transformers' messages run over many lines; the entry point prints one."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def is_transformers_dir(path: Path) -> bool:
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def load_transformers(directory: Path) -> dict:
    """A transformers GPT-2 / Llama folder as one of our model payloads (config + state dict)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    try:
        hf_cfg = AutoConfig.from_pretrained(str(directory))
    except Exception as e:  # a malformed config.json: say which file
        raise UserError(f"cannot read {directory / 'config.json'}: {type(e).__name__}: {one_line(e)}") from None
    config, arch = config_from_hf(hf_cfg, directory)
    try:
        hf = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
    except Exception as e:  # no weights file, or weights that do not fit config.json
        raise UserError(f"cannot load the transformers weights in {directory} (model.safetensors or pytorch_model.bin): {type(e).__name__}: {one_line(e)}") from None
    state = hf_to_ours_state(hf.state_dict(), config, arch)
    if arch == "gpt2" and all(not v.any() for k, v in state.items() if k.endswith(".bias")):
        # All-zero biases (a bias=False model of ours, exported) are exactly no biases: keep the config ours.
        config = GPTConfig(**{**config.to_dict(), "bias": False})
        state = {k: v for k, v in state.items() if not k.endswith(".bias")}
    return {"config": config.to_dict(), "state_dict": state, "kind": "lm", "stage": "transformers", "extra": {"source": str(directory)}}


def grow_vocab(payload: dict, tokens: int) -> dict:
    """The payload with embedding (and untied output) rows for `tokens` tokens, rounded up by pad_vocab.

    New rows start at the mean of the old ones: the new tokens then get an average logit instead of a
    random one, and the model's outputs on the old tokens do not change.
    """
    config = GPTConfig.from_dict(payload["config"])
    size = pad_vocab(tokens)
    state = dict(payload["state_dict"])
    for key in ("wte.weight", "lm_head.weight"):
        old = state[key]
        state[key] = torch.cat([old, old.mean(dim=0, keepdim=True).expand(size - old.size(0), -1)])
    if config.tie_embeddings:  # one matrix under two names, as in our own state dicts
        state["lm_head.weight"] = state["wte.weight"]
    return {**payload, "config": {**payload["config"], "vocab_size": size}, "state_dict": state}


@torch.no_grad()
def max_logit_difference(model: GPT, hf_model, seq_len: int = 16) -> tuple[float, float]:
    """Largest |ours - transformers| logit on a fixed random batch, and the largest |logit|: the export checks itself."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, min(seq_len, model.config.block_size)), generator=g)
    was_training = model.training
    model.eval()
    ours = model.lm_head(model.hidden_states(ids))  # the language-model logits, of a ScalarGPT too
    model.train(was_training)
    theirs = hf_model(input_ids=ids).logits
    return (ours - theirs).abs().max().item(), ours.abs().max().item()


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise UserError(f"export.dtype={dtype!r}: choose one of {sorted(DTYPES)}")


def checked_transformers(model: GPT, tokenizer=None) -> tuple[object, dict]:
    """The float32 transformers model of ours, checked to give our logits; figures about it."""
    hf = to_transformers(model, tokenizer)
    diff, scale = max_logit_difference(model, hf)
    # float32 on both sides: only rounding differs, relative to the logits' size (large for a trained model).
    if diff > 1e-4 * max(1.0, scale):
        raise RuntimeError(f"exported model disagrees with ours: max logit difference {diff:.3g} on logits up to {scale:.3g}")
    return hf, {"architecture": HF_CLASS[architecture_of(model.config)], "check/max_abs_logit_diff": diff}


def save_transformers(hf, tokenizer, directory: Path, dtype: str = "float32") -> None:
    """hf (cast to dtype in place) and the tokenizer into directory; not atomic by itself (export is)."""
    check_dtype(dtype)
    hf.to(DTYPES[dtype]).save_pretrained(str(directory))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(directory))


def export(model: GPT, tokenizer, out_dir: Path, dtype: str = "float32", extra: Callable[[Path], dict] | None = None) -> dict:
    """Write model + tokenizer as a transformers folder, atomically; return figures about it.

    `extra(folder)` writes more into the folder before it is swapped in (a LoRA run's adapter/ and
    base/, pipeline/model/peft_format.py) and returns its figures; if it raises, nothing is swapped in.
    """
    check_dtype(dtype)
    hf, figures = checked_transformers(model, tokenizer)

    def fill(tmp: Path) -> None:
        save_transformers(hf, tokenizer, tmp, dtype)
        if extra is not None:
            figures.update(extra(tmp))

    write_dir_atomically(Path(out_dir), fill)
    return {**figures, "dtype": dtype}
