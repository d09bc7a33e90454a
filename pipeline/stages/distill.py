"""Knowledge distillation: a smaller student learns a finished policy, the teacher, on prompts.

    python -m pipeline stage=distill                                   # teacher: the newest ppo run (else grpo, dpo, sft); student: conf/model/student.yaml, fresh
    python -m pipeline stage=distill model=tiny model.n_layer=1        # a student of any architecture (the model group)
    python -m pipeline stage=distill init_from=outputs/pretrain/small  # a student that starts from a run (it must share the teacher's tokenizer)
    python -m pipeline stage=distill teacher_from=outputs/sft/default distill.lmbda=1 distill.beta=0.9   # on-policy, JSD(0.9): GKD
    python -m pipeline stage=distill data.path=prompts.jsonl           # the user's prompts (prompt-only, prompt-completion or preference data)
    python -m pipeline stage=generate init_from=outputs/distill/default prompt="Reverse the order of these words: tea, plum"

The teacher is `teacher_from=` (else the registry's inputs: the newest finished ppo, grpo, dpo or sft
run), frozen. The student is `init_from=` when given, else a fresh model of the `model=` group
(conf/model/student.yaml by default: half the default policy's parameters, in half its layers). Both
use the teacher's tokenizer. What the student learns from, the loss and its settings
(`distill.lmbda`: on-policy share, `distill.beta`: forward KL / JSD / reverse KL, `distill.temperature`,
`distill.nll_weight`) are pipeline/distillation.py's; the arithmetic is pipeline/losses/distill.py.

metrics.json holds, on the gold judge's held-out prompts (eval.num_prompts, greedy answers, as SFT
scores): gold/teacher, gold/start (the student before) and gold/final (after); kl/start and kl/final,
the student's KL to the teacher in nats per answer (its own samples at temperature 1, each position's
exact KL: evaluate.sampled_kl(exact=True)); params/teacher, params/student and their ratio;
perf/{teacher,student}_tokens_per_s_b{B} and perf/speedup_b{B} (evaluate.tokens_per_s: greedy, the
same prompts, the two models timed in turn, at each distill.bench.batch_sizes); the training figures
(val/loss, train/steps, perf/tokens_per_s) and time/total_s. The student is model.pt (stage "distill":
generate, serve and export read it as an instruction-tuned policy).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig

from pipeline import runs
from pipeline.data.chat import prompt_ids
from pipeline.distillation import Prompts, answer, check_pair, distill_prompts, held_out_figures, train_student
from pipeline.errors import UserError
from pipeline.evaluate import gold_eval, gold_prompts, speed_figures
from pipeline.files import read_json, write_json
from pipeline.model import GPT, GPTConfig, prune
from pipeline.stages import STAGES
from pipeline.training import finish, is_global_zero, log_table, lora_settings, model_config_from, resume_checkpoint

log = logging.getLogger(__name__)

START_FILE = "distill_start.json"


def load_teacher(cfg: DictConfig, root: Path, run_name: str) -> tuple[GPT, object, Path]:
    """(teacher, its tokenizer, its path): teacher_from=, else the newest finished run the registry names; a reward model is refused."""
    teacher, tokenizer, payload, path = runs.load_start(cfg.teacher_from, STAGES["distill"].inputs["teacher_from"], root, "distill", run_name=run_name, key="teacher_from", dropout=0.0)
    if payload.get("kind") == "scalar":
        raise UserError(f"teacher_from={path} is a reward model (a scalar head), not a policy: the teacher is a ppo, grpo, dpo or sft run")
    return teacher.eval(), tokenizer, path


def student_init(cfg: DictConfig, teacher: GPT, config: GPTConfig) -> bool:
    """Whether a fresh student starts as the teacher pruned to its shape (distill.student_init; auto: where its shape is a part of the teacher's)."""
    init = str(cfg.distill.student_init)
    why = prune.shape_mismatch(teacher.config, config)
    if init == "teacher" and why:
        raise UserError(f"distill.student_init=teacher: the student (model={cfg.model.get('name', '...')}) is not a part of the teacher's shape: {why}; pass distill.student_init=fresh")
    if init == "auto" and why:
        log.info("distill: the student starts fresh (its shape is not a part of the teacher's: %s)", why)
    return init == "teacher" or (init == "auto" and not why)


def pruned_teacher(cfg: DictConfig, teacher: GPT, config: GPTConfig, prompts: list[list[int]], tokenizer) -> tuple[GPT, dict]:
    """The teacher pruned to the student's shape (Minitron's start): blocks by Block Influence, head groups and MLP channels
    by Wanda, on distill.calibration_prompts training prompts followed by the teacher's greedy answers."""
    started = time.time()
    n = min(int(cfg.distill.calibration_prompts), len(prompts))
    chosen = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(int(cfg.seed) + 1))[:n].tolist()
    calibration_prompts = [prompts[i] for i in chosen]
    device = next(teacher.parameters()).device
    answers = answer(teacher, calibration_prompts, int(cfg.distill.max_new_tokens), 0.0, tokenizer.eos_token_id, tokenizer.pad_token_id, int(cfg.seed), int(cfg.distill.generate_batch_size), device)
    calibration = prune.calibrate(teacher, [p + a for p, a in zip(calibration_prompts, answers)], tokenizer.pad_token_id)
    plan = prune.plan_for_config(teacher, config, prune.importance(teacher, "wanda", calibration))
    with torch.random.fork_rng(devices=[]):
        student = GPT(config)
    student.load_state_dict(prune.apply_plan(teacher, plan).state_dict())  # the student's own config (mlp_ratio as given), the kept weights
    record = {"kept_blocks": plan.blocks, "calibration_tokens": calibration.tokens, "seconds": time.time() - started}
    log.info("distill: the student starts as the teacher pruned to its shape: blocks %s of %d kept, %d parameters (%.1f s)", plan.blocks, teacher.config.n_layer, student.num_params(), record["seconds"])
    return student.train(), record


def load_student(cfg: DictConfig, root: Path, tokenizer, teacher: GPT, teacher_path: Path) -> tuple[GPT, Path | None]:
    """(student, the path it starts from or None): init_from= (sharing the teacher's tokenizer), else a model of cfg.model's config
    with the teacher's vocabulary, its weights not yet set (student_init decides: the pruned teacher or the fresh draw)."""
    if not cfg.init_from:
        config = model_config_from(cfg.model, len(tokenizer))
        config = GPTConfig.from_dict({**config.to_dict(), "vocab_size": teacher.config.vocab_size, "dropout": 0.0})  # the teacher's rows, even where its vocabulary was padded otherwise
        return GPT(config), None
    student, student_tokenizer, payload, path = runs.load_start(cfg.init_from, (), root, "distill", dropout=0.0)
    if payload.get("kind") == "scalar":
        raise UserError(f"init_from={path} is a reward model (a scalar head), not a language model to start the student from")
    if runs.tokenizer_fingerprint(student_tokenizer) != runs.tokenizer_fingerprint(tokenizer):
        raise UserError(
            f"init_from={path} uses another tokenizer than the teacher teacher_from={teacher_path}: the student learns the teacher's "
            f"next-token distributions and must share its vocabulary; start the student from a run of the teacher's tokenizer, or fresh (no init_from)"
        )
    check_pair(student, teacher, f"init_from={path}", f"teacher_from={teacher_path}")
    log.info("distill: the student starts from init_from=%s (the model group is not used)", path)
    return student, path


def run(cfg: DictConfig, run_dir: Path) -> dict:
    started = time.time()
    pl.seed_everything(cfg.seed, workers=True)
    if lora_settings(cfg) is not None:
        raise UserError(f"stage=distill trains the whole student: peft={cfg.peft.method} is not supported here; pass peft=none")
    root = Path(cfg.paths.root)
    teacher, tokenizer, teacher_path = load_teacher(cfg, root, run_dir.name)
    student, student_path = load_student(cfg, root, tokenizer, teacher, teacher_path)
    parents = runs.parent_record(teacher_from=teacher_path, init_from=student_path)
    runs.check_parents(run_dir, parents)
    block = min(student.config.block_size, teacher.config.block_size)
    prompts: Prompts = distill_prompts(cfg, cfg.distill, tokenizer, block, "distill")
    init = "init_from" if student_path else "fresh"
    if not student_path and student_init(cfg, teacher, student.config):
        student, pruning = pruned_teacher(cfg, teacher, student.config, prompts.train, tokenizer)
        init = "teacher"
    gold = gold_prompts(cfg)
    kl_prompts = [prompt_ids(tokenizer, p) for p in gold] if gold else prompts.held_out[: int(cfg.eval.num_prompts)]
    metrics: dict = {
        "stage": "distill",
        "data": prompts.source,
        "teacher_from": str(teacher_path),
        "init_from": str(student_path) if student_path else None,
        "parents": parents,
        "student/config": student.config.to_dict(),
        "student/init": init,
        **({"student/kept_blocks": pruning["kept_blocks"]} if init == "teacher" else {}),
        "params/teacher": teacher.num_params(),
        "params/student": student.num_params(),
        "params/ratio": student.num_params() / teacher.num_params(),
    }

    start_file = run_dir / START_FILE
    if is_global_zero() and not resume_checkpoint(cfg, run_dir, student.config.to_dict()) and not start_file.is_file():
        start = held_out_figures(cfg, student, teacher, tokenizer, gold, kl_prompts, "start")
        if gold:
            start["gold/teacher"], start["rows/teacher"] = gold_eval(teacher, tokenizer, gold, int(cfg.eval.max_new_tokens), int(cfg.eval.batch_size))
        write_json(start_file, start)  # a resumed run reports the start it had
        log.info("distill: before training, gold %s (teacher %s), KL to the teacher %.3f nats", start.get("gold/start"), start.get("gold/teacher"), start["kl/start"])

    trainer, figures = train_student(cfg, cfg.distill, run_dir, student, teacher, tokenizer, prompts, [p for p in (teacher_path, student_path) if p], "distill")
    if not trainer.is_global_zero:
        return {}
    device = next(student.parameters()).device
    teacher.to(device)
    start = read_json(start_file) if start_file.is_file() else {}
    final = held_out_figures(cfg, student, teacher, tokenizer, gold, kl_prompts, "final")
    metrics.update({k: v for k, v in {**start, **final}.items() if not k.startswith("rows/")})
    metrics.update(figures)
    if gold:
        rows = [
            [t["prompt"], t["response"], t["gold"], s["response"], s["gold"], f["response"], f["gold"]]
            for t, s, f in zip(start.get("rows/teacher", []), start.get("rows/start", []), final["rows/final"])
        ]
        log_table(trainer.logger, "samples/distill", ["prompt", "teacher response", "teacher gold", "start response", "start gold", "student response", "student gold"], rows[:50])
        write_json(run_dir / "gold_final.json", {"gold": final["gold/final"], "rows": final["rows/final"]})

    metrics.update(speed_figures({"teacher": teacher.eval(), "student": student.eval()}, tokenizer, block, cfg.distill.bench))
    metrics["time/total_s"] = time.time() - started
    finish(run_dir, student, tokenizer, metrics, trainer, kind="lm", stage="distill")
    return metrics
