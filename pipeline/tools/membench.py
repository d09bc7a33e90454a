"""Memory and step time of SFT and PPO: full finetuning, LoRA, LoRA with one shared base, QLoRA, with and without
activation checkpointing, each row a fresh `python -m pipeline` process whose run writes memory.json.

    python -m pipeline.tools.membench                                            # model=tiny, every row
    python -m pipeline.tools.membench membench.models=small,medium               # the README's table
    python -m pipeline.tools.membench membench.models=small trainer.accelerator=gpu trainer.precision=bf16-mixed

The chain, built under a throwaway folder (`membench.root=DIR` keeps it): per model, a randomly initialised
base run (a finished pretrain run: tokenizer, model.pt, metrics.json), the SFT row `sft-full` (which is also
the SFT run the others start from), the other SFT rows, a reward run with peft=none and one with peft=lora
(a few steps from that SFT run), then the PPO rows:

    sft-full, ppo-full         peft=none (PPO: actor, critic, reference and reward model, four full models)
    sft-lora, ppo-lora         peft=lora (PPO: adapters on the actor, reference = actor with adapters off; full critic and RM)
    ppo-lora-shared            peft=lora against the peft=lora reward run, ppo.share_base=true: one base under all four
    sft-qlora, ppo-qlora       peft=qlora (the actor's base in 4-bit NF4; PPO against the full reward model, as ppo-lora)

each with model.activation_checkpointing=false and =true. Every row runs `membench.steps` optimiser steps
(PPO: iterations) after one untimed warm-up step on `membench.batch_size` rows (PPO: prompts per rollout),
on the first `membench.data_rows` rows of the embedded task (or `membench.data=DIR`: DIR/sft and
DIR/preference, and DIR/prompts if there is one, in any format the stages read).

Columns (pipeline/memory.py counts them; a storage shared by several tensors counts once):
- trainable: parameters that train; params / grads / optimiser: bytes of the parameters (a 4-bit weight: its
  packed data and quantisation state), of their gradients and of the optimisers' state (AdamW: two moments
  and a step per parameter); params+optimiser, and +grads: what the models cost before activations;
- peak RSS: the peak resident set of the row's process, loading and saving included; RSS at backward: the
  largest resident set when a backward pass starts, where the step's activations are at their largest (on
  CUDA also torch.cuda.max_memory_allocated and memory_allocated at backward);
- step (s): the median seconds of an optimiser step (PPO: a rollout-and-update iteration);
- vs ppo-full: a PPO row's params+optimiser over the ppo-full row's (same model and checkpointing).
A failed row keeps its error (the tail of its stderr) and the bench goes on. Prints a markdown table and writes
<paths.root>/bench/membench.json (or membench.out=FILE). Other overrides reach every row whose config has the key.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import pipeline
from pipeline import runs
from pipeline.errors import UserError
from pipeline.files import read_json, write_json
from pipeline.memory import MEMORY_FILE

CONF_DIR = str(pipeline.CONF_DIR)
REPO = Path(pipeline.__file__).resolve().parents[1]
CHECKPOINTING = "model.activation_checkpointing"


@dataclass(frozen=True)
class Row:
    stage: str  # sft or ppo
    peft: str  # conf/peft/: none, lora, qlora
    reward: str | None = None  # PPO: the peft of the reward run it uses
    share_base: bool = False  # PPO: one base under actor, reference, critic and reward model (ppo.share_base=true)


ROWS = {
    "sft-full": Row("sft", "none"),
    "sft-lora": Row("sft", "lora"),
    "sft-qlora": Row("sft", "qlora"),
    "ppo-full": Row("ppo", "none", reward="none"),
    "ppo-lora": Row("ppo", "lora", reward="none"),
    "ppo-lora-shared": Row("ppo", "lora", reward="lora", share_base=True),
    "ppo-qlora": Row("ppo", "qlora", reward="none"),
}
DEFAULTS = {
    "models": None,  # None: model=NAME from the command line, else tiny
    "rows": ",".join(ROWS),
    "checkpointing": "false,true",
    "steps": 3,
    "batch_size": 8,
    "new_tokens": 16,
    "data_rows": 256,
    "data": None,
    "root": None,
    "out": None,
    "timeout": 3600,
}
INTEGERS = ("steps", "batch_size", "new_tokens", "data_rows", "timeout")
DATA_KINDS = ("sft", "preference", "prompts")


def parse(argv: list[str]) -> tuple[dict, list[str], list[str]]:
    """(membench settings, model names, the other overrides) of the command line."""
    settings = dict(DEFAULTS)
    rest, models = [], None
    for arg in argv:
        key, _, value = arg.partition("=")
        if key.startswith("membench."):
            name = key[len("membench.") :]
            if name not in DEFAULTS:
                raise UserError(f"{key}: unknown; the membench keys are {', '.join('membench.' + k for k in DEFAULTS)}")
            settings[name] = int(value) if name in INTEGERS else value
        elif key == "model":
            models = [value]
        else:
            rest.append(arg)
    models = settings["models"].split(",") if settings["models"] else models or ["tiny"]
    unknown = [r for r in settings["rows"].split(",") if r not in ROWS]
    if unknown:
        raise UserError(f"membench.rows: unknown rows {unknown}; the rows are {', '.join(ROWS)}")
    settings["rows"] = [r for r in ROWS if r in settings["rows"].split(",")]  # the table's order, not the command's
    flags = settings["checkpointing"].split(",")
    if not flags or any(f not in ("false", "true") for f in flags):
        raise UserError(f"membench.checkpointing={settings['checkpointing']}: a list of false and true")
    settings["checkpointing"] = [f == "true" for f in ("false", "true") if f in flags]
    return settings, models, rest


def compose_config(overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=overrides)


def has_key(cfg, key: str) -> bool:
    missing = object()
    return OmegaConf.select(cfg, key, default=missing) is not missing


def override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def row_overrides(rest: list[str], stage: str, model: str = "tiny", peft: str = "none") -> list[str]:
    """The user's overrides that the row's config has (tokenizer.* only exists in pretraining): group choices, and keys it knows."""
    cfg = compose_config([f"stage={stage}", f"model={model}", f"peft={peft}"])
    return [o for o in rest if "." not in override_key(o) or has_key(cfg, override_key(o))]


def check_overrides(rest: list[str]) -> None:
    """An override that no config of the bench has (a typo) is refused, not silently dropped from every row."""
    configs = [compose_config([f"stage={stage}", f"peft={peft}"]) for stage in ("pretrain", "sft", "reward", "ppo") for peft in ("none", "lora")]
    unknown = [o for o in rest if "." in override_key(o) and not any(has_key(c, override_key(o)) for c in configs)]
    if unknown:
        raise UserError(f"{', '.join(unknown)}: no stage the bench runs has {'these keys' if len(unknown) > 1 else 'this key'}")


def stage_config(stage: str, rest: list[str]):
    return compose_config([f"stage={stage}", *row_overrides(rest, stage)])


# ---------------------------------------------------------------------------------------------
# The chain's inputs


def base_run(chain: Path, model: str, rest: list[str]) -> tuple[Path, int]:
    """A finished pretrain run of a randomly initialised model of the config: (its directory, its parameter count).

    The tokenizer is tokenizer.path, else byte-level BPE of tokenizer.vocab_size tokens trained on the
    embedded corpus (cached under paths.cache_dir).
    """
    from pipeline.data.corpus import embedded_corpus_rows
    from pipeline.model import GPT
    from pipeline.tokenizer import cached_tokenizer, load_tokenizer, save_tokenizer
    from pipeline.training import model_config_from

    cfg = compose_config(["stage=pretrain", f"model={model}", *row_overrides(rest, "pretrain", model)])
    if cfg.tokenizer.path:
        tokenizer = load_tokenizer(cfg.tokenizer.path)
    else:
        tokenizer = cached_tokenizer(Path(cfg.paths.cache_dir), "membench|embedded corpus", lambda: [r["text"] for r in embedded_corpus_rows(seed=0)["train"]], cfg.tokenizer.vocab_size)
    torch.manual_seed(0)
    gpt = GPT(model_config_from(cfg.model, len(tokenizer)))
    run_dir = chain / model / "pretrain" / "base"
    save_tokenizer(tokenizer, run_dir / runs.TOKENIZER_DIR)
    runs.save_model(run_dir / runs.MODEL_FILE, gpt, kind="lm", stage="pretrain")
    write_json(run_dir / runs.METRICS_FILE, {"stage": "pretrain", "model/params": gpt.num_params(), "membench": "random initialisation"})
    return run_dir, gpt.num_params()


def head(path: Path, n: int) -> str:
    with path.open() as f:
        return "".join(line for _, line in zip(range(n), f))


def bench_data(settings: dict, rest: list[str], chain: Path) -> dict[str, Path]:
    """{sft, preference, prompts: data.path}: the user's membench.data, else the first rows of each split of the embedded task."""
    if settings["data"]:
        d = Path(settings["data"])
        found = {k: next((p for p in (d / k, d / f"{k}.jsonl") if p.exists()), None) for k in DATA_KINDS}
        if found["sft"] is None or found["preference"] is None:
            raise UserError(f"membench.data={d} must hold sft and preference data (sft/ or sft.jsonl, preference/ or preference.jsonl)")
        return {**found, "prompts": found["prompts"] or found["preference"]}
    from pipeline.data.corpus import embedded_task

    cache = Path(stage_config("sft", rest).paths.cache_dir)
    n = int(settings["data_rows"])
    out = {}
    for kind in DATA_KINDS:
        source = embedded_task(cache, kind)
        target = chain / "data" / kind
        target.mkdir(parents=True, exist_ok=True)
        for split, rows in (("train", n), ("validation", max(8, n // 8)), ("test", max(8, n // 8))):
            (target / f"{split}.jsonl").write_text(head(source / f"{split}.jsonl", rows))
        out[kind] = target
    return out


# ---------------------------------------------------------------------------------------------
# The rows


def stage_process(chain: Path, stage: str, name: str, args: list[str], timeout: int) -> dict:
    """One `python -m pipeline stage=...` into chain/<stage>/<name>: {run_dir, command, wall_s, memory figures} or {..., error}."""
    run_dir = chain / stage / name
    command = [sys.executable, "-m", "pipeline", f"stage={stage}", f"paths.root={chain}", f"hydra.run.dir={run_dir}", "logger=csv", "rerun=true", *args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]), "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    started = time.perf_counter()
    out = {"run_dir": str(run_dir), "command": " ".join(command[1:])}
    try:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**out, "error": f"timed out after {timeout} s (membench.timeout)"}
    out["wall_s"] = time.perf_counter() - started
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # throwaway runs: their model.pt is all the chain needs
    if result.returncode != 0:
        return {**out, "error": f"exit {result.returncode}: " + tail(result.stderr or result.stdout)}
    memory = run_dir / MEMORY_FILE
    if not memory.is_file():
        return {**out, "error": f"the run wrote no {MEMORY_FILE}"}
    return {**out, **read_json(memory)}


def tail(text: str, lines: int = 15) -> str:
    kept = [line for line in text.strip().splitlines() if line.strip()]
    return "\n".join(kept[-lines:])[-3000:]


def common_args(settings: dict, model: str, peft: str, checkpointing: bool, has_checkpointing: bool) -> list[str]:
    # Off: the key only where it exists (its default is off); on: always, so a config without it fails loudly.
    flag = [f"{CHECKPOINTING}={str(checkpointing).lower()}"] if checkpointing or has_checkpointing else []
    return [f"model={model}", f"peft={peft}", *flag]


def sft_args(settings: dict, data: dict, init_from: Path) -> list[str]:
    steps = int(settings["steps"]) + 1  # one untimed warm-up step
    return [
        f"init_from={init_from}", f"data.path={data['sft']}", f"data.batch_size={settings['batch_size']}",
        f"trainer.max_steps={steps}", f"trainer.val_check_interval={steps}", "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1", "eval.gold=false",
    ]


def reward_args(settings: dict, data: dict, init_from: Path, peft: str) -> list[str]:
    return [
        f"init_from={init_from}", f"peft={peft}", f"data.path={data['preference']}", f"data.batch_size={settings['batch_size']}",
        "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1",
        "reward.policy_pairs=0", "reward.policy_pairs_test=0",
    ]


def ppo_args(settings: dict, data: dict, init_from: Path, reward_from: Path, share_base: bool) -> list[str]:
    batch = int(settings["batch_size"])
    return [
        f"init_from={init_from}", f"reward_from={reward_from}", f"data.path={data['prompts']}",
        f"ppo.iterations={int(settings['steps']) + 1}", f"ppo.rollout_batch_size={batch}", f"ppo.minibatch_size={max(1, batch // 2)}",
        "ppo.ppo_epochs=1", f"ppo.max_new_tokens={settings['new_tokens']}", "ppo.eval_prompts=1", "ppo.eval_every=1000000", "ppo.save_every=1000000",
        "eval.gold=false", *(["ppo.share_base=true"] if share_base else []),
    ]


def bench_model(settings: dict, model: str, rest: list[str], chain: Path, data: dict) -> tuple[list[dict], int]:
    """Every selected row of one model config, in order: (rows, the model's parameter count)."""
    base, params = base_run(chain, model, rest)
    has_checkpointing = has_key(compose_config(["stage=sft", f"model={model}"]), CHECKPOINTING)
    timeout = int(settings["timeout"])
    wanted = [(name, flag) for name in settings["rows"] for flag in settings["checkpointing"]]
    done: dict[tuple[str, bool], dict] = {}
    rewards: dict[str, dict] = {}  # the reward runs, by peft

    def run_row(name: str, flag: bool) -> dict:
        row = ROWS[name]
        label = f"{name}{'-ckpt' if flag else ''}"
        info = {"model": model, "row": name, "stage": row.stage, "peft": row.peft, "share_base": row.share_base, "activation_checkpointing": flag}
        args = [*row_overrides(rest, row.stage, model, row.peft), *common_args(settings, model, row.peft, flag, has_checkpointing)]
        if row.stage == "sft":
            args += sft_args(settings, data, base)
        else:
            sft_run, reward_run = done.get(("sft-full", False), {}), rewards.get(row.reward, {})
            if "error" in sft_run or "error" in reward_run:
                failed, why = ("sft-full", sft_run) if "error" in sft_run else (f"the peft={row.reward} reward run", reward_run)
                return {**info, "error": f"{why['error']}\n{failed} failed, which this row starts from"}
            args += ppo_args(settings, data, Path(sft_run["run_dir"]), Path(reward_run["run_dir"]), row.share_base)
        print(f"membench: {model} {label} ...", file=sys.stderr, flush=True)
        result = {**info, **stage_process(chain / model, row.stage, label, args, timeout)}
        print(f"membench: {model} {label}: {'failed: ' + result['error'].splitlines()[-1] if 'error' in result else 'done in %.0f s' % result['wall_s']}", file=sys.stderr, flush=True)
        return result

    done[("sft-full", False)] = run_row("sft-full", False)  # the SFT run every reward and PPO row starts from
    for name, flag in wanted:
        if ROWS[name].stage == "sft" and (name, flag) not in done:
            done[(name, flag)] = run_row(name, flag)
    for peft in sorted({ROWS[n].reward for n, _ in wanted if ROWS[n].reward}, key=["none", "lora"].index):
        sft_run = done[("sft-full", False)]
        if "error" in sft_run:
            rewards[peft] = {"error": "sft-full failed"}
            continue
        args = [*row_overrides(rest, "reward", model, peft), *common_args(settings, model, peft, False, has_checkpointing), *reward_args(settings, data, Path(sft_run["run_dir"]), peft)]
        print(f"membench: {model} reward run, peft={peft} ...", file=sys.stderr, flush=True)
        rewards[peft] = stage_process(chain / model, "reward", f"reward-{peft}", args, timeout)
        if "error" in rewards[peft]:
            print(f"membench: {model} reward run, peft={peft}: failed: {rewards[peft]['error']}", file=sys.stderr, flush=True)
    for name, flag in wanted:
        if (name, flag) not in done:
            done[(name, flag)] = run_row(name, flag)
    rows = [done[key] for key in wanted]
    for r in rows:
        if r["stage"] == "ppo" and "error" not in r:
            full = [done.get(("ppo-full", f)) for f in (r["activation_checkpointing"], not r["activation_checkpointing"])]
            full = next((f for f in full if f and "error" not in f), None)
            r["ratio_to_ppo_full"] = r["param_optimizer_bytes"] / full["param_optimizer_bytes"] if full else None
    return rows, params


# ---------------------------------------------------------------------------------------------
# The table


def size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n:,}"


def markdown(rows: list[dict], cuda: bool) -> str:
    columns = [
        "model", "row", "act. ckpt", "trainable", "params", "grads", "optimiser", "params+optimiser", "+grads", "peak RSS", "RSS at backward",
        *(["CUDA peak", "CUDA at backward"] if cuda else []), "step (s)", "vs ppo-full",
    ]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = [r["model"], r["row"], "yes" if r["activation_checkpointing"] else "no"]
        if "error" in r:
            cells += ["failed: " + r["error"].splitlines()[-1].replace("|", "/")[:120]] + [""] * (len(columns) - 4)
        else:
            ratio = r.get("ratio_to_ppo_full")
            cells += [
                count(r["trainable_params"]), size(r["param_bytes"]), size(r["grad_bytes"]), size(r["optimizer_bytes"]),
                size(r["param_optimizer_bytes"]), size(r["param_grad_optimizer_bytes"]), size(r["peak_rss_bytes"]), size(r.get("rss_at_backward_bytes")),
                *([size(r.get("cuda_max_allocated_bytes")), size(r.get("cuda_at_backward_bytes"))] if cuda else []),
                f"{r['step_s']:.3f}" if r.get("step_s") is not None else "-",
                f"{ratio:.1%}" if ratio is not None else "",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def device_name(rest: list[str]) -> str:
    cfg = stage_config("sft", rest)
    if torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda"):
        return torch.cuda.get_device_name()
    threads = os.environ.get("OMP_NUM_THREADS") or str(torch.get_num_threads())
    return f"cpu ({threads} threads, {os.cpu_count()} cores)"


def main(argv: list[str]) -> dict:
    settings, models, rest = parse(argv)
    check_overrides(rest)
    cfg = stage_config("sft", rest)
    out = Path(settings["out"]) if settings["out"] else Path(cfg.paths.root) / "bench" / "membench.json"
    keep = bool(settings["root"])
    if keep:
        chain = Path(settings["root"]).resolve()
        chain.mkdir(parents=True, exist_ok=True)
    else:
        # Beside the outputs, not in /tmp (often RAM): the larger configs' runs are gigabytes.
        (Path(cfg.paths.root) / "bench").mkdir(parents=True, exist_ok=True)
        chain = Path(tempfile.mkdtemp(prefix="membench-", dir=Path(cfg.paths.root) / "bench")).resolve()
    started = time.perf_counter()
    try:
        data = bench_data(settings, rest, chain)
        rows, params = [], {}
        for model in models:
            model_rows, params[model] = bench_model(settings, model, rest, chain, data)
            rows += model_rows
    finally:
        if not keep:
            shutil.rmtree(chain, ignore_errors=True)
    result = {
        "device": device_name(rest),
        "models": params,
        "settings": {k: settings[k] for k in ("steps", "batch_size", "new_tokens", "data_rows", "data")},
        "overrides": rest,
        "wall_s": time.perf_counter() - started,
        "rows": rows,
    }
    cuda = any(r.get("cuda_max_allocated_bytes") for r in rows)
    print(f"\nmemory on {result['device']}: " + ", ".join(f"{m} {count(n)} parameters" for m, n in params.items()))
    print(f"{settings['steps']} timed steps after 1 warm-up, batch {settings['batch_size']}; PPO: {settings['new_tokens']} new tokens, minibatches of {max(1, settings['batch_size'] // 2)}, 1 epoch\n")
    print(markdown(rows, cuda))
    write_json(out, result)
    print(f"\nwritten to {out}")
    return result


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
