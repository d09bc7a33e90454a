"""The catalogue of bad input: each row is a mistake a user can make, the command, and the words its message must contain.

Every row runs `python -m pipeline ARGS` and must end with exit code 2 and exactly one `error: ...`
line on stderr that holds the row's words (the file, row, column or key and what is wrong), with
no traceback anywhere, and with nothing already written changed. Rows marked xfail are the gaps
still open (Hydra's own refusals exit 1 before the pipeline's main runs); they fail loudly once closed.

Most rows run the command in this process (`run_cli`): runpy executes pipeline/__main__.py as
`__main__`, as `python -m pipeline` does, and Hydra reads sys.argv, so a row goes through the real
entry point, its config checks and its exit code without the seconds of imports of a fresh
interpreter. PROCESS_ROWS run as real subprocesses, to show the same at the process boundary.
VALUES gives every rule of pipeline/checks.py a bad value, checked on a composed config directly.

"Nothing already written is changed": every file under the outputs root and the row's input folder
is hashed before and after the command. Existing files must be identical and present. A refused
command may leave one new run directory, its own, holding only what Hydra writes before the stage
starts (.hydra/ and its log) and the record of the parents it was started from (parents.json).
paths.cache_dir links to one cache that the rows share (tokenizers trained once, a stand-in
embedded task) and is not compared: caches are derived from inputs and may grow.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import runpy
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

import pipeline.__main__  # noqa: F401  (registers the run_name resolver the config uses)
from helpers import ARCHS, REPO, tiny_model
from pipeline import CONF_DIR, runs
from pipeline.checks import LIGHTNING_CHOICES, RULES, check_config
from pipeline.data.corpus import embedded_task_dir, materialize
from pipeline.errors import UserError
from pipeline.files import write_json
from pipeline.model import GPT, GPTConfig, ScalarGPT
from pipeline.tokenizer import save_tokenizer

pytestmark = pytest.mark.timeout(120)  # a row that is not refused starts training: fail it rather than wait

PARENTS = ("pretrain", "sft", "reward")
# The finished runs a row's outputs root starts with: those of the stages before its own.
PARENTS_OF = {"pretrain": (), "sft": ("pretrain",), "reward": ("pretrain", "sft"), "ppo": PARENTS, "dpo": PARENTS, "grpo": PARENTS, "distill": PARENTS, "prune": PARENTS, "generate": PARENTS, "export": PARENTS, "serve": PARENTS}
BLOCK = 256  # the parents' context: room for the embedded task's prompts and ppo.max_new_tokens=40


def U(text):
    return [{"role": "user", "content": text}]


def A(text):
    return [{"role": "assistant", "content": text}]


# ---------------------------------------------------------------------------------------------
# Inputs: each maker writes one thing into the row's input folder


Maker = Callable[[Path, object], None]  # (input folder, tokenizer)


def file(name: str, content: str | bytes) -> Maker:
    def make(folder, tok):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8", "surrogateescape"))

    return make


def jsonl(name: str, rows: list, raw: str | None = None, at: int = 0) -> Maker:
    """Rows as JSON lines; `raw`, a line exactly as written, is put in at line index `at` (0-based).

    `raw` may carry bytes that are not UTF-8 as surrogate escapes ("\\udce9" is the byte 0xe9).
    """
    lines = [json.dumps(r) for r in rows]
    if raw is not None:
        lines.insert(at, raw)
    return file(name, "".join(line + "\n" for line in lines))


def parquet(name: str, columns: dict) -> Maker:
    def make(folder, tok):
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table(columns), folder / name)

    return make


def texts(n: int = 20) -> list[dict]:
    return [{"text": f"document {i} about birds and the trees they nest in"} for i in range(n)]


def pairs(n: int = 10) -> list[dict]:
    return [{"prompt": f"{i}+1=", "chosen": f"{i + 1}", "rejected": f"{i + 2}"} for i in range(n)]


def completions(n: int = 10) -> list[dict]:
    return [{"prompt": f"{i}+1=", "completion": f"{i + 1}"} for i in range(n)]


def lm(seed: int = 0, **arch) -> GPT:
    return tiny_model(seed, block_size=BLOCK, **arch)


def scalar(seed: int = 0) -> ScalarGPT:
    torch.manual_seed(seed)
    return ScalarGPT(lm(seed).config).eval()


def save_run(root: Path, stage: str, name: str, model: GPT, tok, kind: str = "lm", extra: dict | None = None, tokenizer: bool = True) -> Path:
    """A finished stage run as a stage leaves it: tokenizer/, model.pt, metrics.json."""
    run_dir = root / stage / name
    if tokenizer:
        save_tokenizer(tok, run_dir / runs.TOKENIZER_DIR)
    runs.save_model(run_dir / runs.MODEL_FILE, model, kind=kind, stage=stage, extra=extra)
    write_json(run_dir / runs.METRICS_FILE, {"stage": stage})
    return run_dir


def run(name: str, model: Callable[[], GPT] = lm, stage: str = "sft", kind: str = "lm", tokenizer: bool = True) -> Maker:
    """A finished run at <input folder>/<name>/<stage>/default; init_from={in}/<name>/<stage>/default."""
    return lambda folder, tok: save_run(folder / name, stage, "default", model(), tok, kind=kind, tokenizer=tokenizer)


def mangle(name: str, change: Callable[[Path], None]) -> Maker:
    """Change a file that an earlier maker of the row wrote."""
    return lambda folder, tok: change(folder / name)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def widen(path: Path) -> None:
    """A model.pt whose config says a wider model than its weights are."""
    payload = torch.load(path)
    torch.save({**payload, "config": {**payload["config"], "n_embd": 64}}, path)


def hf_folder(name: str, model_type: str | None = None, weights: bool = True, config_text: str | None = None) -> Maker:
    """A transformers folder exported from a tiny model; then its config.json changed or its weights removed."""

    def make(folder, tok):
        from pipeline.model.hf import export

        out = folder / name
        export(tiny_model(**ARCHS["llama-gqa"]), tok, out)
        if model_type is not None:
            config = json.loads((out / "config.json").read_text())
            (out / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
        if config_text is not None:
            (out / "config.json").write_text(config_text)
        if not weights:
            for weights_file in out.glob("*.safetensors"):
                weights_file.unlink()

    return make


def lightning_checkpoint(name: str, model_config: dict | None, loops: bool = True) -> Maker:
    """A checkpoint of the shape Lightning writes (plain types only), holding a model of the given architecture."""

    def make(folder, tok):
        payload = {"state_dict": {}, "hyper_parameters": {"model_config": model_config} if model_config else {"lr": 1e-3}, "epoch": 0, "global_step": 1}
        if loops:
            payload["loops"] = {}
        torch.save(payload, folder / name)

    return make


def newer_format(path: Path) -> None:
    torch.save({**torch.load(path, weights_only=True), "format": runs.FORMAT_VERSION + 1}, path)


NORMALISER = {"reward_mean": 0.0, "reward_std": 1.0}


def reward_run(name: str, other_tokenizer: bool = False, block_size: int = BLOCK, tokenizer: bool = True) -> Maker:
    """A finished reward run; with another tokenizer (trained on other text) or a shorter context than the parents'."""

    def make(folder, tok):
        from pydoc_data.topics import topics

        from pipeline.tokenizer import train_tokenizer

        if other_tokenizer:
            tok = train_tokenizer([topics[k] for k in sorted(topics)[-20:]], len(tok))
        torch.manual_seed(0)
        model = ScalarGPT(tiny_model(0, block_size=block_size).config).eval()
        save_run(folder / name, "reward", "default", model, tok, kind="scalar", extra=NORMALISER, tokenizer=tokenizer)

    return make


def scalar_checkpoint(name: str) -> Maker:
    """A Lightning checkpoint of the reward stage: the weights, but not the normaliser that model.pt carries."""

    def make(folder, tok):
        model = scalar()
        payload = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "hyper_parameters": {"model_config": model.config.to_dict(), "model_kind": "scalar"}, "loops": {}}
        torch.save(payload, folder / name)
        save_tokenizer(tok, folder / runs.TOKENIZER_DIR)

    return make


class Unpicklable:
    """A class in a pickle: what a weights-only load refuses."""


def unsafe_model(name: str) -> Maker:
    def make(folder, tok):
        save_tokenizer(tok, folder / name / runs.TOKENIZER_DIR)
        torch.save({"config": lm().config.to_dict(), "state_dict": {}, "kind": "lm", "hook": Unpicklable()}, folder / name / runs.MODEL_FILE)

    return make


# ---------------------------------------------------------------------------------------------
# The rows


@dataclass
class Row:
    what: str  # what is wrong: the test id
    argv: list[str]  # {in}: the row's input folder, {root}: the outputs root, {corpus}: a small text corpus
    words: list[str]  # the error line holds each (placeholders filled in)
    make: tuple[Maker, ...] = ()
    parents: tuple[str, ...] = PARENTS  # the finished runs the outputs root starts with (runs of PARENTS)
    xfail: str = ""

    @property
    def param(self):
        marks = [pytest.mark.xfail(reason=self.xfail, strict=True)] if self.xfail else []
        return pytest.param(self, id=self.what, marks=marks)


def rows(stage: str, *cases: tuple) -> list[Row]:
    """Rows of one stage: (what, overrides, words[, makers[, parents]]); parents default to the stage's PARENTS_OF."""
    return [
        Row(what=f"{stage}: {c[0]}", argv=[f"stage={stage}", *c[1]], words=c[2], make=tuple(c[3]) if len(c) > 3 else (), parents=c[4] if len(c) > 4 else PARENTS_OF[stage])
        for c in cases
    ]


LONG = "word " * 400

# Config values through the whole CLI; VALUES below checks every other rule of pipeline/checks.py in milliseconds.
CONFIG = [
    *rows(
        "pretrain",
        ("max_steps 0", ["trainer.max_steps=0"], ["trainer.max_steps=0: must be -1 or >= 1"]),
        ("unknown precision", ["trainer.precision=fp8"], ["trainer.precision=fp8: must be one of", "bf16-mixed"]),
        ("batch_size not a number", ["data.batch_size=many"], ["data.batch_size=many: must be an integer >= 1"]),
        ("seq_len longer than the context", ["data.seq_len=512"], ["data.seq_len=512: must be at most model.block_size=256"]),
        ("width not divisible by heads", ["model.n_embd=100", "model.n_head=3"], ["model config: n_embd=100 must be divisible by n_head=3"]),
        ("vocab_size below bytes + specials", ["tokenizer.vocab_size=100"], ["tokenizer.vocab_size=100: must be >= 262"]),
        ("two bad values, both named on one line", ["optim.lr=0", "data.batch_size=0"], ["optim.lr=0: must be > 0", "data.batch_size=0: must be >= 1"]),
    ),
    *rows(
        "sft",
        ("unknown loss_on", ["sft.loss_on=prompt"], ["sft.loss_on=prompt: must be completion or all"]),
    ),
    *rows("reward", ("greedy policy pairs", ["reward.policy_temperature=0"], ["reward.policy_temperature=0: must be > 0"])),
    *rows(
        "ppo",
        ("temperature 0", ["ppo.temperature=0"], ["ppo.temperature=0: must be > 0 (rollouts sample at this temperature and their log-probs are taken under it)"]),
        ("eval_every 0", ["ppo.eval_every=0"], ["ppo.eval_every=0: must be >= 1"]),
        ("save_every 0", ["ppo.save_every=0"], ["ppo.save_every=0: must be >= 1"]),
        ("unknown kl_estimator", ["ppo.kl_estimator=k4"], ["ppo.kl_estimator=k4: must be one of k1, k2, k3"]),
        ("top-k in rollouts", ["ppo.top_k=50"], ["ppo.top_k=50: must be 0", "rollout log-probs would not be those of the sampling distribution"]),
        ("top-p in rollouts", ["ppo.top_p=0.9"], ["ppo.top_p=0.9: must be 1", "rollout log-probs would not be those of the sampling distribution"]),
    ),
    *rows(
        "generate",
        ("prompt and prompts_file both", ["prompt=hi", "prompts_file={in}/p.txt"], ["give prompt=... or prompts_file=..., not both"], [file("p.txt", "hello\n")]),
    ),
    *rows("export", ("unknown dtype", ["export.dtype=int8"], ["export.dtype=int8: must be one of float32, bfloat16, float16"])),
    *rows(
        "distill",
        ("on-policy share above 1", ["distill.lmbda=1.5"], ["distill.lmbda=1.5: must be in [0, 1] (the share of batches whose answers the student samples itself)"]),
        ("beta beyond reverse KL", ["distill.beta=2"], ["distill.beta=2: must be in [0, 1]", "1: reverse KL(student || teacher)"]),
        ("temperature 0", ["distill.temperature=0"], ["distill.temperature=0: must be > 0"]),
    ),
]

# (stage, override, words): one bad value for each rule of pipeline/checks.py, checked on the stage's composed config.
VALUES = [
    (("stage=sft", "peft=lora"), "peft.r=0", "peft.r=0: must be >= 1"),
    (("stage=sft", "peft=lora"), "peft.alpha=0", "peft.alpha=0: must be > 0"),
    (("stage=dpo", "peft=qlora"), "peft.dropout=1", "peft.dropout=1: must be in [0, 1)"),
    (("stage=reward", "peft=lora"), "peft.target_modules=[lm_head]", "peft.target_modules=['lm_head']: must be a non-empty list of q_proj"),
    ("sft", "peft.method=prefix", "peft.method=prefix: must be one of"),
    ("pretrain", "trainer.val_check_interval=0", "trainer.val_check_interval=0: must be an integer >= 1 (batches) or a number in (0, 1]"),
    ("pretrain", "trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches=0: must be >= 1"),
    ("pretrain", "data.batch_size=0", "data.batch_size=0: must be >= 1"),
    ("pretrain", "data.val_fraction=0", "data.val_fraction=0: must be in (0, 1)"),
    ("pretrain", "optim.lr=0", "optim.lr=0: must be > 0"),
    ("pretrain", "model.n_head=0", "model.n_head=0: must be >= 1"),
    ("pretrain", "seed=abc", "seed=abc: must be an integer in [0, 4294967295]"),
    ("pretrain", "tokenizer.path=/no/such/tokenizer.json", "tokenizer.path=/no/such/tokenizer.json: must be an existing tokenizer.json or tokenizer folder"),
    ("pretrain", "ckpt_path=/no/such/last.ckpt", "ckpt_path=/no/such/last.ckpt: must be an existing Lightning checkpoint (no such file)"),
    ("sft", "eval.gold=maybe", "eval.gold=maybe: must be auto, true or false"),
    ("sft", "init_from=/no/such/run", "init_from=/no/such/run: must be an existing run directory"),
    ("ppo", "ppo.rollout_batch_size=0", "ppo.rollout_batch_size=0: must be >= 1"),
    ("ppo", "ppo.iterations=2.5", "ppo.iterations=2.5: must be an integer >= 1"),
    ("ppo", "reward_from=/no/such/reward", "reward_from=/no/such/reward: must be an existing reward run directory"),
    ("generate", "temperature=-1", "temperature=-1: must be >= 0 (0 is greedy)"),
    ("generate", "prompts_file=/no/such/prompts.txt", "prompts_file=/no/such/prompts.txt: must be an existing .txt or .jsonl file"),
    ("pretrain", "trainer.val_check_interval=1.5", "trainer.val_check_interval=1.5: must be an integer >= 1 (batches) or a number in (0, 1]"),
    ("pretrain", "trainer.max_epochs=0", "trainer.max_epochs=0: must be -1 or null or >= 1"),
    ("pretrain", "trainer.check_val_every_n_epoch=0", "trainer.check_val_every_n_epoch=0: must be null or >= 1"),
    ("pretrain", "trainer.limit_val_batches=-1", "trainer.limit_val_batches=-1: must be an integer >= 0 (batches) or a number in [0, 1]"),
    ("pretrain", "trainer.gradient_clip_val=-1", "trainer.gradient_clip_val=-1: must be null or >= 0"),
    ("pretrain", "trainer.log_every_n_steps=0", "trainer.log_every_n_steps=0: must be >= 1"),
    ("pretrain", "trainer.num_sanity_val_steps=-2", "trainer.num_sanity_val_steps=-2: must be -1 or >= 0"),
    ("pretrain", "trainer.num_nodes=0", "trainer.num_nodes=0: must be >= 1"),
    ("pretrain", "trainer.devices=0", "trainer.devices=0: must be an integer >= 1, -1 (all), auto, or device ids"),
    ("pretrain", "trainer.enable_progress_bar=2", "trainer.enable_progress_bar=2: must be true or false"),
    ("pretrain", "trainer.accelerator=gpux", "trainer.accelerator=gpux: must be one of auto, gpu, cpu"),
    ("pretrain", "trainer.strategy=dpp", "trainer.strategy=dpp: must be one of auto, ddp"),
    ("pretrain", "logger.name=tensorboard", "logger.name=tensorboard: must be wandb or csv"),
    ("pretrain", "logger.log_model=maybe", "logger.log_model=maybe: must be true or false"),
    ("pretrain", "seed=-1", "seed=-1: must be in [0, 4294967295]"),
    ("pretrain", "rerun=yes", "rerun=yes: must be true or false"),
    ("reward", "objective_direction=up", "objective_direction=up: must be maximize or minimize"),
    ("pretrain", "model.block_size=0", "model.block_size=0: must be >= 1"),
    ("pretrain", "model.n_layer=0", "model.n_layer=0: must be >= 1"),
    ("pretrain", "model.n_kv_head=0", "model.n_kv_head=0: must be null or >= 1"),
    ("pretrain", "model.n_kv_head=3", "model config: n_head=4 must be divisible by n_kv_head=3"),
    ("pretrain", "model.n_embd=0", "model.n_embd=0: must be >= 1"),
    ("pretrain", "model.n_embd=132", "model config: rotary positions need an even head size"),
    ("pretrain", "model.mlp_ratio=0", "model.mlp_ratio=0: must be > 0"),
    ("pretrain", "model.dropout=1.5", "model.dropout=1.5: must be in [0, 1)"),
    ("pretrain", "model.bias=1", "model.bias=1: must be true or false"),
    ("pretrain", "model.pos_emb=alibi", "model.pos_emb=alibi: must be rope or learned"),
    ("pretrain", "model.norm=batchnorm", "model.norm=batchnorm: must be rmsnorm or layernorm"),
    ("pretrain", "model.mlp=relu", "model.mlp=relu: must be swiglu or gelu"),
    ("pretrain", "model.rope_theta=0", "model.rope_theta=0: must be > 0"),
    ("pretrain", "model.tie_embeddings=no", "model.tie_embeddings=no: must be true or false"),
    ("pretrain", "model.compile=1", "model.compile=1: must be true or false"),
    ("pretrain", "model.activation_checkpointing=1", "model.activation_checkpointing=1: must be true or false"),
    ("ppo", "ppo.share_base=yes", "ppo.share_base=yes: must be auto, true or false"),
    ("pretrain", "data.path=./no/such/folder", "data.path=./no/such/folder: must be an existing file or folder, or a hub dataset name"),
    ("pretrain", "data.val_fraction=1.5", "data.val_fraction=1.5: must be in (0, 1)"),
    ("pretrain", "data.seq_len=0", "data.seq_len=0: must be >= 1"),
    ("pretrain", "data.num_workers=-1", "data.num_workers=-1: must be >= 0"),
    ("pretrain", "data.num_proc=0", "data.num_proc=0: must be >= 1"),
    ("pretrain", "optim.lr=-0.001", "optim.lr=-0.001: must be > 0"),
    ("pretrain", "optim.lr=inf", "optim.lr=inf: must be a number > 0"),
    ("pretrain", "optim.betas=[0.9,1.5]", "optim.betas=[0.9, 1.5]: must be two numbers in [0, 1)"),
    ("pretrain", "optim.weight_decay=-0.1", "optim.weight_decay=-0.1: must be >= 0"),
    ("pretrain", "optim.warmup_steps=-1", "optim.warmup_steps=-1: must be >= 0"),
    ("pretrain", "optim.min_lr_ratio=2", "optim.min_lr_ratio=2: must be in [0, 1]"),
    ("pretrain", "optim.matrices=sgd", "optim.matrices=sgd: must be adamw or muon"),
    ("pretrain", "optim.muon_momentum=1.5", "optim.muon_momentum=1.5: must be in [0, 1]"),
    ("pretrain", "samples.every_n_val=0", "samples.every_n_val=0: must be >= 1"),
    ("pretrain", "samples.num_prompts=-1", "samples.num_prompts=-1: must be >= 0"),
    ("pretrain", "samples.max_new_tokens=0", "samples.max_new_tokens=0: must be >= 1"),
    ("sft", "data.columns=[prompt]", "data.columns=['prompt']: must be null or a mapping"),
    ("sft", "data.group_by_length=maybe", "data.group_by_length=maybe: must be true or false"),
    ("sft", "data.packing=2", "data.packing=2: must be true or false"),
    ("sft", "eval.num_prompts=-1", "eval.num_prompts=-1: must be >= 0"),
    ("sft", "eval.max_new_tokens=0", "eval.max_new_tokens=0: must be >= 1"),
    ("sft", "eval.batch_size=0", "eval.batch_size=0: must be >= 1"),
    ("reward", "reward.center_coef=-1", "reward.center_coef=-1: must be >= 0"),
    ("reward", "reward.use_margin=1", "reward.use_margin=1: must be true or false"),
    ("reward", "reward.policy_pairs=-5", "reward.policy_pairs=-5: must be >= 0"),
    ("reward", "reward.policy_pairs_test=-1", "reward.policy_pairs_test=-1: must be >= 0"),
    ("reward", "reward.policy_max_new_tokens=0", "reward.policy_max_new_tokens=0: must be >= 1"),
    ("reward", "data.share_prompts=maybe", "data.share_prompts=maybe: must be true or false"),
    ("ppo", "ppo.temperature=-0.5", "ppo.temperature=-0.5: must be > 0"),
    ("ppo", "ppo.save_every=-10", "ppo.save_every=-10: must be >= 1"),
    ("ppo", "ppo.iterations=0", "ppo.iterations=0: must be >= 1"),
    ("ppo", "ppo.minibatch_size=0", "ppo.minibatch_size=0: must be >= 1"),
    ("ppo", "ppo.ppo_epochs=0", "ppo.ppo_epochs=0: must be >= 1"),
    ("ppo", "ppo.clip_ratio=0", "ppo.clip_ratio=0: must be > 0"),
    ("ppo", "ppo.value_clip=0", "ppo.value_clip=0: must be > 0"),
    ("ppo", "ppo.vf_coef=-1", "ppo.vf_coef=-1: must be >= 0"),
    ("ppo", "ppo.gamma=1.5", "ppo.gamma=1.5: must be in [0, 1]"),
    ("ppo", "ppo.lam=-0.1", "ppo.lam=-0.1: must be in [0, 1]"),
    ("ppo", "ppo.kl_coef=-0.1", "ppo.kl_coef=-0.1: must be >= 0"),
    ("ppo", "ppo.adaptive_kl=maybe", "ppo.adaptive_kl=maybe: must be true or false"),
    ("ppo", "ppo.target_kl=0", "ppo.target_kl=0: must be > 0"),
    ("ppo", "ppo.horizon=0", "ppo.horizon=0: must be > 0"),
    ("ppo", "ppo.whiten_rewards=1", "ppo.whiten_rewards=1: must be true or false"),
    ("ppo", "ppo.scale_reward_by_std=1", "ppo.scale_reward_by_std=1: must be true or false"),
    ("ppo", "ppo.missing_eos_penalty=-1", "ppo.missing_eos_penalty=-1: must be >= 0"),
    ("ppo", "ppo.max_new_tokens=0", "ppo.max_new_tokens=0: must be >= 1"),
    ("ppo", "ppo.entropy_coef=-0.1", "ppo.entropy_coef=-0.1: must be >= 0"),
    ("ppo", "ppo.ptx_coef=-1", "ppo.ptx_coef=-1: must be >= 0"),
    ("ppo", "ppo.ptx_data=/no/such/text.jsonl", "ppo.ptx_data=/no/such/text.jsonl: must be null, an existing file or folder"),
    ("ppo", "ppo.ptx_batch_size=0", "ppo.ptx_batch_size=0: must be >= 1"),
    ("ppo", "ppo.ptx_seq_len=0", "ppo.ptx_seq_len=0: must be >= 1"),
    ("ppo", "ppo.max_grad_norm=0", "ppo.max_grad_norm=0: must be > 0"),
    ("ppo", "ppo.critic_lr=0", "ppo.critic_lr=0: must be > 0"),
    ("ppo", "ppo.critic_head=fresh", "ppo.critic_head=fresh: must be zero or reward"),
    ("ppo", "ppo.critic_warmup=-1", "ppo.critic_warmup=-1: must be >= 0"),
    ("ppo", "ppo.anneal_lr=2", "ppo.anneal_lr=2: must be true or false"),
    ("ppo", "ppo.ema_decay=1", "ppo.ema_decay=1: must be in [0, 1)"),
    ("ppo", "ppo.eval_prompts=0", "ppo.eval_prompts=0: must be >= 1"),
    ("ppo", "ppo.warn_ratio=0", "ppo.warn_ratio=0: must be > 0"),
    ("ppo", "ppo.warn_approxkl=0", "ppo.warn_approxkl=0: must be > 0"),
    ("generate", "prompt=[a,b]", "prompt=['a', 'b']: must be text"),
    ("generate", "chat=maybe", "chat=maybe: must be auto, true or false"),
    ("generate", "max_new_tokens=0", "max_new_tokens=0: must be >= 1"),
    ("generate", "top_k=-1", "top_k=-1: must be >= 0"),
    ("generate", "top_p=0", "top_p=0: must be in (0, 1]"),
    ("generate", "batch_size=0", "batch_size=0: must be >= 1"),
    ("quantize", "quantize.method=int3", "quantize.method=int3: must be int8 or int4"),
    ("quantize", "quantize.group_size=48", "quantize.group_size=48: must be one of 32, 64, 128"),
    ("quantize", "quantize.dtype=float16", "quantize.dtype=float16: must be one of auto, float32, bfloat16"),
    ("quantize", "quantize.bench.batch_sizes=[0]", "quantize.bench.batch_sizes=[0]: must be a non-empty list of integers >= 1"),
    ("quantize", "quantize.bench.new_tokens=0", "quantize.bench.new_tokens=0: must be >= 1"),
    ("quantize", "quantize.bench.warmup=-1", "quantize.bench.warmup=-1: must be >= 0"),
    ("quantize", "quantize.bench.repeats=0", "quantize.bench.repeats=0: must be >= 1"),
    ("serve", "serve.host=' '", "serve.host=' ': must be a host name or address"),
    ("serve", "serve.port=70000", "serve.port=70000: must be in [0, 65535] (0: any free port)"),
    ("serve", "serve.models=[1]", "serve.models=[1]: must be a list of run directories or model files"),
    ("serve", "serve.api_key=' '", "serve.api_key=' ': must be null or a non-empty key"),
    ("serve", "serve.max_batch_size=0", "serve.max_batch_size=0: must be >= 1"),
    ("serve", "serve.batch_window_ms=-1", "serve.batch_window_ms=-1: must be >= 0"),
    ("serve", "serve.threads=0", "serve.threads=0: must be null or >= 1"),
    ("serve", "serve.temperature=3", "serve.temperature=3: must be in [0, 2]"),
    ("serve", "serve.max_tokens=0", "serve.max_tokens=0: must be >= 1"),
    ("serve", "serve.shutdown_timeout_s=-1", "serve.shutdown_timeout_s=-1: must be >= 0"),
    ("all", 'recipe.overrides.sft=["optim.lr=0"]', "recipe.overrides.sft: optim.lr=0: must be > 0"),
    ("dpo", "dpo.beta=0", "dpo.beta=0: must be > 0"),
    ("dpo", "dpo.loss_type=hinge", "dpo.loss_type=hinge: must be sigmoid or ipo"),
    ("dpo", "dpo.label_smoothing=0.5", "dpo.label_smoothing=0.5: must be in [0, 0.5)"),
    ("dpo", "dpo.sft_coef=-1", "dpo.sft_coef=-1: must be >= 0"),
    ("dpo", "dpo.reference=cached", "dpo.reference=cached: must be precompute or online"),
    ("dpo", "dpo.train_pairs=0", "dpo.train_pairs=0: must be null or >= 1"),
    ("distill", "teacher_from=/no/such/run", "teacher_from=/no/such/run: must be an existing run directory"),
    ("distill", "distill.nll_weight=-1", "distill.nll_weight=-1: must be >= 0"),
    ("distill", "distill.max_new_tokens=0", "distill.max_new_tokens=0: must be >= 1"),
    ("distill", "distill.teacher_temperature=-1", "distill.teacher_temperature=-1: must be >= 0 (0: the teacher's answers are greedy)"),
    ("distill", "distill.sampling_temperature=-0.5", "distill.sampling_temperature=-0.5: must be >= 0"),
    ("distill", "distill.train_prompts=0", "distill.train_prompts=0: must be null or >= 1"),
    ("distill", "distill.val_prompts=0", "distill.val_prompts=0: must be >= 1"),
    ("distill", "distill.batch_size=0", "distill.batch_size=0: must be >= 1"),
    ("distill", "distill.generate_batch_size=0", "distill.generate_batch_size=0: must be >= 1"),
    ("distill", "distill.student_init=copy", "distill.student_init=copy: must be one of auto, teacher, fresh"),
    ("distill", "distill.calibration_prompts=0", "distill.calibration_prompts=0: must be >= 1"),
    ("distill", "distill.bench.batch_sizes=[]", "distill.bench.batch_sizes=[]: must be a non-empty list of integers >= 1"),
    ("distill", "distill.bench.new_tokens=0", "distill.bench.new_tokens=0: must be >= 1"),
    ("distill", "distill.bench.warmup=-1", "distill.bench.warmup=-1: must be >= 0"),
    ("distill", "distill.bench.repeats=0", "distill.bench.repeats=0: must be >= 1"),
    ("prune", "prune.ratio=0", "prune.ratio=0: must be in (0, 1] (the pruned model's share of the parameters)"),
    ("prune", "prune.method=l1", "prune.method=l1: must be magnitude or wanda"),
    ("prune", "prune.targets={layers:1}", "prune.targets={'layers': 1}: must be a mapping of blocks, heads, channels to shares >= 0"),
    ("prune", "prune.calibration.prompts=0", "prune.calibration.prompts=0: must be >= 1"),
    ("prune", "prune.calibration.max_new_tokens=0", "prune.calibration.max_new_tokens=0: must be >= 1"),
    ("prune", "prune.calibration.batch_size=0", "prune.calibration.batch_size=0: must be >= 1"),
    ("prune", "prune.recover.steps=-1", "prune.recover.steps=-1: must be >= 0 (0: no recovery)"),
    # prune.recover: the distill section's keys under the same rules
    ("prune", "prune.recover.lmbda=2", "prune.recover.lmbda=2: must be in [0, 1]"),
    ("prune", "prune.recover.beta=-1", "prune.recover.beta=-1: must be in [0, 1]"),
    ("prune", "prune.recover.temperature=0", "prune.recover.temperature=0: must be > 0"),
    ("prune", "prune.recover.nll_weight=-1", "prune.recover.nll_weight=-1: must be >= 0"),
    ("prune", "prune.recover.max_new_tokens=0", "prune.recover.max_new_tokens=0: must be >= 1"),
    ("prune", "prune.recover.teacher_temperature=-1", "prune.recover.teacher_temperature=-1: must be >= 0"),
    ("prune", "prune.recover.sampling_temperature=-1", "prune.recover.sampling_temperature=-1: must be >= 0"),
    ("prune", "prune.recover.train_prompts=0", "prune.recover.train_prompts=0: must be null or >= 1"),
    ("prune", "prune.recover.val_prompts=0", "prune.recover.val_prompts=0: must be >= 1"),
    ("prune", "prune.recover.batch_size=0", "prune.recover.batch_size=0: must be >= 1"),
    ("prune", "prune.recover.generate_batch_size=0", "prune.recover.generate_batch_size=0: must be >= 1"),
    ("prune", "prune.bench.batch_sizes=[0]", "prune.bench.batch_sizes=[0]: must be a non-empty list of integers >= 1"),
    ("prune", "prune.bench.new_tokens=0", "prune.bench.new_tokens=0: must be >= 1"),
    ("prune", "prune.bench.warmup=-1", "prune.bench.warmup=-1: must be >= 0"),
    ("prune", "prune.bench.repeats=0", "prune.bench.repeats=0: must be >= 1"),
    ("grpo", "grpo.iterations=0", "grpo.iterations=0: must be >= 1"),
    ("grpo", "grpo.prompts_per_rollout=0", "grpo.prompts_per_rollout=0: must be >= 1"),
    ("grpo", "grpo.group_size=1", "grpo.group_size=1: must be >= 2"),
    ("grpo", "grpo.baseline=std", "grpo.baseline=std: must be one of group_norm, mean, rloo"),
    ("grpo", "grpo.updates_per_rollout=0", "grpo.updates_per_rollout=0: must be >= 1"),
    ("grpo", "grpo.minibatch_size=5", "grpo.minibatch_size=5: must divide grpo.prompts_per_rollout=16"),
    ("grpo", "grpo.clip_ratio=1", "grpo.clip_ratio=1: must be in (0, 1)"),
    ("grpo", "grpo.clip_ratio_high=0", "grpo.clip_ratio_high=0: must be null or > 0"),
    ("grpo", "grpo.kl_coef=-0.1", "grpo.kl_coef=-0.1: must be >= 0"),
    ("grpo", "grpo.kl_in=both", "grpo.kl_in=both: must be loss or reward"),
    ("grpo", "grpo.kl_estimator=k4", "grpo.kl_estimator=k4: must be one of k1, k2, k3"),
    ("grpo", "grpo.loss_norm=seq", "grpo.loss_norm=seq: must be token or sequence"),
    ("grpo", "grpo.reward=[]", "grpo.reward=[]: must be rm, gold, package.module:function or path/to/file.py:function"),
    ("grpo", "grpo.reward_weights=[a]", "grpo.reward_weights=['a']: must be null or a list of numbers"),
    ("grpo", "grpo.scale_reward_by_std=1", "grpo.scale_reward_by_std=1: must be true or false"),
    ("grpo", "grpo.missing_eos_penalty=-1", "grpo.missing_eos_penalty=-1: must be >= 0"),
    ("grpo", "grpo.temperature=0", "grpo.temperature=0: must be > 0"),
    ("grpo", "grpo.max_new_tokens=0", "grpo.max_new_tokens=0: must be >= 1"),
    ("grpo", "grpo.max_grad_norm=0", "grpo.max_grad_norm=0: must be > 0"),
    ("grpo", "grpo.anneal_lr=2", "grpo.anneal_lr=2: must be true or false"),
    ("grpo", "grpo.eval_every=0", "grpo.eval_every=0: must be >= 1"),
    ("grpo", "grpo.eval_prompts=0", "grpo.eval_prompts=0: must be >= 1"),
    ("grpo", "grpo.save_every=0", "grpo.save_every=0: must be >= 1"),
    ("recipe=compare", "compare.seeds=0", "compare.seeds=0: must be >= 1 (runs of each method)"),
    ("recipe=compare", "compare.completions=0", "compare.completions=0: must be null or >= 1"),
]

FILES = [
    *rows(
        "pretrain",
        ("missing data file", ["data.path=/no/such/corpus.jsonl"], ["data.path=/no/such/corpus.jsonl: must be an existing file or folder"]),
        ("empty data file", ["data.path={in}/empty.jsonl"], ["data file {in}/empty.jsonl is empty"], [file("empty.jsonl", "")]),
        ("no text column", ["data.path={in}/wrong.jsonl"], ["[body]", "text"], [jsonl("wrong.jsonl", [{"body": f"row {i}"} for i in range(20)])]),
        ("truncated line in the middle", ["data.path={in}/c.jsonl"], ["{in}/c.jsonl, line 5, column 10: not valid JSON (Unterminated string)"], [jsonl("c.jsonl", texts(), raw='{"text": "half a li', at=4)]),
        ("a line that is not JSON", ["data.path={in}/c.jsonl"], ["{in}/c.jsonl, line 8, column 1: not valid JSON"], [jsonl("c.jsonl", texts(), raw="this is not json", at=7)]),
        ("truncated JSON array", ["data.path={in}/c.json"], ["{in}/c.json, line 1, column", "not valid JSON"], [file("c.json", json.dumps(texts())[:-30])]),
        ("a JSON file holding a number", ["data.path={in}/c.json"], ["{in}/c.json: holds a single JSON int (5), not rows"], [file("c.json", "5")]),
        ("a line that is not UTF-8", ["data.path={in}/c.jsonl"], ["row 5, column 'text': not UTF-8 text"], [jsonl("c.jsonl", texts(), raw='{"text": "caf\udce9 au lait"}', at=5)]),
        ("null text in the middle", ["data.path={in}/c.jsonl"], ["{in}/c.jsonl [train], row 4, column 'text': expected non-empty text, got None"], [jsonl("c.jsonl", texts()[:4] + [{"text": None}] + texts()[4:])]),
        ("a number as text in the middle", ["data.path={in}/c.jsonl"], ["row 6, column 'text': expected non-empty text, got 5"], [jsonl("c.jsonl", texts()[:6] + [{"text": 5}] + texts()[6:])]),
        ("a ragged CSV row", ["data.path={in}/c.csv"], ["cannot read {in}/c.csv as csv", "Expected 1 fields in line 4, saw 2"], [file("c.csv", "text\nhello\nworld\nthird,extra\nfourth\n")]),
        ("not a parquet file", ["data.path={in}/c.parquet"], ["cannot read {in}/c.parquet as parquet"], [file("c.parquet", b"PAR1 this is not parquet")]),
        ("parquet text column of numbers", ["data.path={in}/c.parquet"], ["{in}/c.parquet [train], row", "column 'text': expected non-empty text, got"], [parquet("c.parquet", {"text": list(range(10))})]),
        ("unknown file type", ["data.path={in}/notes.md"], ["{in}/notes.md has an unknown type; expected one of .jsonl"], [file("notes.md", "# notes\n")]),
        ("a folder mixing file types", ["data.path={in}/mixed"], ["{in}/mixed mixes file types (csv, json)"], [jsonl("mixed/train.jsonl", texts()), file("mixed/validation.csv", "text\nb\n")]),
        ("a folder without data files", ["data.path={in}/nothing"], ["{in}/nothing holds no data files"], [file("nothing/README", "no data here\n")]),
        ("a single row", ["data.path={in}/one.jsonl"], ["{in}/one.jsonl has 1 row: too few to hold out a validation split"], [jsonl("one.jsonl", texts(1))]),
        ("conversations", ["data.path={in}/chats.jsonl"], ["{in}/chats.jsonl holds conversations (`messages`): use stage=sft"], [jsonl("chats.jsonl", [{"messages": U(f"hi {i}") + A("yo")} for i in range(10)])]),
        ("preference pairs", ["data.path={in}/prefs.jsonl"], ["stage 'pretrain' cannot train on {in}/prefs.jsonl", "(preference format)"], [jsonl("prefs.jsonl", pairs())]),
        ("a broken saved dataset", ["data.path={in}/saved"], ["cannot read the saved dataset in {in}/saved"], [file("saved/dataset_dict.json", "{not json")]),
        ("a text file of blank lines", ["data.path={in}/blank.txt"], ["data file {in}/blank.txt holds no rows"], [file("blank.txt", "\n \n\n")]),
        ("too little text for one block", ["data.path={in}/c.jsonl", "tokenizer.vocab_size=300"], ["fewer than one block of 257 tokens (block_size=256 + 1)"], [jsonl("c.jsonl", texts(4))]),
        ("data.columns names a missing column", ["data.path={in}/c.jsonl", "data.columns={body:text}"], ["data.columns names column 'body', which {in}/c.jsonl (train split) does not have; its columns are [text]"], [jsonl("c.jsonl", texts())]),
        ("an unreachable hub dataset", ["data.path=no-such-org/no-such-dataset-xyz"], ["data path no-such-org/no-such-dataset-xyz is neither a local file or folder nor a reachable hub dataset"]),
    ),
    *rows(
        "sft",
        ("preference pairs", ["data.path={in}/prefs.jsonl"], ["stage 'sft' cannot train on {in}/prefs.jsonl", "(preference format)"], [jsonl("prefs.jsonl", pairs())]),
        ("an empty completion in the middle", ["data.path={in}/d"], ["{in}/d [train], row 3, column 'completion': expected non-empty text, got '  '"], [jsonl("d/train.jsonl", completions()[:3] + [{"prompt": "p", "completion": "  "}] + completions()[3:]), jsonl("d/validation.jsonl", completions(2))]),
        ("an unknown role in the validation file", ["data.path={in}/d"], ["{in}/d [validation], row 1, column 'messages', message 1: unknown role 'wizard'"], [jsonl("d/train.jsonl", [{"messages": U("hi") + A("yo")}] * 10), jsonl("d/validation.jsonl", [{"messages": U("hi") + A("yo")}, {"messages": U("hi") + [{"role": "wizard", "content": "boo"}]}])]),
        ("text and messages mixed", ["data.path={in}/mixed.jsonl"], ["mix standard and conversational data: text in prompt but lists of messages in completion"], [jsonl("mixed.jsonl", [{"prompt": "q", "completion": A("a")}] * 10)]),
        ("a prompt longer than the context", ["data.path={in}/d"], ["{in}/d [train]: row 2 has a prompt of", "which leaves no room for the answer in the model's context of 256 tokens"], [jsonl("d/train.jsonl", completions()[:2] + [{"prompt": LONG, "completion": "x"}] + completions()[2:]), jsonl("d/validation.jsonl", completions(2))]),
    ),
    *rows(
        "reward",
        ("prompt-completion data", ["data.path={in}/sft.jsonl"], ["stage 'reward' cannot train on {in}/sft.jsonl", "reward expects preference"], [jsonl("sft.jsonl", completions())]),
        ("no rejected column", ["data.path={in}/prefs.jsonl"], ["the 'rejected' column is missing"], [jsonl("prefs.jsonl", [{"prompt": "p", "chosen": "c"}] * 10)]),
        ("an empty chosen in the middle", ["data.path={in}/d"], ["{in}/d [train], row 2, column 'chosen': expected a non-empty list"], [jsonl("d/train.jsonl", [{"prompt": U("p"), "chosen": A("c"), "rejected": A("r")}] * 2 + [{"prompt": U("p"), "chosen": [], "rejected": A("r")}] * 3), jsonl("d/validation.jsonl", [{"prompt": U("p"), "chosen": A("c"), "rejected": A("r")}])]),
        ("a prompt longer than the context", ["data.path={in}/d"], ["{in}/d [train]: row 1 has a prompt of", "longer than the model's context of 256"], [jsonl("d/train.jsonl", pairs()[:1] + [{"prompt": LONG, "chosen": "a", "rejected": "b"}] + pairs()[1:]), jsonl("d/validation.jsonl", pairs(2))]),
    ),
    *rows(
        "ppo",
        ("implicit-prompt pairs", ["data.path={in}/prefs.jsonl"], ["stage 'ppo' needs explicit prompts; {in}/prefs.jsonl has implicit-prompt preference data"], [jsonl("prefs.jsonl", [{"chosen": "a b", "rejected": "a c"}] * 10)]),
        ("plain text", ["data.path={in}/c.jsonl"], ["stage 'ppo' cannot train on {in}/c.jsonl", "ppo expects prompt-only"], [jsonl("c.jsonl", texts())]),
        ("an empty prompt in the validation file", ["data.path={in}/d"], ["{in}/d [validation], row 1, column 'prompt': expected non-empty text"], [jsonl("d/train.jsonl", [{"prompt": f"say {i}"} for i in range(10)]), jsonl("d/validation.jsonl", [{"prompt": "fine"}, {"prompt": ""}])]),
    ),
    *rows(
        "generate",
        ("prompts_file of another type", ["prompts_file={in}/prompts.csv"], ["prompts_file={in}/prompts.csv: expected a .txt file (one prompt a line) or a .jsonl file"], [file("prompts.csv", "prompt\nhi\n")]),
        ("a row without a prompt", ["prompts_file={in}/bad.jsonl"], ["{in}/bad.jsonl, line 2: no `prompt` column (found: question)"], [jsonl("bad.jsonl", [{"prompt": "fine"}, {"question": "where is the prompt?"}])]),
        ("a truncated line in the middle", ["prompts_file={in}/bad.jsonl"], ["{in}/bad.jsonl, line 2: not valid JSON"], [jsonl("bad.jsonl", [{"prompt": "a"}, {"prompt": "b"}], raw='{"prompt": "hal', at=1)]),
        ("an unknown role", ["prompts_file={in}/bad.jsonl"], ["{in}/bad.jsonl, line 1: column `prompt`: message 0: unknown role 'robot'"], [jsonl("bad.jsonl", [{"prompt": [{"role": "robot", "content": "hi"}]}])]),
        ("an empty prompt", ["prompts_file={in}/bad.jsonl"], ["{in}/bad.jsonl, line 3: column `prompt` is empty"], [jsonl("bad.jsonl", [{"prompt": "a"}, {"prompt": "b"}, {"prompt": " "}])]),
        ("an empty prompts_file", ["prompts_file={in}/none.txt"], ["prompts_file={in}/none.txt holds no prompts"], [file("none.txt", "\n\n")]),
        ("a prompt longer than the context", [f"prompt={LONG}"], ["prompt: prompt 1 is", "no room to answer within the model's block_size=256"]),
        ("nothing to answer", [], ["nothing to answer: give prompt=\"...\" or prompts_file=FILE"]),
    ),
]

PARENT_ROWS = [
    *rows(
        "sft",
        ("no pretrain run", [], ["no finished pretrain run under {root} for stage 'sft' to start from"], [], ()),
        ("a folder without a model", ["init_from={in}/empty"], ["init_from={in}/empty is a directory without model.pt or config.json"], [file("empty/notes.txt", "x")]),
        ("a model file that is not one", ["init_from={in}/junk.pt"], ["cannot read model file {in}/junk.pt"], [file("junk.pt", b"not a torch file")]),
        ("a truncated model file", ["init_from={in}/m/sft/default/model.pt"], ["cannot read model file {in}/m/sft/default/model.pt"], [run("m"), mangle("m/sft/default/model.pt", truncate)]),
        ("a model without its tokenizer", ["init_from={in}/m/sft/default"], ["no tokenizer/ folder beside {in}/m/sft/default/model.pt"], [run("m", tokenizer=False)]),
        ("a tokenizer bigger than the model's vocabulary", ["init_from={in}/m/sft/default"], ["has 300 tokens, more than the model's vocab_size=64"], [run("m", model=lambda: lm(vocab_size=64))]),
        ("weights that do not fit their config", ["init_from={in}/m/sft/default"], ["the weights in {in}/m/sft/default/model.pt do not fit the model architecture", "wte.weight"], [run("m"), mangle("m/sft/default/model.pt", widen)]),
        ("a tokenizer.json that is not JSON", ["init_from={in}/m/sft/default"], ["tokenizer file {in}/m/sft/default/tokenizer/tokenizer.json is not readable JSON"], [run("m"), mangle("m/sft/default/tokenizer/tokenizer.json", lambda p: p.write_text("{oops"))]),
        ("a transformers model of another type", ["init_from={in}/hf"], ["{in}/hf/config.json: model_type='bert' is not supported"], [hf_folder("hf", model_type="bert")]),
        ("a transformers folder without weights", ["init_from={in}/hf"], ["cannot load the transformers weights in {in}/hf"], [hf_folder("hf", weights=False)]),
        ("a transformers config that is not JSON", ["init_from={in}/hf"], ["cannot read {in}/hf/config.json"], [hf_folder("hf", config_text="{oops")]),
        ("a Lightning checkpoint of something else", ["init_from={in}/other.ckpt"], ["{in}/other.ckpt is a Lightning checkpoint without a model_config"], [lightning_checkpoint("other.ckpt", None)]),
        ("a model file that could run code", ["init_from={in}/unsafe"], ["{in}/unsafe/model.pt", "could run code"], [unsafe_model("unsafe")]),
    ),
    *rows("reward", ("no sft run", [], ["no finished sft run under {root} for stage 'reward' to start from"], [], ("pretrain",))),
    *rows(
        "distill",
        ("no teacher", [], ["no finished ppo/grpo/dpo/sft run under {root} for stage 'distill' to start from", "teacher_from=PATH"], [], ("pretrain",)),
        ("a reward model as the teacher", ["teacher_from={in}/m/reward/default"], ["teacher_from={in}/m/reward/default/model.pt is a reward model (a scalar head), not a policy"], [run("m", model=scalar, stage="reward", kind="scalar")]),
    ),
    *rows(
        "prune",
        ("a reward model to prune", ["init_from={in}/m/reward/default"], ["init_from={in}/m/reward/default/model.pt is a reward model (a scalar head), not a policy"], [run("m", model=scalar, stage="reward", kind="scalar")]),
        ("a ratio below what the embedding keeps", ["prune.ratio=0.05"], ["prune.ratio=0.05: the smallest model these targets allow keeps", "the token embedding alone holds"]),
    ),
    *rows(
        "ppo",
        ("no reward run", [], ["no finished reward run under {root} for stage 'ppo' to start from", "reward_from=PATH"], [], ("pretrain", "sft")),
        ("a language model as the reward model", ["reward_from={in}/m/sft/default"], ["reward_from={in}/m/sft/default/model.pt is not a reward model"], [run("m")]),
        ("a reward model as the policy", ["init_from={in}/m/reward/default"], ["init_from={in}/m/reward/default/model.pt is a reward model (a scalar head), not a policy"], [run("m", model=scalar, stage="reward", kind="scalar")]),
        ("a reward model of another tokenizer", ["reward_from={in}/rm/reward/default"], ["reward_from={in}/rm/reward/default/model.pt uses another tokenizer than the policy"], [reward_run("rm", other_tokenizer=True)]),
        ("a reward model that reads fewer tokens than the policy", ["reward_from={in}/rm/reward/default"], ["reads 128 tokens (block_size), fewer than the policy's 256"], [reward_run("rm", block_size=128)]),
        ("a reward checkpoint without the score normaliser", ["reward_from={in}/rm.ckpt"], ["reward_from={in}/rm.ckpt lacks the reward model's score normaliser (reward_mean, reward_std"], [scalar_checkpoint("rm.ckpt")]),
        ("a reward model without its tokenizer", ["reward_from={in}/rm/reward/default"], ["no tokenizer/ folder beside {in}/rm/reward/default/model.pt"], [reward_run("rm", tokenizer=False)]),
        ("no room for a prompt", ["ppo.max_new_tokens=256"], ["ppo.max_new_tokens=256 leaves no room for a prompt in the policy's context of 256 tokens"]),
        (
            "fewer prompts than one rollout batch of every process",
            ["data.path={in}/prompts.jsonl", "ppo.rollout_batch_size=16"],
            ["prompts.jsonl [train] has", "prompts, fewer than ppo.rollout_batch_size x processes = 16 x 1 = 16"],
            [jsonl("prompts.jsonl", [{"prompt": f"question {i}"} for i in range(12)])],
        ),
        ("a policy file from a newer pipeline", ["init_from={in}/m/sft/default"], [f"{{in}}/m/sft/default/model.pt was written by a newer version of the pipeline (model file format {runs.FORMAT_VERSION + 1}"], [run("m"), mangle("m/sft/default/model.pt", newer_format)]),
    ),
    *rows(
        "pretrain",
        ("a tokenizer folder without tokenizer.json", ["data.path={corpus}", "tokenizer.path={in}/tok"], ["tokenizer folder {in}/tok has no tokenizer.json"], [file("tok/vocab.txt", "a\n")]),
        (
            "a checkpoint of another architecture",
            ["data.path={corpus}", "tokenizer.vocab_size=300", "logger=csv", "ckpt_path={in}/last.ckpt"],
            ["checkpoint {in}/last.ckpt holds a model of another architecture", "n_layer: checkpoint 3 vs config 4"],
            [lightning_checkpoint("last.ckpt", GPTConfig(vocab_size=320, n_layer=3).to_dict())],
        ),
        (
            "a checkpoint of another tokenizer's vocabulary",
            ["data.path={corpus}", "tokenizer.vocab_size=300", "logger=csv", "ckpt_path={in}/last.ckpt"],
            ["checkpoint {in}/last.ckpt holds a model of another architecture (vocab_size: checkpoint 384 vs config 320)"],
            [lightning_checkpoint("last.ckpt", GPTConfig(vocab_size=384).to_dict())],
        ),
        ("a model file as the checkpoint", ["data.path={corpus}", "tokenizer.vocab_size=300", "logger=csv", "ckpt_path={in}/m/sft/default/model.pt"], ["{in}/m/sft/default/model.pt is not a Lightning checkpoint"], [run("m")]),
    ),
    *rows(
        "generate",
        ("a reward model as the policy", ["init_from={in}/m/reward/default", "prompt=hi"], ["init_from={in}/m/reward/default/model.pt is a reward model (a scalar head), not a policy"], [run("m", model=scalar, stage="reward", kind="scalar")]),
        ("no policy at all", ["prompt=hi"], ["no finished ppo/grpo/dpo/sft/pretrain run under {root} for stage 'generate'"], [], ()),
    ),
    *rows(
        "serve",
        ("a reward model to serve", ["init_from={in}/m/reward/default", "serve.port=0"], ["{in}/m/reward/default/model.pt is a reward model (a scalar head), not a policy"], [run("m", model=scalar, stage="reward", kind="scalar")]),
        ("nothing to serve", ["serve.port=0"], ["no finished ppo/grpo/dpo/sft/pretrain run under {root} for stage 'serve'"], [], ()),
    ),
    *rows(
        "export",
        ("no model at all", [], ["no finished ppo/grpo/dpo/sft/pretrain run under {root} for stage 'export'"], [], ()),
        ("an architecture transformers lacks", ["init_from={in}/m/pretrain/default"], ["model config norm=layernorm has no transformers counterpart"], [run("m", stage="pretrain", model=lambda: lm(norm="layernorm"))]),
        ("GPT-2 with grouped-query attention", ["init_from={in}/m/pretrain/default"], ["n_kv_head=1 (grouped-query attention) has no GPT-2 counterpart"], [run("m", stage="pretrain", model=lambda: lm(n_kv_head=1, **ARCHS["gpt2"]))]),
    ),
]

REWARDS_AS_CODE = [
    *rows(
        "grpo",
        ("a reward function that cannot be imported", ["grpo.reward=no_such_module_xyz:score"], ["no_such_module_xyz:score", "no_such_module_xyz"]),
        ("a reward function file with a syntax error", ["grpo.reward={in}/bad_reward.py:score"], ["{in}/bad_reward.py", "line 1"], [file("bad_reward.py", "def score(:\n")]),
        ("a reward function that is not there", ["grpo.reward={in}/my_reward.py:scroe"], ["{in}/my_reward.py", "scroe"], [file("my_reward.py", "def score(prompts, completions, **kw):\n    return [1.0] * len(completions)\n")]),
        ("weights of another length", ["grpo.reward=[gold,rm]", "grpo.reward_weights=[1.0]"], ["grpo.reward_weights", "2"]),
    ),
    *rows(
        "dpo",
        ("prompt-only data", ["data.path={in}/prompts.jsonl"], ["{in}/prompts.jsonl", "chosen", "rejected"], [jsonl("prompts.jsonl", [{"prompt": f"say {i}"} for i in range(10)])]),
        ("prompt-completion data", ["data.path={in}/sft.jsonl"], ["{in}/sft.jsonl", "chosen", "rejected"], [jsonl("sft.jsonl", completions())]),
    ),
]

RECIPE = [
    Row("compare: a method of a stage that trains no policy", ["recipe=compare", "compare.methods.ppo.stage=reward"], ["compare.methods.ppo.stage=reward: must be a stage that trains a policy from the SFT model"]),
    Row("recipe: a stage that does not train", ["recipe.stages=[pretrain,generate]"], ["recipe instructgpt: ['generate'] are not training stages"]),
    Row("recipe: a bad value fails before the first stage starts", ["ppo.temperature=0"], ["ppo.temperature=0: must be > 0"]),
    Row("recipe: a bad value in one stage's own overrides", ['recipe.overrides.ppo=["ppo.kl_estimator=k5"]'], ["recipe.overrides.ppo: ppo.kl_estimator=k5: must be one of k1, k2, k3"]),
    # Hydra's own refusals, before pipeline's main runs: cli() turns them into the same one line and exit code 2.
    Row("recipe: an unknown key", ["ppo.temprature=1"], ["Could not override 'ppo.temprature'"]),
    Row("pretrain: a mistyped trainer key", ["stage=pretrain", "trainer.max_stepz=3"], ["Could not override 'trainer.max_stepz'"]),
    Row("an unknown stage", ["stage=pretrian"], ["Could not find 'stage/pretrian'", "Available options in 'stage':", "ppo, pretrain"]),
    Row("pretrain: an interpolation to a missing key", ["stage=pretrain", "data.seq_len=${model.blocksize}"], ["Interpolation key 'model.blocksize' not found"]),
]

ROWS = CONFIG + FILES + PARENT_ROWS + REWARDS_AS_CODE + RECIPE

# The same check at the process boundary: `python -m pipeline` in a fresh interpreter.
PROCESS_ROWS = [
    Row("process: ppo temperature 0", ["stage=ppo", "ppo.temperature=0"], ["ppo.temperature=0: must be > 0"]),
    Row("process: recipe top-k", ["ppo.top_k=5"], ["ppo.top_k=5: must be 0"]),
    Row("process: generate prompts_file row without a prompt", ["stage=generate", "prompts_file={in}/bad.jsonl"], ["{in}/bad.jsonl, line 2: no `prompt` column (found: question)"], (jsonl("bad.jsonl", [{"prompt": "fine"}, {"question": "where?"}]),)),
]


# ---------------------------------------------------------------------------------------------
# The runner


@pytest.fixture(scope="module")
def template(tmp_path_factory, tokenizer):
    """Finished pretrain, sft and reward runs (tiny, untrained) to copy into each row's outputs root, and the shared cache."""
    root = tmp_path_factory.mktemp("parents")
    save_run(root, "pretrain", "default", lm(1), tokenizer)
    save_run(root, "sft", "default", lm(2), tokenizer)
    save_run(root, "reward", "default", scalar(3), tokenizer, kind="scalar", extra={"reward_mean": 0.0, "reward_std": 1.0})
    for stage in PARENTS:  # the newest is the one a stage after it would take
        os.utime(root / stage / "default" / runs.METRICS_FILE, (time.time() + PARENTS.index(stage),) * 2)
    cache = tmp_path_factory.mktemp("cache")
    # The stages name the embedded task's files even when data.path replaces them, and building the
    # real ones takes most of a minute: a few rows of each kind stand in (no row reads them).
    stand_ins = {
        "sft": [{"messages": U(f"q{i}") + A(f"a{i}")} for i in range(4)],
        "preference": [{"prompt": U(f"q{i}"), "chosen": A("yes"), "rejected": A("no")} for i in range(4)],
        "prompts": [{"prompt": U(f"q{i}")} for i in range(4)],
    }
    for kind, rows_of_kind in stand_ins.items():
        materialize({split: rows_of_kind for split in ("train", "validation", "test")}, embedded_task_dir(cache, kind))
    return root, cache


def prepare(row: Row, tmp_path: Path, template, tokenizer, corpus) -> tuple[Path, Path, dict]:
    parents, cache = template
    root, inputs = tmp_path / "outputs", tmp_path / "in"
    root.mkdir()
    inputs.mkdir()
    for stage in row.parents:
        shutil.copytree(parents / stage, root / stage)
    (root / "cache").symlink_to(cache, target_is_directory=True)
    for make in row.make:
        make(inputs, tokenizer)
    return root, inputs, {"in": str(inputs), "root": str(root), "corpus": str(corpus)}


def fill(texts: list[str], places: dict) -> list[str]:
    return [t.replace("{in}", places["in"]).replace("{root}", places["root"]).replace("{corpus}", places["corpus"]) for t in texts]


def snapshot(*folders: Path) -> dict[str, tuple[int, str]]:
    """(size, sha256) of every file; links (the shared cache) are not followed."""
    files = {}
    for folder in folders:
        for dirpath, _, names in os.walk(folder):
            for name in names:
                path = Path(dirpath, name)
                if not path.is_symlink():
                    files[str(path)] = (path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())
    return files


def may_appear(path: str, root: Path, before: dict) -> bool:
    """A file that a refused command may create: Hydra's start-up files and parents.json in its own new run directory."""
    parts = Path(path).relative_to(root).parts if Path(path).is_relative_to(root) else ()
    if len(parts) < 3:
        return False
    run_dir = root / parts[0] / parts[1]
    if any(Path(p).is_relative_to(run_dir) for p in before):
        return False  # an existing run directory: nothing new in it
    return parts[2] in (".hydra", "parents.json") or (len(parts) == 3 and parts[2].endswith(".log"))


def assert_nothing_changed(before: dict, after: dict, root: Path) -> None:
    changed = [p for p in before if after.get(p) != before[p]]
    new = [p for p in after if p not in before]
    appeared = [p for p in new if not may_appear(p, root, before)]
    run_dirs = {Path(p).relative_to(root).parts[:2] for p in new if p not in appeared}
    assert not changed, f"changed or removed: {changed}"
    assert not appeared, f"written by a refused command: {appeared}"
    assert len(run_dirs) <= 1, f"more than the command's own run directory: {sorted(run_dirs)}"  # a recipe started a stage


def assert_refused(code, out: str, err: str, words: list[str]) -> None:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2, f"exit code {code}\nSTDOUT:\n{out[-3000:]}\nSTDERR:\n{err[-3000:]}"
    assert len(lines) == 1, f"expected one error line:\n{err[-3000:]}"
    assert "Traceback" not in out + err, err[-3000:]
    for word in words:
        assert word in lines[0], f"{word!r} not in {lines[0]!r}"


def rebind_stale_handlers() -> None:
    """Point library log handlers bound to an earlier test's (closed) captured stderr at this test's.

    In a fresh process each library's handler holds the real stderr; in one pytest process a handler
    made during an earlier test (datasets' own, for one) would fail with a logging error instead.
    """
    loggers = [logging.getLogger(), *(v for v in logging.Logger.manager.loggerDict.values() if isinstance(v, logging.Logger))]
    for handler in (h for logger in loggers for h in logger.handlers):
        if type(handler) is logging.StreamHandler and getattr(handler.stream, "closed", False):
            handler.stream = sys.stderr  # not setStream: it flushes the closed stream first


def run_cli(argv: list[str], monkeypatch, capfd) -> tuple[int | None, str, str]:
    """`python -m pipeline ARGV` in this process; returns (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["pipeline", *argv])
    capfd.readouterr()
    rebind_stale_handlers()
    code = 0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="'pipeline.__main__' found in sys.modules")  # imported by other tests: harmless here
        try:
            runpy.run_module("pipeline", run_name="__main__", alter_sys=True)
        except SystemExit as e:
            code = e.code
    out, err = capfd.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def processes(request, tmp_path_factory, template, tokenizer, corpus):
    """The selected PROCESS_ROWS commands, started at once: each spends seconds importing, and need not wait for the others."""
    selected = {item.callspec.params["row"].what for item in request.session.items if getattr(item, "originalname", "") == "test_bad_input_in_a_process"}
    started = {}
    for row in (r for r in PROCESS_ROWS if r.what in selected):
        tmp = tmp_path_factory.mktemp("process")
        root, inputs, places = prepare(row, tmp, template, tokenizer, corpus)
        before = snapshot(root, inputs)
        env = {**os.environ, "PIPELINE_OUTPUTS": str(root), "WANDB_MODE": "offline"}
        with (tmp / "stdout").open("w") as out, (tmp / "stderr").open("w") as err:
            process = subprocess.Popen([sys.executable, "-m", "pipeline", *fill(row.argv, places)], cwd=REPO, env=env, stdout=out, stderr=err)
        started[row.what] = (process, tmp, root, inputs, places, before)
    yield started
    for process, *_ in started.values():
        if process.poll() is None:
            process.kill()


@pytest.mark.parametrize("row", [r.param for r in ROWS])
def test_bad_input(row: Row, tmp_path, template, tokenizer, corpus, monkeypatch, capfd, processes):
    # `processes`: the PROCESS_ROWS commands start with the first row and import while these rows run.
    root, inputs, places = prepare(row, tmp_path, template, tokenizer, corpus)
    monkeypatch.setenv("PIPELINE_OUTPUTS", str(root))
    before = snapshot(root, inputs)
    code, out, err = run_cli(fill(row.argv, places), monkeypatch, capfd)
    assert_refused(code, out, err, fill(row.words, places))
    assert_nothing_changed(before, snapshot(root, inputs), root)


@pytest.mark.parametrize("row", [r.param for r in PROCESS_ROWS])
def test_bad_input_in_a_process(row: Row, processes):
    process, tmp, root, inputs, places, before = processes[row.what]
    code = process.wait(timeout=110)
    assert_refused(code, (tmp / "stdout").read_text(), (tmp / "stderr").read_text(), fill(row.words, places))
    assert_nothing_changed(before, snapshot(root, inputs), root)


def test_every_default_config_passes_the_checks():
    """The checks refuse what is wrong, never a stage's own defaults, with any model, trainer or logger choice."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for stage in ("pretrain", "sft", "reward", "ppo", "dpo", "grpo", "distill", "prune", "generate", "export", "quantize"):
            check_config(compose("config", overrides=[f"stage={stage}"]))
        for recipe in ("instructgpt", "dpo", "grpo", "rlvr", "compare"):
            check_config(compose("config", overrides=[f"recipe={recipe}"]))
        for choice in ([], ["model=gpt2"], ["model=small"], ["trainer=ddp"], ["trainer=gpu"], ["trainer=fsdp"], ["logger=csv"]):
            check_config(compose("config", overrides=choice))  # the recipe: every stage's keys at once


@pytest.fixture(scope="module")
def composed():
    """Each stage's composed config, composed once: a VALUES case changes a copy."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        # a case's stage: a stage name, one override, or a tuple of overrides (a stage with a config group: peft=lora)
        overrides = lambda stage: list(stage) if isinstance(stage, tuple) else [stage if "=" in stage else f"stage={stage}"]  # noqa: E731
        return {stage: compose("config", overrides=overrides(stage)) for stage in {case[0] for case in VALUES}}


@pytest.mark.parametrize("stage, override, words", VALUES, ids=[f"{case[1]}" for case in VALUES])
def test_each_rule_refuses_a_bad_value(stage, override, words, composed):
    cfg = copy.deepcopy(composed[stage])
    (parsed,) = OverridesParser.create().parse_overrides([override])  # the command line's grammar and types
    OmegaConf.update(cfg, parsed.key_or_group, parsed.value(), merge=False)
    with pytest.raises(UserError) as refused:
        check_config(cfg)
    assert words in str(refused.value) and "\n" not in str(refused.value)


def test_every_rule_has_a_case():
    refused = {arg.split("=", 1)[0] for row in CONFIG for arg in row.argv} | {case[1].split("=", 1)[0] for case in VALUES}
    assert set(RULES) | set(LIGHTNING_CHOICES) <= refused | {"stage"}, sorted(set(RULES) | set(LIGHTNING_CHOICES) - refused)


def test_the_catalogue_covers_every_stage():
    stages = {next((a.split("=", 1)[1] for a in row.argv if a.startswith("stage=")), "all") for row in ROWS}
    assert {"pretrain", "sft", "reward", "ppo", "dpo", "grpo", "generate", "export", "all"} <= stages
    assert len(ROWS) + len(PROCESS_ROWS) >= 80
    assert len({row.what for row in ROWS + PROCESS_ROWS}) == len(ROWS + PROCESS_ROWS)
