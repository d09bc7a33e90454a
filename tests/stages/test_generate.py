"""`python -m pipeline stage=generate`: answers from a finished policy, by prompt, file or terminal chat."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

import pipeline.__main__  # noqa: F401  (registers the run_name resolver the config uses)
from helpers import REPO, run_pipeline
from pipeline import runs
from pipeline.evaluate import complete
from pipeline.files import write_json
from pipeline.model import GPT, GPTConfig, ScalarGPT
from pipeline.stages import STAGES, generate
from pipeline.tokenizer import save_tokenizer, train_tokenizer

TEXTS = [f"Reverse the list: {a} {b} {c}. Sure, here it is: {c} {b} {a}." for a, b, c in zip("abcdefgh", "ijklmnop", "qrstuvwx")] * 4


def save_run(root: Path, stage: str, name: str, cls=GPT, seed: int = 0) -> Path:
    """A finished stage run as the pipeline writes one: model.pt, tokenizer/ and metrics.json."""
    torch.manual_seed(seed)
    tokenizer = train_tokenizer(TEXTS, 300)
    # Untied: a random tied model only repeats its last input token (a special one after the chat template).
    model = cls(GPTConfig(vocab_size=320, block_size=64, n_layer=1, n_head=2, n_embd=32, tie_embeddings=False))
    run_dir = root / stage / name
    save_tokenizer(tokenizer, run_dir / runs.TOKENIZER_DIR)
    runs.save_model(run_dir / runs.MODEL_FILE, model, kind="scalar" if cls is ScalarGPT else "lm", stage=stage)
    write_json(run_dir / runs.METRICS_FILE, {"stage": stage})
    return run_dir


def config(root: Path, run_dir: Path, *overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=["stage=generate", f"paths.root={root}", f"paths.run_dir={run_dir}", *overrides])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_greedy_answers_are_deterministic_and_those_of_complete(outputs_root):
    save_run(outputs_root, "pretrain", "a", seed=1)
    time.sleep(0.01)
    sft = save_run(outputs_root, "sft", "a", seed=2)
    prompt = "Reverse the list: a b c"
    first = run_pipeline("stage=generate", f"prompt={prompt}", "max_new_tokens=12", root=outputs_root)
    (gen_dir,) = [d for d in (outputs_root / "generate").iterdir() if d.is_dir()]
    first_rows = read_jsonl(gen_dir / generate.GENERATIONS_FILE)
    second = run_pipeline("stage=generate", f"prompt={prompt}", "max_new_tokens=12", root=outputs_root)

    model, tokenizer, _, _ = runs.load_start(str(sft), STAGES["generate"].starts_from, outputs_root, "generate")
    turn = [{"role": "user", "content": prompt}]  # an SFT model is asked through the chat template
    expected = complete(model.eval(), tokenizer, [turn], max_new_tokens=12)[0]
    assert expected and first_rows == read_jsonl(gen_dir / generate.GENERATIONS_FILE) == [{"prompt": turn, "response": expected}]
    assert f">>> {prompt}\n" in first.stdout
    assert str(sft / runs.MODEL_FILE) in first.stdout + first.stderr  # the newest policy: sft over pretrain
    # Rerunning is never skipped, and a generate run never counts as a finished run of any stage.
    assert "already holds a finished" not in second.stdout + second.stderr
    assert not runs.is_finished(gen_dir) and runs.newest_finished_run(outputs_root, "generate") is None


def test_prompts_file_txt_and_jsonl_and_seeded_sampling(tmp_path, outputs_root):
    run_dir = save_run(outputs_root, "pretrain", "a")
    txt = tmp_path / "prompts.txt"
    txt.write_text("Reverse the list: a b c\n\nReverse the list: d e f\n")
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reverse the list: g h"}]
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text(json.dumps({"prompt": "Reverse the list: a b c"}) + "\n" + json.dumps({"prompt": conversation, "id": 7}) + "\n")
    assert generate.read_prompts(txt) == ["Reverse the list: a b c", "Reverse the list: d e f"]
    assert generate.read_prompts(jsonl) == ["Reverse the list: a b c", conversation]

    model, tokenizer, _, _ = runs.load_start(str(run_dir), STAGES["generate"].starts_from, outputs_root, "generate")
    out = tmp_path / "gen"
    generate.run(config(outputs_root, out, f"prompts_file={jsonl}", "max_new_tokens=10"), out)
    rows = read_jsonl(out / generate.GENERATIONS_FILE)
    assert [r["prompt"] for r in rows] == ["Reverse the list: a b c", conversation]
    assert [r["response"] for r in rows] == complete(model, tokenizer, ["Reverse the list: a b c", conversation], max_new_tokens=10)

    # A pretrained model gets .txt lines as plain text; chat=true sends them as user turns instead.
    generate.run(config(outputs_root, out, f"prompts_file={txt}", "max_new_tokens=10", "chat=true"), out)
    rows = read_jsonl(out / generate.GENERATIONS_FILE)
    turns = [[{"role": "user", "content": "Reverse the list: a b c"}], [{"role": "user", "content": "Reverse the list: d e f"}]]
    assert [r["prompt"] for r in rows] == turns
    assert [r["response"] for r in rows] == complete(model, tokenizer, turns, max_new_tokens=10)

    sampled = []
    for seed in (1, 1, 2):
        generate.run(config(outputs_root, out, f"prompts_file={txt}", "max_new_tokens=16", "temperature=1.5", "top_k=50", "top_p=0.95", f"seed={seed}"), out)
        sampled.append([r["response"] for r in read_jsonl(out / generate.GENERATIONS_FILE)])
    assert sampled[0] == sampled[1] and sampled[0] != sampled[2]  # the seed decides the sample


def chat_session(root: Path, lines: list[str]) -> str:
    """`python -m pipeline stage=generate` with a terminal as stdin, typing lines; returns its stdout."""
    leader, follower = pty.openpty()
    env = {**os.environ, "PIPELINE_OUTPUTS": str(root), "WANDB_MODE": "offline"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "stage=generate", "max_new_tokens=6"],
        cwd=REPO, env=env, stdin=follower, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    os.close(follower)
    try:
        for line in lines:
            os.write(leader, (line + "\n").encode())
        if lines[-1] != "exit":
            os.write(leader, b"\x04")  # Ctrl-D: end of input
        out, err = proc.communicate(timeout=120)
    finally:
        os.close(leader)  # the terminal's echo of our typing is never read: stdout is a pipe
    assert proc.returncode == 0, err[-2000:]
    return out


def test_chat_in_a_terminal_keeps_the_conversation(outputs_root):
    run_dir = save_run(outputs_root, "sft", "a")
    out = chat_session(outputs_root, ["Reverse the list: a b", "And now: c d", "exit"])
    (gen_dir,) = (outputs_root / "generate").iterdir()
    rows = read_jsonl(gen_dir / generate.GENERATIONS_FILE)
    assert len(rows) == 2 and out.count("model> ") == 2
    # The second turn sees the first question and the model's first answer through the chat template.
    assert rows[1]["prompt"] == [
        {"role": "user", "content": "Reverse the list: a b"},
        {"role": "assistant", "content": rows[0]["response"]},
        {"role": "user", "content": "And now: c d"},
    ]
    model, tokenizer, _, _ = runs.load_start(str(run_dir), STAGES["generate"].starts_from, outputs_root, "generate")
    assert rows[1]["response"] == complete(model, tokenizer, [rows[1]["prompt"]], max_new_tokens=6)[0]

    chat_session(outputs_root, ["Once more: e f"])  # ended by Ctrl-D
    again = read_jsonl(gen_dir / generate.GENERATIONS_FILE)
    assert again[:2] == rows and again[2]["prompt"] == [{"role": "user", "content": "Once more: e f"}]
