"""Run directories, lineage between stages, and the model files that pass from one stage to the next.

Layout of one stage run (Hydra creates the directory, named after the command-line overrides):

    outputs/<stage>/<run name>/
        .hydra/            the composed config and the overrides
        checkpoints/       Lightning checkpoints: last.ckpt (resume) and best.ckpt
        tokenizer/         the tokenizer the model was trained with
        model.pt           the finished model: config + weights (+ extra such as reward normalisation)
        metrics.json       the stage's final figures; its presence marks the run as finished

An export run (`stage=export`) holds hf/ (a transformers folder) and metrics.json instead. Every
stage's init_from also takes a transformers folder (pipeline/model/hf.py maps it to our model).
Which stage a stage starts from is the registry's business (pipeline/stages/__init__.py); the
functions here take the candidate stages as arguments.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
from pathlib import Path
from typing import Sequence

import torch

from pipeline.errors import UserError
from pipeline.files import UnsafeFileError, atomic_write_bytes, load_tensors
from pipeline.model import quant
from pipeline.model.gpt import GPT, GPTConfig, ScalarGPT
from pipeline.model.hf import grow_vocab, is_transformers_dir, load_transformers
from pipeline.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
MODEL_FILE = "model.pt"
TOKENIZER_DIR = "tokenizer"
# The layout of model.pt; a file written by a newer pipeline (a higher number) is refused, not misread.
# 2: a quantised model (payload["quant"], pipeline/model/quant.py). Plain files are still written as 1,
# which every pipeline reads; a quantised one is refused by the pipelines that could only misread it.
FORMAT_VERSION = 2
PLAIN_FORMAT = 1


def run_name(override_dirname: str) -> str:
    """Directory name for a run: 'default' without overrides, else the overrides made path-safe.

    `key=value,key=value` becomes `key_value_key_value`, which can be passed back on the command line
    unquoted. Long names, or names that lose more than `=` and `,` (data.path=/some/file), keep a
    readable prefix and gain a hash of the whole, so two different commands never share a directory.
    """
    if not override_dirname:
        return "default"
    plain = override_dirname.replace("=", "_").replace(",", "_")
    safe = re.sub(r"[^A-Za-z0-9._+-]+", "_", plain)
    if len(safe) <= 80 and safe == plain:
        return safe
    digest = hashlib.sha1(override_dirname.encode()).hexdigest()[:10]
    return f"{safe[:60]}-{digest}"


def is_finished(run_dir: Path) -> bool:
    return (Path(run_dir) / METRICS_FILE).is_file() and (Path(run_dir) / MODEL_FILE).is_file()


def newest_finished_run(root: Path, stage: str) -> Path | None:
    """The most recently finished run of a stage under root, judged by the time metrics.json was written."""
    stage_dir = Path(root) / stage
    if not stage_dir.is_dir():
        return None
    finished = [d for d in stage_dir.iterdir() if d.is_dir() and is_finished(d)]
    return max(finished, key=lambda d: (d / METRICS_FILE).stat().st_mtime, default=None)


def resolve_start(given: str | None, sources: Sequence[str], root: Path, stage: str, key: str = "init_from", run_name: str | None = None) -> Path:
    """The model file a stage starts from, and one line saying which and why.

    `given` if set; else the run of the same name in the first of `sources` that has one finished
    (`sft/default` for `ppo/default`: the runs of one command line belong together); else the newest
    finished run of the first source that has one. When that newest run is a trial of a sweep, the
    sweep's best trial by its objective is taken instead (never silently the latest trial), and where
    no objective ranks the trials the user is asked to name one.
    """
    if given:
        path, why = model_file(Path(given)), "given"
    else:
        path, why = implicit_parent(sources, Path(root), stage, key, run_name)
    log.info("%s: %s=%s (%s)", stage, key, path, why)
    return path


def implicit_parent(sources: Sequence[str], root: Path, stage: str, key: str, run_name: str | None) -> tuple[Path, str]:
    for source in sources:
        if run_name and is_finished(root / source / run_name):
            return root / source / run_name / MODEL_FILE, f"the {source} run of the same name"
    for source in sources:
        run = newest_finished_run(root, source)
        if run is None:
            continue
        if not is_sweep_trial(run):
            return run / MODEL_FILE, f"the newest finished {source} run"
        best, why = best_trial(root / source, source, key)
        return best / MODEL_FILE, why
    raise UserError(
        f"no finished {'/'.join(sources)} run under {Path(root)} for stage '{stage}' to start from: "
        f"run `python -m pipeline stage={sources[0]}` first, or pass {key}=PATH"
    )


def run_config(run_dir: Path, name: str = "config.yaml") -> dict:
    """A run's saved Hydra file (.hydra/config.yaml or hydra.yaml) as plain data; empty when absent or unreadable."""
    from omegaconf import OmegaConf

    path = Path(run_dir) / ".hydra" / name
    try:
        return OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else {}
    except Exception:
        return {}


def is_sweep_trial(run_dir: Path) -> bool:
    return run_config(run_dir, "hydra.yaml").get("hydra", {}).get("mode") == "MULTIRUN"


def best_trial(stage_dir: Path, source: str, key: str) -> tuple[Path, str]:
    """The best finished sweep trial of a stage by the objective its config names (`objective`, `objective_direction`)."""
    from pipeline.files import read_json

    trials = [d for d in stage_dir.iterdir() if d.is_dir() and is_finished(d) and is_sweep_trial(d)]
    scored = []
    for trial in trials:
        cfg = run_config(trial)
        objective, direction = cfg.get("objective"), cfg.get("objective_direction", "maximize")
        value = read_json(trial / METRICS_FILE).get(objective) if objective else None
        if isinstance(value, (int, float)):
            scored.append((value if direction == "maximize" else -value, trial, objective, direction))
    if not scored:
        raise UserError(
            f"the newest {source} runs under {stage_dir} are trials of a sweep without an objective to rank them; "
            f"name the one to start from with {key}=PATH"
        )
    _, trial, objective, direction = max(scored, key=lambda t: t[0])
    return trial, f"the best of {len(trials)} {source} sweep trials by {objective} ({direction})"


def digest(path: Path) -> str:
    """sha256 of a model file, or of every file of a folder (a transformers model), in name order: what a run started from."""
    h = hashlib.sha256()
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with f.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def parent_record(**parents: Path) -> dict:
    """{key: {"path": ..., "sha256": ...}} for metrics.json: which files, byte for byte, a run started from."""
    return {key: {"path": str(path), "sha256": digest(path)} for key, path in parents.items() if path is not None}


def check_parents(run_dir: Path, record: dict) -> None:
    """A run directory remembers its parents' digests; resuming it from other parents is refused, not mixed.

    Its checkpoints and its cached samples (the reward stage's policy pairs, the starting gold
    score) were made from those parents, so a run from new parents must start afresh (`rerun=true`).
    """
    from pipeline.files import read_json, write_json

    path = Path(run_dir) / "parents.json"
    if path.is_file():
        saved = read_json(path)
        changed = [k for k in record if k in saved and saved[k]["sha256"] != record[k]["sha256"]]
        if changed:
            details = "; ".join(f"{k}={record[k]['path']} differs from the {saved[k]['path']} it started from" for k in changed)
            raise UserError(f"{run_dir} holds a run started from other parents ({details}): pass rerun=true to start it again")
    write_json(path, record)


def model_file(path: Path) -> Path:
    """Accept a run directory, a model.pt, a Lightning .ckpt or a transformers folder and return what to load."""
    if path.is_dir():
        if (path / MODEL_FILE).is_file():
            return path / MODEL_FILE
        if is_transformers_dir(path):
            return path
        if is_transformers_dir(path / "hf"):  # an export run's directory
            return path / "hf"
        raise UserError(f"init_from={path} is a directory without {MODEL_FILE} or config.json: is it a finished stage run or a transformers model folder?")
    if not path.is_file():
        raise UserError(f"init_from={path}: no such file or directory")
    return path


def save_model(path: Path, model: GPT, kind: str, stage: str, extra: dict | None = None, base: Path | None = None) -> dict | None:
    """Write a finished model (config + weights, float32 for portability) atomically.

    A LoRA model (peft=lora / qlora) is written as its adapter: the adapter tensors (and a reward
    model's score head), its settings, `base` (the model file it was trained on) and the digest of
    that base, which load_model_payload checks before it merges the two. Returns that LoRA record
    (settings, base, base_sha256), None for a plain model.

    A quantised model (stage=quantize) is written as plain tensors too: its integer weights and
    scales under "quant_state", the rest in the dtype it computes in (not float32: the file holds
    exactly what the model computes with), its settings under "quant"; see pipeline/model/quant.py.
    """
    data, lora = encode_model(model, kind, stage, extra, base)
    atomic_write_bytes(Path(path), data)
    return lora


def encode_model(model: GPT, kind: str, stage: str, extra: dict | None = None, base: Path | None = None) -> tuple[bytes, dict | None]:
    """The bytes save_model writes, and its LoRA record: a model file's size is len() of them."""
    if quant.is_quantized(model):
        payload = {
            "format": FORMAT_VERSION, "config": model.config.to_dict(), "state_dict": quant.float_state(model), "kind": kind, "stage": stage,
            "extra": extra or {}, "quant": quant.record(model), "quant_state": model.quant_state,
        }
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        return buffer.getvalue(), None
    lora = None
    if getattr(model, "lora_settings", None) is not None:
        from pipeline.model.lora import adapter_state_dict, base_digest  # peft: imported only for LoRA runs

        if base is None:
            raise ValueError("save_model: a LoRA model needs the path of its base model")
        lora = {"settings": model.lora_settings.to_dict(), "base": str(Path(base).resolve()), "base_sha256": base_digest(model)}
        state = adapter_state_dict(model)
    else:
        state = model.state_dict()
    state = {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu() for k, v in state.items()}
    payload = {"format": PLAIN_FORMAT, "config": model.config.to_dict(), "state_dict": state, "kind": kind, "stage": stage, "extra": extra or {}}
    if lora is not None:
        payload["lora"] = lora
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue(), lora


def merged_lora_payload(payload: dict, path: Path) -> dict:
    """A LoRA model file read as a plain one: its base loaded (itself merged if it is LoRA), checked by digest, the adapter merged in."""
    from pipeline.model.lora import LoraSettings, apply_lora, base_digest, load_adapter_state_dict, merge_lora

    info = payload["lora"]
    base_path = Path(info["base"])
    if not base_path.exists():
        raise UserError(f"{path} is a LoRA adapter trained on {base_path}, which is not there any more: restore that run, or start from a merged export")
    base = load_model_payload(model_file(base_path))
    cls = ScalarGPT if payload.get("kind") == "scalar" else GPT
    with torch.random.fork_rng(devices=[]):  # building the model must not move the caller's random stream
        model = cls(GPTConfig.from_dict(payload["config"]))
    load_weights(model, base["state_dict"], base_path, allow_missing=("score_head.",))
    apply_lora(model, LoraSettings.from_dict(info["settings"]))
    if base_digest(model) != info["base_sha256"]:
        raise UserError(f"{path} is a LoRA adapter for another base: {base_path} has changed since the adapter was trained on it (digest mismatch)")
    try:
        load_adapter_state_dict(model, payload["state_dict"])
    except ValueError as e:
        raise UserError(f"{path}: {e}") from None
    merged = merge_lora(model)
    # adapter_state_dict: the file's own tensors, for a reader that keeps the adapter apart (PPO's shared base, the peft export)
    return {**payload, "state_dict": merged.state_dict(), "lora": info, "adapter_state_dict": payload["state_dict"]}


def load_model_payload(path: Path) -> dict:
    """Read a model.pt, the weights inside a Lightning checkpoint of one of our stages, or a transformers folder."""
    path = Path(path)
    if is_transformers_dir(path):
        return load_transformers(path)
    payload = load_file(path, "model file")
    if isinstance(payload, dict) and "config" in payload and "state_dict" in payload:
        if int(payload.get("format", 1)) > FORMAT_VERSION:
            raise UserError(f"{path} was written by a newer version of the pipeline (model file format {payload['format']}; this one reads up to {FORMAT_VERSION}): upgrade it")
        if "lora" in payload:
            return merged_lora_payload(payload, path)
        return payload
    if isinstance(payload, dict) and "state_dict" in payload and "hyper_parameters" in payload:
        hp = payload["hyper_parameters"]
        if "model_config" in hp:
            config, prefix, kind = hp["model_config"], "model.", hp.get("model_kind", "lm")
        elif "actor_config" in hp:  # the PPO stage's: the policy (actor) is the model it carries forward
            config, prefix, kind = hp["actor_config"], "actor.", "lm"
        else:
            raise UserError(f"{path} is a Lightning checkpoint without a model_config (or PPO actor_config) hyper-parameter")
        state = {k[len(prefix) :]: v for k, v in payload["state_dict"].items() if k.startswith(prefix)}
        if any(".lora_" in k for k in state):
            raise UserError(f"{path} is a checkpoint of a LoRA run (adapters only): start from that run's directory or model.pt, which knows its base")
        return {"config": config, "state_dict": state, "kind": kind, "extra": {}}
    raise UserError(f"{path} is neither a model.pt of this pipeline nor a Lightning checkpoint of one of its stages")


def load_file(path: Path, what: str = "file") -> object:
    """A model file or checkpoint through load_tensors: one clear error for an unsafe, truncated or foreign file."""
    try:
        return load_tensors(path)
    except UnsafeFileError as e:
        raise UserError(str(e)) from None
    except FileNotFoundError:
        raise UserError(f"{what} {path}: no such file") from None
    except Exception as e:  # a truncated or foreign file: say which
        raise UserError(f"cannot read {what} {path}: {type(e).__name__}: {e}") from None


def build_model(payload: dict, cls: type[GPT] = GPT, source: Path | str = "", **config_updates) -> GPT:
    """Instantiate cls from a payload and load its weights; a head the file lacks (a new score head) stays initialised.

    A quantised payload gives the torchao-quantised model that the quantize stage measured (build_quantized).
    """
    config = GPTConfig.from_dict({**payload["config"], **config_updates})
    if "quant" in payload:
        return build_quantized(payload, cls, config, source)
    model = cls(config)
    load_weights(model, payload["state_dict"], source, allow_missing=("score_head.",))
    return model


def build_quantized(payload: dict, cls: type[GPT], config: GPTConfig, source: Path | str) -> GPT:
    """The quantised GPT of a quantize run's file: a float model cast to the file's dtype, its float tensors loaded, its integer weights installed as torchao tensors."""
    if cls is not GPT:
        raise UserError(f"{source} is a quantised language model: it cannot be loaded as a {cls.__name__} (a reward or value model)")
    try:
        settings = quant.QuantSettings.from_dict(payload["quant"]["settings"])
        state = payload["quant_state"]
        quant.require_torchao(source)
        with torch.random.fork_rng(devices=[]):  # building the model must not move the caller's random stream
            model = cls(config)
        quant.cast_weights(model, settings.torch_dtype)
        load_weights(model, payload["state_dict"], source, allow_missing=tuple(f"{name}.weight" for name in state))
        return quant.install(model, state, settings).eval()
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{source} is a quantised model file that cannot be read: {type(e).__name__}: {e}") from None


def load_weights(model: torch.nn.Module, state: dict, source: Path | str, allow_missing: tuple[str, ...] = ()) -> None:
    """load_state_dict with a message that names the mismatched keys and shapes instead of torch's wall of text."""
    own = model.state_dict()
    mismatched = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state and not k.startswith(allow_missing)]
    # A ScalarGPT file loaded into a plain GPT carries a score head that the language model does not use.
    unexpected = [k for k in state if k not in own and not k.startswith("score_head.")]
    if mismatched or missing or unexpected:
        details = "; ".join(
            part
            for part in (
                f"shape mismatch {mismatched[:4]}" if mismatched else "",
                f"missing {missing[:4]}" if missing else "",
                f"unexpected {unexpected[:4]}" if unexpected else "",
            )
            if part
        )
        raise UserError(f"the weights in {source} do not fit the model architecture ({details})")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


def load_start(init_from: str | None, sources: Sequence[str], root: Path, stage: str, cls: type[GPT] = GPT, run_name: str | None = None, key: str = "init_from", **config_updates):
    """What a stage starts from: (model, tokenizer, payload, path), from init_from or the parent run resolve_start picks.

    The tokenizer is the one saved beside the model (run_dir/tokenizer/), or a transformers folder's
    own, so a stage can never pair weights with a different vocabulary.
    """
    path = resolve_start(init_from, sources, root, stage, key=key, run_name=run_name)
    payload = load_model_payload(path)
    if "quant" in payload:
        refuse_quantized_training(payload, path, stage, key)
    tokenizer = load_start_tokenizer(path)
    vocab_size = payload["config"]["vocab_size"]
    if len(tokenizer) > vocab_size and path.is_dir():
        # A foreign tokenizer gained our pad, BOS and role tokens in load_tokenizer: give them embedding rows.
        payload = grow_vocab(payload, len(tokenizer))
    elif len(tokenizer) > vocab_size:
        raise UserError(f"the tokenizer beside {path} has {len(tokenizer)} tokens, more than the model's vocab_size={vocab_size}")
    model = build_model(payload, cls, path, **config_updates)
    return model, tokenizer, payload, path


def refuse_quantized_training(payload: dict, path: Path, stage: str, key: str = "init_from") -> None:
    """A quantised model is for reading (generate, export, serve): a stage that trains needs the float weights it was made from.

    Which stages train is the registry's (pipeline/stages/__init__.py) to say; it imports nothing of the pipeline.
    """
    from pipeline.stages import STAGES

    if stage in STAGES and STAGES[stage].trains:
        method = payload["quant"].get("settings", {}).get("method", "?")
        source = payload.get("extra", {}).get("source")
        start = f"start from {source}, the float model it was quantised from" if source else "start from the float model it was quantised from"
        raise UserError(f"{key}={path} is a quantised model ({method}, stage=quantize): stage '{stage}' trains, which needs float weights; {start}")


def tokenizer_dir_of(path: Path) -> Path:
    """The tokenizer folder that belongs to a model file: run_dir/tokenizer/, or a transformers folder itself."""
    path = Path(path)
    candidates = [path] if path.is_dir() else [path.parent / TOKENIZER_DIR, path.parent.parent / TOKENIZER_DIR]
    found = next((c for c in candidates if c.is_dir()), None)
    if found is None:
        raise UserError(f"no {TOKENIZER_DIR}/ folder beside {path}: a stage run saves its tokenizer there")
    return found


def load_start_tokenizer(path: Path):
    return load_tokenizer(tokenizer_dir_of(path))


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of what decides the token ids: the vocabulary and merges, the special tokens and the chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    extra = repr((tokenizer.all_special_tokens, getattr(tokenizer, "chat_template", None)))
    return hashlib.sha256((body + extra).encode()).hexdigest()
