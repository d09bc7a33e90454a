"""stage=distill: the module (a perfect copy has loss 0, on-policy answers are the student's, the teacher stays out of checkpoints),
the teacher's cached answers, a run end to end whose student generate reads, exact resume after a SIGKILL, a vocabulary mismatch refused.

The divergences themselves are tests/losses/test_distill.py (by hand and against TRL's GKD).
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from helpers import checkpoint_step, finished_run, kill_when, roots_sharing, run_pipeline, start_pipeline, tiny_model
from pipeline.data.chat import prompt_ids
from pipeline.data.corpus import embedded_task_dir, materialize
from pipeline.distillation import TEACHER_ANSWERS, DistillCollator, DistillModule, teacher_answers
from pipeline.tasks import default_task
from pipeline.training import history_series, read_history

BLOCK = 128
SECTION = {
    "lmbda": 0.0, "beta": 0.0, "temperature": 1.0, "nll_weight": 0.0, "max_new_tokens": 6, "teacher_temperature": 0.0,
    "sampling_temperature": 1.0, "train_prompts": None, "val_prompts": 4, "batch_size": 4, "generate_batch_size": 3,
}
# A student smaller than the teacher (tiny_model: 2 layers of 32), and a run of seconds.
STUDENT = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", f"model.block_size={BLOCK}"]
FAST = [
    "logger=csv", "distill.max_new_tokens=8", "distill.val_prompts=8", "distill.batch_size=8", "trainer.log_every_n_steps=1",
    "eval.num_prompts=8", "eval.max_new_tokens=8", "distill.bench.batch_sizes=[1,4]", "distill.bench.new_tokens=4", "distill.bench.repeats=1",
]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer):
    """An outputs root with a finished 'ppo' teacher (a tiny random model) and a stand-in embedded task of real task prompts."""
    root = tmp_path_factory.mktemp("outputs")
    teacher = finished_run(root, "ppo", "default", tiny_model(seed=3, block_size=BLOCK), tokenizer)
    task = default_task()
    rows = {split: task.prompt_rows(split, n) for split, n in (("train", 96), ("validation", 16), ("test", 16))}
    materialize(rows, embedded_task_dir(root / "cache", "prompts"))  # the real task's files take most of a minute to build
    return root, teacher


def batch_of(tokenizer, n: int = 4) -> dict:
    prompts = [prompt_ids(tokenizer, r["prompt"]) for r in default_task().prompt_rows("train", n)]
    answers = [[5 + i, 6, 7 + i, tokenizer.eos_token_id][: 2 + i % 3] for i in range(n)]  # answers of 2 to 4 tokens
    return DistillCollator(tokenizer.pad_token_id)([{"prompt": p, "answer": a, "index": i} for i, (p, a) in enumerate(zip(prompts, answers))])


def module_for(student, teacher, tokenizer, **section) -> DistillModule:
    return DistillModule(student, teacher, {**SECTION, **section}, {}, 10, tokenizer.eos_token_id, tokenizer.pad_token_id, seed=0)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_a_student_that_copies_the_teacher_has_loss_0_and_the_teacher_is_not_saved(tokenizer, beta):
    teacher = tiny_model(seed=1, block_size=BLOCK)
    batch = batch_of(tokenizer)
    copied = module_for(copy.deepcopy(teacher), teacher, tokenizer, beta=beta)
    with torch.no_grad():
        out = copied.step(batch)
    assert abs(out["loss"].item()) < 1e-6 and out["tokens"].item() == sum(2 + i % 3 for i in range(4))
    other = module_for(tiny_model(seed=2, block_size=BLOCK), teacher, tokenizer, beta=beta)
    with torch.no_grad():
        assert other.step(batch)["loss"].item() > 1e-3
    # Only the student is a submodule: the checkpoint and the optimiser never see the teacher.
    assert all(k.startswith("model.") for k in copied.state_dict()) and copied.hparams.model_config == teacher.config.to_dict()
    assert sum(p.numel() for p in copied.parameters()) == sum(p.numel() for p in teacher.parameters())
    assert not any(p.requires_grad for p in teacher.parameters())


def test_the_loss_covers_only_answer_tokens_and_adds_the_nll(tokenizer):
    teacher, student = tiny_model(seed=1, block_size=BLOCK), tiny_model(seed=2, block_size=BLOCK)
    batch = batch_of(tokenizer)
    P = int(batch["prompt_len"])
    changed = {**batch, "input_ids": batch["input_ids"].clone()}
    changed["input_ids"][:, : P - 5] = 11  # tokens of the prompts' padding and starts: no loss sits on them, but they are context
    module = module_for(student, teacher, tokenizer, nll_weight=0.5)
    with torch.no_grad():
        out = module.step(batch)
        torch.testing.assert_close(out["loss"], out["kd"] + 0.5 * out["nll"])
        # Padding after the answers changes nothing: the last answer column of a short answer is masked out.
        padded = {**batch, "input_ids": torch.cat([batch["input_ids"], batch["input_ids"][:, -1:]], 1), "attention_mask": torch.cat([batch["attention_mask"], torch.zeros_like(batch["attention_mask"][:, -1:])], 1)}
        torch.testing.assert_close(module.step(padded)["loss"], out["loss"], rtol=1e-5, atol=1e-6)
        assert not torch.allclose(module.step(changed)["loss"], out["loss"])  # the prompt is read


def test_on_policy_batches_are_the_students_own_samples_drawn_alike_on_resume(tokenizer):
    teacher, student = tiny_model(seed=1, block_size=BLOCK), tiny_model(seed=2, block_size=BLOCK)
    batch = batch_of(tokenizer)
    P = int(batch["prompt_len"])
    always, never = module_for(student, teacher, tokenizer, lmbda=1.0), module_for(student, teacher, tokenizer, lmbda=0.0)
    assert always.is_on_policy(batch) and not never.is_on_policy(batch)
    half = module_for(student, teacher, tokenizer, lmbda=0.5)
    draws = [half.is_on_policy({**batch, "index": torch.tensor([i])}) for i in range(200)]
    assert 70 < sum(draws) < 130 and draws == [half.is_on_policy({**batch, "index": torch.tensor([i])}) for i in range(200)]
    sampled = always.with_student_answers(batch)
    assert torch.equal(sampled["input_ids"][:, :P], batch["input_ids"][:, :P])  # the prompts stay
    assert torch.equal(sampled["input_ids"], always.with_student_answers(batch)["input_ids"])  # seeded by (seed, step, rows) alone
    answer, mask = sampled["input_ids"][:, P:], sampled["attention_mask"][:, P:]
    assert answer.size(1) <= SECTION["max_new_tokens"] and bool(mask[:, 0].all())
    # Each sampled answer stops at its first EOS: nothing is scored after it.
    for row, m in zip(answer, mask):
        eos = (row == tokenizer.eos_token_id).nonzero()
        if len(eos):
            assert int(m.sum()) == int(eos[0]) + 1


def test_the_teachers_answers_are_made_once_per_teacher_and_prompts(tokenizer, tmp_path):
    teacher = tiny_model(seed=1, block_size=BLOCK)
    prompts = {"train": [prompt_ids(tokenizer, r["prompt"]) for r in default_task().prompt_rows("train", 7)], "validation": [prompt_ids(tokenizer, "hi")]}
    path = tmp_path / TEACHER_ANSWERS
    first, seconds = teacher_answers(path, teacher, prompts, SECTION, tokenizer.eos_token_id, tokenizer.pad_token_id, 0, "cpu")
    assert seconds > 0 and [len(first["train"]), len(first["validation"])] == [7, 1]
    assert all(1 <= len(a) <= SECTION["max_new_tokens"] for a in first["train"])
    # Batched in length order (3 at a time): each answer is the one the teacher gives the prompt alone.
    from pipeline.distillation import answer

    assert first["train"][4] == answer(teacher, [prompts["train"][4]], 6, 0.0, tokenizer.eos_token_id, tokenizer.pad_token_id, 0, 1, "cpu")[0]
    again, seconds = teacher_answers(path, copy.deepcopy(teacher), prompts, SECTION, tokenizer.eos_token_id, tokenizer.pad_token_id, 0, "cpu")
    assert again == first and seconds == 0.0  # read back
    other = tiny_model(seed=5, block_size=BLOCK)
    changed, seconds = teacher_answers(path, other, prompts, SECTION, tokenizer.eos_token_id, tokenizer.pad_token_id, 0, "cpu")
    assert seconds > 0 and changed != first  # another teacher answers again


def test_distill_end_to_end_then_generate_reads_the_student(world):
    root, teacher = world
    run_dir = root / "distill" / "e2e"
    run_pipeline(
        "stage=distill", *STUDENT, *FAST, "distill.student_init=fresh", "distill.lmbda=0.5", "distill.nll_weight=0.1", "trainer.max_steps=16", "trainer.val_check_interval=8",
        "optim.lr=1e-2", "optim.warmup_steps=0", f"hydra.run.dir={run_dir}", root=root,
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["teacher_from"] == str(teacher / "model.pt") and metrics["init_from"] is None  # the newest ppo run; a fresh student
    assert metrics["student/init"] == "fresh"
    for key in (
        "gold/teacher", "gold/start", "gold/final", "kl/start", "kl/final", "val/loss", "val/kd", "val/nll", "time/total_s", "perf/tokens_per_s",
        "perf/teacher_tokens_per_s_b1", "perf/student_tokens_per_s_b1", "perf/speedup_b1", "perf/teacher_tokens_per_s_b4", "perf/student_tokens_per_s_b4", "perf/speedup_b4",
    ):
        assert math.isfinite(metrics[key]), key
    assert metrics["params/student"] < metrics["params/teacher"] and metrics["params/ratio"] == metrics["params/student"] / metrics["params/teacher"]
    assert metrics["train/steps"] == 16 and metrics["train/prompts"] == 96 and 0 < metrics["train/on_policy_batches"] < 16
    assert metrics["kl/final"] < metrics["kl/start"]  # the student moved towards the teacher
    _, kd = history_series(read_history(run_dir / "history.jsonl"), "train/kd")
    assert sum(kd[-4:]) < sum(kd[:4]), kd
    answers = json.loads((run_dir / TEACHER_ANSWERS).read_text())["answers"]
    assert len(answers["train"]) == 96 and len(answers["validation"]) == 8
    payload = torch.load(run_dir / "model.pt", weights_only=True)
    assert payload["stage"] == "distill" and payload["config"]["n_layer"] == 1

    run_pipeline("stage=generate", f"init_from={run_dir}", "prompt=Spell hill letter by letter", "max_new_tokens=6", f"hydra.run.dir={root / 'generate' / 'student'}", root=root)
    rows = [json.loads(line) for line in (root / "generate" / "student" / "generations.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and isinstance(rows[0]["response"], str)
    # An instruction-tuned model (the registry's chat=True for distill): the prompt went through the chat template as a user turn.
    assert rows[0]["prompt"] == [{"role": "user", "content": "Spell hill letter by letter"}]


def test_a_student_starts_as_the_teacher_pruned_to_its_shape(world, tokenizer, tmp_path):
    """student_init=teacher: a teacher whose block 1 and MLP channels 64-127 compute nothing, pruned to the student's shape
    (1 block, 64 channels: conf/model/student.yaml's mlp_ratio 2), is the teacher exactly: KL 0 and the same gold score."""
    source, _ = world
    root = roots_sharing(source, tmp_path, ("outputs",), ("cache",))["outputs"]
    model = tiny_model(seed=3, block_size=BLOCK)
    with torch.no_grad():
        model.blocks[1].attn.out_proj.weight.zero_()
        model.blocks[1].mlp.down_proj.weight.zero_()
        hidden = model.config.mlp_hidden
        model.blocks[0].mlp.up_proj.weight[list(range(64, hidden)) + list(range(hidden + 64, 2 * hidden))] = 0
        model.blocks[0].mlp.down_proj.weight[:, 64:] = 0
    teacher = finished_run(root, "ppo", "zeroed", model, tokenizer)
    run_dir = root / "distill" / "pruned"
    run_pipeline("stage=distill", *STUDENT, *FAST, "distill.student_init=teacher", "trainer.max_steps=2", "trainer.val_check_interval=2", f"hydra.run.dir={run_dir}", root=root)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["teacher_from"] == str(teacher / "model.pt") and metrics["student/init"] == "teacher" and metrics["student/kept_blocks"] == [0]
    assert metrics["student/config"]["mlp_ratio"] == 2.0 and metrics["student/config"]["n_layer"] == 1
    assert metrics["kl/start"] < 1e-4 and metrics["gold/start"] == metrics["gold/teacher"]

    # A student wider than the teacher is not a part of it: student_init=teacher names why; auto starts it fresh.
    refused = run_pipeline("stage=distill", *STUDENT, "model.n_embd=64", *FAST, "distill.student_init=teacher", f"hydra.run.dir={root / 'distill' / 'wide'}", root=root, check=False)
    assert refused.returncode == 2 and "distill.student_init=teacher" in refused.stderr and "n_embd=64 (the source's 32)" in refused.stderr, refused.stderr[-2000:]


# -- resume after SIGKILL: one command under two roots, one left alone, one killed and run again ---------------

STEPS, EVERY, KILL_AFTER = 40, 4, 8


def test_distill_resumes_exactly_after_a_kill(world, tmp_path):
    source, _ = world
    roots = roots_sharing(source, tmp_path, ("whole", "killed"))
    # On-policy batches (their draws and samples), the cached teacher answers and the start figures all come back.
    args = ["stage=distill", *STUDENT, *FAST, "distill.lmbda=0.5", f"trainer.max_steps={STEPS}", f"trainer.val_check_interval={EVERY}", "optim.warmup_steps=5", "hydra.run.dir=RUN"]
    command = lambda root: [a.replace("RUN", str(root / "distill" / "run")) for a in args]  # noqa: E731
    whole = start_pipeline(command(roots["whole"]), roots["whole"])
    killed = start_pipeline(command(roots["killed"]), roots["killed"])
    run_dir = roots["killed"] / "distill" / "run"
    kill_when(killed, lambda: checkpoint_step(run_dir) >= KILL_AFTER, roots["killed"] / "stderr.txt")
    step = checkpoint_step(run_dir)
    assert KILL_AFTER <= step < STEPS and not (run_dir / "metrics.json").exists()
    assert (run_dir / TEACHER_ANSWERS).is_file() and (run_dir / "distill_start.json").is_file()
    resumed = run_pipeline(*command(roots["killed"]), root=roots["killed"])
    assert "Restoring states from the checkpoint" in resumed.stdout + resumed.stderr
    assert "answering again" not in resumed.stdout + resumed.stderr  # the teacher's answers were read back
    assert whole.wait(timeout=300) == 0, (roots["whole"] / "stderr.txt").read_text()[-4000:]

    a, b = read_history(roots["whole"] / "distill" / "run" / "history.jsonl"), read_history(run_dir / "history.jsonl")
    keys = {k for row in a for k in row if k != "step" and not k.startswith("perf/")}
    assert {"train/loss", "train/on_policy", "val/loss"} <= keys
    for key in sorted(keys):
        assert history_series(b, key) == history_series(a, key), key  # the steps after the kill, from the resumed process
    _, on_policy = history_series(a, "train/on_policy")
    assert 0 < sum(on_policy) < len(on_policy)  # both kinds of batch happened
    ma, mb = (json.loads((r / "distill" / "run" / "metrics.json").read_text()) for r in (roots["whole"], roots["killed"]))
    for key in ("val/loss", "gold/start", "gold/final", "kl/start", "kl/final", "train/steps", "train/on_policy_batches"):
        assert mb[key] == ma[key], key


def test_a_student_of_another_vocabulary_is_refused(world, tmp_path):
    from pydoc_data.topics import topics

    from pipeline.tokenizer import train_tokenizer

    root, teacher = world
    other = train_tokenizer([topics[k] for k in sorted(topics)[-20:]], 300)  # the same size, other merges
    student = finished_run(tmp_path / "elsewhere", "pretrain", "other", tiny_model(seed=4, block_size=BLOCK), other)
    result = run_pipeline("stage=distill", f"init_from={student}", *FAST, f"hydra.run.dir={tmp_path / 'refused'}", root=root, check=False)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"init_from={student / 'model.pt'} uses another tokenizer than the teacher teacher_from={teacher / 'model.pt'}" in errors[0]
