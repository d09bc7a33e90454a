"""The composed config, checked before any work: each bad value is named with what the key allows.

The entry point calls `check_config` right after Hydra composes the command line, so that
`ppo.temperature=0` fails at once, not after the models are loaded and the first rollouts sampled,
and a recipe fails before it starts its first stage. One table serves every stage: a rule applies
where the composed config has its key (the recipe's config holds the keys of all its stages).
What needs the data or a parent model (a prompt longer than the model's context, a checkpoint of
another architecture) is checked where those are read.

    ppo.temperature=0: must be > 0 (rollouts sample at this temperature and their log-probs are taken under it)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.errors import UserError
from pipeline.tokenizer import BYTE_ALPHABET_SIZE, MIN_VOCAB_SIZE, SPECIAL_TOKENS

_ABSENT = object()


def shown(value: Any) -> str:
    """A value as the user would type it on the command line."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return value if value.strip() else repr(value)
    return str(value)


def _is_number(value: Any, integer: bool = False) -> bool:
    return not isinstance(value, bool) and isinstance(value, int if integer else (int, float))


@dataclass(frozen=True)
class Number:
    """A number within bounds (None: unbounded), or one of a few special values (-1: no limit, None: unset)."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False  # low itself is excluded
    high_open: bool = False
    integer: bool = False
    special: tuple = ()

    def bounds(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{shown(self.low)}, {shown(self.high)}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {shown(self.low)}"
        return f"{'<' if self.high_open else '<='} {shown(self.high)}"

    def problem(self, value: Any) -> str | None:
        if any(value is s or (type(value) is type(s) and value == s) for s in self.special):
            return None
        others = "".join(f"{shown(s)} or " for s in self.special)
        if not _is_number(value, self.integer) or not math.isfinite(value):
            return f"must be {others}{'an integer' if self.integer else 'a number'} {self.bounds()}"
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and (value >= self.high if self.high_open else value > self.high)
        return f"must be {others}{self.bounds()}" if too_low or too_high else None


@dataclass(frozen=True)
class OneOf:
    """One of a fixed set of values (compared with their types: true is not 1)."""

    values: tuple
    wording: str = ""  # how to list them, where shown() of each is not the clearest

    def problem(self, value: Any) -> str | None:
        if any(type(value) is type(v) and value == v for v in self.values):
            return None
        if self.wording:
            return f"must be {self.wording}"
        return f"must be one of {', '.join(shown(v) for v in self.values)}" if len(self.values) > 2 else f"must be {' or '.join(shown(v) for v in self.values)}"


@dataclass(frozen=True)
class Satisfies:
    """Anything a predicate decides; `wording` says what is allowed."""

    ok: Callable[[Any], bool]
    wording: str

    def problem(self, value: Any) -> str | None:
        try:
            return None if self.ok(value) else f"must be {self.wording}"
        except (TypeError, ValueError):
            return f"must be {self.wording}"


BOOL = OneOf((True, False))
POSITIVE = Number(low=0, low_open=True)
NON_NEGATIVE = Number(low=0)
COUNT = Number(low=1, integer=True)  # something there must be at least one of
SIZE = Number(low=0, integer=True)  # 0 allowed: none of them
PROBABILITY = Number(low=0, high=1)
STEPS = Number(low=1, integer=True, special=(-1,))  # -1: no limit


def _existing_path(value: Any) -> bool:
    return value is None or Path(str(value)).expanduser().exists()


def _data_path(value: Any) -> bool:
    """A local path must exist; anything else may be a hub dataset name."""
    from pipeline.data.loading import looks_like_path

    return value is None or Path(str(value)).expanduser().exists() or not looks_like_path(str(value))


def _betas(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_number(b) and 0 <= b < 1 for b in value)


def _columns(value: Any) -> bool:
    return value is None or (isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()))


def _precisions() -> tuple:
    """What Lightning's Trainer takes as precision (its own list where this Lightning version exposes it)."""
    import typing

    try:
        from lightning.fabric.connector import _PRECISION_INPUT
    except ImportError:
        return ()
    values: list = []
    for part in typing.get_args(_PRECISION_INPUT):  # Literal[64, 32, 16] | Literal["32-true", ...] | ...
        values += [v for v in typing.get_args(part) or [part] if str(v) not in map(str, values)]
    return tuple(values)


def _registered(kind: str) -> tuple:
    """Lightning's registered accelerators or strategies by name ('auto' and 'gpu' are understood besides)."""
    from lightning.pytorch.accelerators import AcceleratorRegistry
    from lightning.pytorch.strategies import StrategyRegistry

    names = AcceleratorRegistry.available_accelerators() if kind == "accelerator" else StrategyRegistry.available_strategies()
    return ("auto", "gpu", *sorted(names)) if kind == "accelerator" else ("auto", *sorted(names))


def _devices(value: Any) -> bool:
    if _is_number(value, integer=True):
        return value >= 1 or value == -1
    return value == "auto" or isinstance(value, (str, list))  # "0,1" or [0, 1]: Lightning parses device ids


def _val_check_interval(value: Any) -> bool:
    return _is_number(value, integer=True) and value >= 1 or isinstance(value, float) and 0 < value <= 1


def _limit_batches(value: Any) -> bool:
    return _is_number(value, integer=True) and value >= 0 or isinstance(value, float) and 0 <= value <= 1


def _reward_spec(value: Any) -> bool:
    """grpo.reward: one name or a non-empty list of names (pipeline/rewards.py parses and imports them)."""
    names = [value] if isinstance(value, str) else value
    return isinstance(names, (list, tuple)) and bool(names) and all(isinstance(n, str) and n.strip() for n in names)


def _reward_weights(value: Any) -> bool:
    return value is None or isinstance(value, (list, tuple)) and all(_is_number(w) and math.isfinite(w) for w in value)


BATCH_SIZES = Satisfies(lambda v: isinstance(v, (list, ListConfig)) and len(v) > 0 and all(_is_number(b, integer=True) and b >= 1 for b in v), "a non-empty list of integers >= 1")
def _prune_targets(value: Any) -> bool:
    from pipeline.model.prune import TARGETS

    if not isinstance(value, dict) or not value or set(value) - set(TARGETS):
        return False
    shares = [0 if v is None else v for v in value.values()]
    return all(_is_number(v) and 0 <= v < math.inf for v in shares) and any(v > 0 for v in shares)


SAMPLING_FILTERS = "rollout log-probs would not be those of the sampling distribution: PPO samples from the whole softmax at ppo.temperature"

# key -> (rule, why). Keys of the generate stage stand at the top level of its config (temperature=0.7).
RULES: dict[str, tuple[Any, str]] = {
    "seed": (Number(low=0, high=2**32 - 1, integer=True), ""),
    "rerun": (BOOL, ""),
    "objective_direction": (OneOf(("maximize", "minimize")), "how a sweep's trials are ranked by the objective"),
    "init_from": (Satisfies(_existing_path, "an existing run directory, model.pt, Lightning .ckpt or transformers folder"), "no such file or directory"),
    "reward_from": (Satisfies(_existing_path, "an existing reward run directory, model.pt or Lightning .ckpt"), "no such file or directory"),
    "ckpt_path": (Satisfies(_existing_path, "an existing Lightning checkpoint"), "no such file"),
    # model: the architecture (pipeline.model.GPTConfig) of the stages that build a model from it
    "model.block_size": (COUNT, "tokens of context"),
    "model.n_layer": (COUNT, ""),
    "model.n_head": (COUNT, ""),
    "model.n_kv_head": (Number(low=1, integer=True, special=(None,)), "null: as many as n_head"),
    "model.n_embd": (COUNT, ""),
    "model.mlp_ratio": (POSITIVE, ""),
    "model.dropout": (Number(low=0, high=1, high_open=True), ""),
    "model.bias": (BOOL, ""),
    "model.pos_emb": (OneOf(("rope", "learned")), ""),
    "model.norm": (OneOf(("rmsnorm", "layernorm")), ""),
    "model.mlp": (OneOf(("swiglu", "gelu")), ""),
    "model.rope_theta": (POSITIVE, ""),
    "model.tie_embeddings": (BOOL, ""),
    "model.compile": (BOOL, ""),
    "model.activation_checkpointing": (BOOL, ""),
    "tokenizer.vocab_size": (Number(low=MIN_VOCAB_SIZE, integer=True), f"a byte-level BPE holds {BYTE_ALPHABET_SIZE} bytes and {len(SPECIAL_TOKENS)} special tokens"),
    "tokenizer.path": (Satisfies(_existing_path, "an existing tokenizer.json or tokenizer folder"), "no such file or directory"),
    # data
    "data.path": (Satisfies(_data_path, "an existing file or folder, or a hub dataset name"), "no such file or directory"),
    "data.columns": (Satisfies(_columns, "null or a mapping of the data's column names to TRL's, e.g. {question: prompt}"), ""),
    "data.val_fraction": (Number(low=0, high=1, low_open=True, high_open=True), "the share of train held out when the data has no validation split"),
    "data.seq_len": (COUNT, ""),
    "data.batch_size": (COUNT, ""),
    "data.num_workers": (SIZE, ""),
    "data.num_proc": (COUNT, ""),
    "data.group_by_length": (BOOL, ""),
    "data.share_prompts": (BOOL, ""),
    "data.packing": (BOOL, ""),
    # optim
    "optim.lr": (POSITIVE, ""),
    "optim.weight_decay": (NON_NEGATIVE, ""),
    "optim.betas": (Satisfies(_betas, "two numbers in [0, 1), e.g. [0.9,0.95]"), ""),
    "optim.warmup_steps": (SIZE, ""),
    "optim.min_lr_ratio": (PROBABILITY, "the final learning rate as a fraction of optim.lr"),
    "optim.matrices": (OneOf(("adamw", "muon")), "the optimiser of the blocks' weight matrices"),
    "optim.muon_momentum": (PROBABILITY, "Muon's momentum"),
    # trainer (Lightning's Trainer arguments)
    "trainer.max_steps": (STEPS, ""),
    "trainer.max_epochs": (Number(low=1, integer=True, special=(-1, None)), ""),
    "trainer.val_check_interval": (Satisfies(_val_check_interval, "an integer >= 1 (batches) or a number in (0, 1] (a fraction of an epoch)"), ""),
    "trainer.check_val_every_n_epoch": (Number(low=1, integer=True, special=(None,)), ""),
    "trainer.limit_val_batches": (Satisfies(_limit_batches, "an integer >= 0 (batches) or a number in [0, 1] (a fraction)"), ""),
    "trainer.accumulate_grad_batches": (COUNT, ""),
    "trainer.gradient_clip_val": (Number(low=0, special=(None,)), ""),
    "trainer.log_every_n_steps": (COUNT, ""),
    "trainer.num_sanity_val_steps": (Number(low=0, integer=True, special=(-1,)), ""),
    "trainer.num_nodes": (COUNT, ""),
    "trainer.devices": (Satisfies(_devices, "an integer >= 1, -1 (all), auto, or device ids"), ""),
    "trainer.enable_progress_bar": (BOOL, ""),
    "logger.name": (OneOf(("wandb", "csv")), ""),
    "logger.log_model": (BOOL, ""),
    "samples.every_n_val": (COUNT, ""),
    "samples.num_prompts": (SIZE, ""),
    "samples.max_new_tokens": (COUNT, ""),
    # sft
    "sft.loss_on": (OneOf(("completion", "all")), "the tokens the loss covers"),
    "eval.gold": (OneOf(("auto", True, False), "auto, true or false"), ""),
    "eval.num_prompts": (SIZE, ""),
    "eval.max_new_tokens": (COUNT, ""),
    "eval.batch_size": (COUNT, ""),
    # reward
    "reward.center_coef": (NON_NEGATIVE, ""),
    "reward.use_margin": (BOOL, ""),
    "reward.policy_pairs": (SIZE, ""),
    "reward.policy_pairs_test": (SIZE, ""),
    "reward.policy_temperature": (POSITIVE, "two samples of a prompt at temperature 0 are the same answer, never a pair"),
    "reward.policy_max_new_tokens": (COUNT, ""),
    # ppo
    "ppo.iterations": (COUNT, ""),
    "ppo.rollout_batch_size": (COUNT, "prompts per rollout, per process"),
    "ppo.minibatch_size": (COUNT, ""),
    "ppo.ppo_epochs": (COUNT, ""),
    "ppo.clip_ratio": (POSITIVE, ""),
    "ppo.value_clip": (POSITIVE, ""),
    "ppo.vf_coef": (NON_NEGATIVE, ""),
    "ppo.gamma": (PROBABILITY, "the discount"),
    "ppo.lam": (PROBABILITY, "GAE's lambda"),
    "ppo.kl_coef": (NON_NEGATIVE, ""),
    "ppo.kl_estimator": (OneOf(("k1", "k2", "k3")), "the per-token KL estimate, pipeline/losses/ppo.py: k1 log r, k2 (log r)^2 / 2, k3 (1/r - 1) + log r"),
    "ppo.adaptive_kl": (BOOL, ""),
    "ppo.target_kl": (POSITIVE, "nats per response"),
    "ppo.horizon": (POSITIVE, ""),
    "ppo.whiten_rewards": (BOOL, ""),
    "ppo.scale_reward_by_std": (BOOL, ""),
    "ppo.missing_eos_penalty": (NON_NEGATIVE, "subtracted from the score of a response that never ends"),
    "ppo.temperature": (POSITIVE, "rollouts sample at this temperature and their log-probs are taken under it"),
    "ppo.top_k": (OneOf((0,)), SAMPLING_FILTERS),
    "ppo.top_p": (OneOf((1, 1.0), "1"), SAMPLING_FILTERS),
    "ppo.max_new_tokens": (COUNT, ""),
    "ppo.entropy_coef": (NON_NEGATIVE, ""),
    "ppo.ptx_coef": (NON_NEGATIVE, ""),
    "ppo.ptx_data": (Satisfies(_data_path, "null, an existing file or folder, or a hub dataset name"), "no such file or directory"),
    "ppo.ptx_batch_size": (COUNT, ""),
    "ppo.ptx_seq_len": (COUNT, ""),
    "ppo.max_grad_norm": (POSITIVE, ""),
    "ppo.critic_lr": (POSITIVE, ""),
    "ppo.critic_head": (OneOf(("zero", "reward")), "zero: a fresh value head; reward: the reward model's"),
    "ppo.critic_warmup": (SIZE, ""),
    "ppo.anneal_lr": (BOOL, ""),
    "ppo.ema_decay": (Number(low=0, high=1, high_open=True), "0: no moving average"),
    "ppo.share_base": (OneOf(("auto", True, False), "auto, true or false"), "peft=lora: the critic and the reward model as adapters on the policy's base"),
    "ppo.eval_every": (COUNT, "iterations between evaluations"),
    "ppo.eval_prompts": (COUNT, ""),
    "ppo.save_every": (COUNT, "iterations between checkpoints"),
    "ppo.warn_ratio": (POSITIVE, ""),
    "ppo.warn_approxkl": (POSITIVE, ""),
    # dpo
    "dpo.beta": (POSITIVE, "the implicit reward is beta * (log pi - log ref); IPO's target margin is 1 / (2 beta)"),
    "dpo.loss_type": (OneOf(("sigmoid", "ipo")), "the losses of pipeline/losses/dpo.py"),
    "dpo.label_smoothing": (Number(low=0, high=0.5, high_open=True), "conservative DPO: the assumed chance that a label is flipped; at 0.5 a pair says nothing"),
    "dpo.sft_coef": (NON_NEGATIVE, "the weight of the chosen answers' NLL"),
    "dpo.reference": (OneOf(("precompute", "online")), "precompute: the reference scores every pair once before training; online: in every step"),
    "dpo.train_pairs": (Number(low=1, integer=True, special=(None,)), "null: every training pair"),
    # (end of dpo)
    # distill (pipeline/stages/distill.py, pipeline/distillation.py)
    "teacher_from": (Satisfies(_existing_path, "an existing run directory, model.pt, Lightning .ckpt or transformers folder"), "no such file or directory"),
    "distill.lmbda": (PROBABILITY, "the share of batches whose answers the student samples itself"),
    "distill.beta": (PROBABILITY, "0: forward KL(teacher || student); 1: reverse KL(student || teacher); between: the generalised JSD"),
    "distill.temperature": (POSITIVE, "both models' logits are divided by it"),
    "distill.nll_weight": (NON_NEGATIVE, "the weight of the student's next-token loss on the answers"),
    "distill.max_new_tokens": (COUNT, ""),
    "distill.teacher_temperature": (NON_NEGATIVE, "0: the teacher's answers are greedy"),
    "distill.sampling_temperature": (NON_NEGATIVE, "0: the student's on-policy answers are greedy"),
    "distill.train_prompts": (Number(low=1, integer=True, special=(None,)), "null: every training prompt"),
    "distill.val_prompts": (COUNT, "held-out prompts for val/loss"),
    "distill.batch_size": (COUNT, "prompts per step, per process"),
    "distill.generate_batch_size": (COUNT, "prompts the teacher answers together"),
    "distill.student_init": (OneOf(("auto", "teacher", "fresh")), "teacher: the teacher pruned to the student's shape; fresh: random weights; auto: teacher where the shapes allow"),
    "distill.calibration_prompts": (COUNT, "prompts (with the teacher's answers) that choose what the pruned teacher keeps"),
    "distill.bench.batch_sizes": (BATCH_SIZES, "the batch sizes tokens/s is measured at"),
    "distill.bench.new_tokens": (COUNT, "generated per prompt in each timed call"),
    "distill.bench.warmup": (SIZE, "untimed calls per model and batch size"),
    "distill.bench.repeats": (COUNT, "timed calls per model and batch size"),
    # (end of distill)
    # grpo (pipeline/stages/grpo.py); whether grpo.reward's functions import is checked at the stage's start
    "grpo.iterations": (COUNT, ""),
    "grpo.prompts_per_rollout": (COUNT, "prompts per rollout, per process"),
    "grpo.group_size": (Number(low=2, integer=True), "samples per prompt: each is judged against the others, so a group needs two"),
    "grpo.baseline": (OneOf(("group_norm", "mean", "rloo")), "group_norm: GRPO; mean: Dr. GRPO; rloo: RLOO"),
    "grpo.updates_per_rollout": (COUNT, "passes over each rollout"),
    "grpo.minibatch_size": (COUNT, "prompts (whole groups) per gradient step"),
    "grpo.clip_ratio": (Number(low=0, high=1, low_open=True, high_open=True), "the policy ratio is kept within [1 - clip_ratio, 1 + clip_ratio_high]"),
    "grpo.clip_ratio_high": (Number(low=0, low_open=True, special=(None,)), "null: clip_ratio"),
    "grpo.kl_coef": (NON_NEGATIVE, "0: no KL to the reference"),
    "grpo.kl_in": (OneOf(("loss", "reward")), "loss: k3 in the loss (GRPO); reward: subtracted from the reward (PPO, RLOO)"),
    "grpo.kl_estimator": (OneOf(("k1", "k2", "k3")), "the per-token KL summed into the reward with grpo.kl_in=reward"),
    "grpo.loss_norm": (OneOf(("token", "sequence")), "token: every token weighs the same; sequence: each response's mean, then their mean"),
    "grpo.reward": (Satisfies(_reward_spec, "rm, gold, package.module:function or path/to/file.py:function, or a non-empty list of them"), ""),
    "grpo.reward_weights": (Satisfies(_reward_weights, "null or a list of numbers, one per grpo.reward entry"), ""),
    "grpo.scale_reward_by_std": (BOOL, ""),
    "grpo.missing_eos_penalty": (NON_NEGATIVE, "subtracted from the reward of a response that never ends"),
    "grpo.temperature": (POSITIVE, "rollouts sample at this temperature and their log-probs are taken under it"),
    "grpo.max_new_tokens": (COUNT, ""),
    "grpo.max_grad_norm": (POSITIVE, ""),
    "grpo.anneal_lr": (BOOL, ""),
    "grpo.eval_every": (COUNT, "iterations between evaluations"),
    "grpo.eval_prompts": (COUNT, ""),
    "grpo.save_every": (COUNT, "iterations between checkpoints"),
    # (end of grpo)
    # peft (conf/peft/)
    "peft.method": (OneOf(("none", "lora", "qlora")), "none: full finetuning; lora: adapters; qlora: adapters on a 4-bit base"),
    "peft.r": (COUNT, "the rank of each adapter"),
    "peft.alpha": (POSITIVE, "the adapter's update is scaled by alpha / r"),
    "peft.dropout": (Number(low=0, high=1, high_open=True), "dropout on the adapters' input"),
    "peft.target_modules": (
        Satisfies(lambda v: isinstance(v, (list, ListConfig)) and len(v) > 0 and all(t in ("q_proj", "kv_proj", "out_proj", "up_proj", "down_proj") for t in v), "a non-empty list of q_proj, kv_proj, out_proj, up_proj, down_proj"),
        "the projections of every block that get adapters",
    ),
    # generate
    "prompt": (Satisfies(lambda v: v is None or isinstance(v, (str, int, float)), "text"), ""),
    "prompts_file": (Satisfies(_existing_path, "an existing .txt or .jsonl file"), "no such file"),
    "chat": (OneOf(("auto", True, False), "auto, true or false"), ""),
    "max_new_tokens": (COUNT, ""),
    "temperature": (NON_NEGATIVE, "0 is greedy"),
    "top_k": (SIZE, "0: no top-k filtering"),
    "top_p": (Number(low=0, high=1, low_open=True), "1: no nucleus filtering"),
    "batch_size": (COUNT, "prompts answered together"),
    # export
    "export.dtype": (OneOf(("float32", "bfloat16", "float16")), ""),
    # quantize (pipeline/stages/quantize.py, pipeline/model/quant.py)
    "quantize.method": (OneOf(("int8", "int4")), "int8: int8 weights and activations; int4: int4 weights only"),
    "quantize.group_size": (OneOf((32, 64, 128)), "int4: inputs per scale and zero point, the sizes the CPU int4 kernel takes"),
    "quantize.dtype": (OneOf(("auto", "float32", "bfloat16")), "the activations and the unquantised weights; auto: float32 for int8, bfloat16 for int4"),
    "quantize.bench.batch_sizes": (BATCH_SIZES, "the batch sizes tokens/s is measured at"),
    "quantize.bench.new_tokens": (COUNT, "generated per prompt in each timed call"),
    "quantize.bench.warmup": (SIZE, "untimed calls per model and batch size"),
    "quantize.bench.repeats": (COUNT, "timed calls per model and batch size"),
    # (end of quantize)
    # prune (pipeline/stages/prune.py, pipeline/model/prune.py); prune.recover.* are the distill section's rules, below RULES
    "prune.ratio": (Number(low=0, high=1, low_open=True), "the pruned model's share of the parameters"),
    "prune.method": (OneOf(("magnitude", "wanda")), "magnitude: weight norms; wanda: |W| x ||X|| on the calibration text"),
    "prune.targets": (Satisfies(_prune_targets, "a mapping of blocks, heads, channels to shares >= 0, at least one > 0, e.g. {heads: 0.25, channels: 0.75}"), "the shares of the removed parameters"),
    "prune.calibration.prompts": (COUNT, "calibration prompts"),
    "prune.calibration.max_new_tokens": (COUNT, "the source's answer after each calibration prompt"),
    "prune.calibration.batch_size": (COUNT, ""),
    "prune.recover.steps": (SIZE, "0: no recovery"),
    "prune.bench.batch_sizes": (BATCH_SIZES, "the batch sizes tokens/s is measured at"),
    "prune.bench.new_tokens": (COUNT, "generated per prompt in each timed call"),
    "prune.bench.warmup": (SIZE, "untimed calls per model and batch size"),
    "prune.bench.repeats": (COUNT, "timed calls per model and batch size"),
    # serve
    "serve.host": (Satisfies(lambda v: isinstance(v, str) and bool(v.strip()), "a host name or address"), "the address to listen on"),
    "serve.port": (Number(low=0, high=65535, integer=True), "0: any free port"),
    "serve.models": (Satisfies(lambda v: isinstance(v, (list, ListConfig)) and all(isinstance(m, str) and m.strip() for m in v), "a list of run directories or model files"), ""),
    "serve.api_key": (Satisfies(lambda v: v is None or (isinstance(v, (str, int)) and bool(str(v).strip())), "null or a non-empty key"), ""),
    "serve.max_batch_size": (COUNT, "sequences decoded together; 1 turns batching off"),
    "serve.batch_window_ms": (NON_NEGATIVE, ""),
    "serve.threads": (Number(low=1, integer=True, special=(None,)), "null: torch's default"),
    "serve.temperature": (Number(low=0, high=2), "the OpenAI range; 0 is greedy"),
    "serve.max_tokens": (COUNT, ""),
    "serve.shutdown_timeout_s": (NON_NEGATIVE, ""),
    # recipe=compare
    "compare.seeds": (COUNT, "runs of each method"),
    "compare.completions": (Number(low=1, integer=True, special=(None,)), "generated completions per online run; null: each method's own iterations"),
}

DISTILL_ONLY = ("distill.student_init", "distill.calibration_prompts")  # how a fresh student starts: not a recovery's keys
# stage=prune's recovery (prune.recover) is a distillation with the distill stage's keys: the same rules.
RULES.update({f"prune.recover.{key[len('distill.'):]}": rule for key, rule in list(RULES.items()) if key.startswith("distill.") and key not in DISTILL_ONLY and not key.startswith("distill.bench.")})

# Keys whose allowed values Lightning decides (read lazily: they need Lightning's registries).
LIGHTNING_CHOICES = {"trainer.precision": _precisions, "trainer.accelerator": lambda: _registered("accelerator"), "trainer.strategy": lambda: _registered("strategy")}


def _value(cfg: DictConfig, key: str) -> Any:
    """The resolved value at key, _ABSENT where the config has no such key."""
    value = OmegaConf.select(cfg, key, default=_ABSENT, throw_on_resolution_failure=True)
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _problems(cfg: DictConfig, stages: Iterable[str]) -> list[str]:
    problems = []
    values: dict[str, Any] = {}
    rules = {**RULES, **{key: (None, "") for key in LIGHTNING_CHOICES}}
    for key, (rule, why) in rules.items():
        try:
            value = _value(cfg, key)
        except OmegaConfBaseException as e:  # an interpolation to a missing key, a missing mandatory value
            problems.append(f"{key}: {str(e).strip().splitlines()[0]}")
            continue
        if value is _ABSENT:
            continue
        values[key] = value
        if rule is None:  # Lightning's: a plain string that Lightning does not know (a dict is a strategy object)
            allowed = LIGHTNING_CHOICES[key]()
            if allowed and not isinstance(value, dict) and value not in allowed and str(value) not in map(str, allowed):
                rule = OneOf(tuple(allowed))
            else:
                continue
        problem = rule.problem(value)
        if problem:
            problems.append(f"{key}={shown(value)}: {problem}" + (f" ({why})" if why else ""))
    if not problems:
        problems += _joint_problems(values, stages)
    return problems


def _joint_problems(values: dict[str, Any], stages: Iterable[str]) -> list[str]:
    """Rules over several keys, each of which passed on its own."""
    from pipeline.stages import STAGES

    problems = []
    block = values.get("model.block_size")
    seq_len = values.get("data.seq_len")
    if _is_number(block, integer=True) and _is_number(seq_len, integer=True) and seq_len > block > 0:
        problems.append(f"data.seq_len={seq_len}: must be at most model.block_size={block} (the model's context)")
    if values.get("prompt") is not None and values.get("prompts_file") is not None:
        problems.append("prompt and prompts_file are both set: give prompt=... or prompts_file=..., not both")
    per_rollout, minibatch = values.get("grpo.prompts_per_rollout"), values.get("grpo.minibatch_size")
    if _is_number(per_rollout, integer=True) and _is_number(minibatch, integer=True) and per_rollout % minibatch:
        problems.append(f"grpo.minibatch_size={minibatch}: must divide grpo.prompts_per_rollout={per_rollout} (every gradient step takes as many whole groups)")
    # Stages that build their model from cfg.model (pretrain) need an architecture GPTConfig accepts as a whole.
    if any(s in STAGES and STAGES[s].trains and not STAGES[s].starts_from for s in stages):
        from pipeline.model.gpt import GPTConfig

        arch = {k.split(".", 1)[1]: v for k, v in values.items() if k.startswith("model.") and k.split(".", 1)[1] in GPTConfig.__dataclass_fields__}
        try:
            GPTConfig(**{**arch, "vocab_size": 64})  # the vocabulary comes from the tokenizer later
        except (ValueError, TypeError) as e:
            problems.append(str(e))  # "model config: n_embd=100 must be divisible by n_head=3"
    return problems


def _with_overrides(cfg: DictConfig, overrides: list[str]) -> DictConfig:
    """cfg with Hydra command-line overrides applied (a recipe's per-stage overrides, which only its child composes)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    copy = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    for override in OverridesParser.create().parse_overrides(overrides):
        if not override.is_delete():
            OmegaConf.update(copy, override.key_or_group, override.value(), merge=True, force_add=True)
    return copy


def check_config(cfg: DictConfig) -> None:
    """Raise one UserError naming every bad value of the composed config (each as key=value: what is allowed)."""
    from pipeline.stages import RECIPE_RUNNER

    if cfg.stage != RECIPE_RUNNER:
        problems = _problems(cfg, [cfg.stage])
    else:
        stages = list(cfg.recipe.stages)
        problems = _problems(cfg, stages)
        for stage, own in (cfg.recipe.get("overrides") or {}).items():
            if own and stage in stages and not problems:
                try:
                    staged = _with_overrides(cfg, list(own))
                except Exception as e:  # Hydra's grammar refused it: the child would fail the same way
                    problems.append(f"recipe.overrides.{stage}={shown(list(own))}: {str(e).strip().splitlines()[0]}")
                    continue
                problems += [f"recipe.overrides.{stage}: {p}" for p in _problems(staged, [stage])]
    if problems:
        raise UserError("; ".join(problems))
