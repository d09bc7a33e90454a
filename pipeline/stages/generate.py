"""`python -m pipeline stage=generate`: answers from any finished policy (or a checkpoint of one).

    python -m pipeline stage=generate prompt="Reverse the list: a b c"
    python -m pipeline stage=generate prompts_file=prompts.jsonl temperature=0.8 top_p=0.9 seed=1
    python -m pipeline stage=generate init_from=outputs/sft/default        # chat in the terminal

The model is `init_from` (a run directory, a model.pt or a Lightning .ckpt; a quantize run too,
which answers on the CPU), else the newest finished PPO run, else GRPO, DPO, SFT, pretrain. Text prompts reach SFT and PPO models as a user turn of
the chat template (what they were trained on), pretrained models as plain text (`chat=`). Answers are printed and written to generations.jsonl in
this run's directory. A generate run writes no model.pt, so it is never a finished run that a
rerun skips or that a training stage starts from.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig

from pipeline import runs
from pipeline.data.chat import prompt_ids, prompt_text
from pipeline.data.loading import _messages_problem
from pipeline.errors import UserError
from pipeline.evaluate import complete
from pipeline.files import atomic_write_bytes
from pipeline.model import quant
from pipeline.stages import STAGES

log = logging.getLogger(__name__)

GENERATIONS_FILE = "generations.jsonl"
QUIT_WORDS = ("exit", "quit")


def load_policy(init_from: str | None, root: Path):
    """(model, tokenizer, path, stage) of a language model; a reward model is refused with its file named."""
    model, tokenizer, payload, path = runs.load_start(init_from, STAGES["generate"].starts_from, root, "generate")
    if payload.get("kind") == "scalar":
        raise UserError(f"init_from={path} is a reward model (a scalar head), not a policy: give an sft, ppo or pretrain run")
    return model.eval(), tokenizer, path, payload.get("stage")


def wants_chat(chat, stage: str | None) -> bool:
    """Whether text prompts become a user turn of the chat template: auto means for instruction-tuned models.

    SFT and PPO learn answers after the chat template's assistant marker; a pretrained model only
    continues text. A Lightning .ckpt does not say its stage, so auto treats it as plain text.
    """
    if chat == "auto":
        return stage in STAGES and STAGES[stage].chat
    if isinstance(chat, bool):
        return chat
    raise UserError(f"chat={chat!r} must be auto, true or false")


def read_prompts(path: Path) -> list:
    """Prompts from a .txt (one a line) or a .jsonl with a `prompt` column (text or a list of messages)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompts_file={path}: no such file")
    if path.suffix not in (".txt", ".jsonl"):
        raise UserError(f"prompts_file={path}: expected a .txt file (one prompt a line) or a .jsonl file with a `prompt` column")
    lines = path.read_text(encoding="utf-8").splitlines()
    prompts: list = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if path.suffix == ".txt":
            prompts.append(line)
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}, line {number}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or "prompt" not in row:
            found = ", ".join(sorted(row)) if isinstance(row, dict) else type(row).__name__
            raise UserError(f"{path}, line {number}: no `prompt` column (found: {found})")
        prompt = row["prompt"]
        if isinstance(prompt, str):
            if not prompt.strip():
                raise UserError(f"{path}, line {number}: column `prompt` is empty")
        else:
            problem = _messages_problem(prompt, needs_answer=False)
            if problem:
                raise UserError(f"{path}, line {number}: column `prompt`: {problem}")
        prompts.append(prompt)
    if not prompts:
        raise UserError(f"prompts_file={path} holds no prompts")
    return prompts


def check_lengths(prompts: list, tokenizer, block_size: int, source: str) -> None:
    """A prompt must leave room for at least one new token inside the model's context."""
    for i, prompt in enumerate(prompts):
        n = len(prompt_ids(tokenizer, prompt))
        if n >= block_size:
            raise UserError(f"{source}: prompt {i + 1} is {n} tokens, no room to answer within the model's block_size={block_size}")


def decoding(cfg: DictConfig) -> dict:
    """The sampling settings; pipeline/checks.py has refused values out of range before the stage starts."""
    return {
        "max_new_tokens": int(cfg.max_new_tokens),
        "temperature": float(cfg.temperature),
        "top_k": int(cfg.top_k) or None,  # 0 means no top-k filtering
        "top_p": float(cfg.top_p) if float(cfg.top_p) < 1 else None,
        "batch_size": int(cfg.batch_size),
    }


def write_generations(run_dir: Path, rows: list[dict], earlier: str = "") -> Path:
    path = run_dir / GENERATIONS_FILE
    atomic_write_bytes(path, (earlier + "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)).encode())
    return path


def chat(model, tokenizer, settings: dict, generator, run_dir: Path, model_path: Path, stage: str | None) -> list[dict]:
    """Multi-turn chat on the terminal: the whole conversation goes through the chat template each turn."""
    conversation: list[dict] = []
    rows: list[dict] = []
    # Every chat started by the same command shares a run directory: keep the earlier sessions' turns.
    earlier_file = run_dir / GENERATIONS_FILE
    earlier = earlier_file.read_text(encoding="utf-8") if earlier_file.is_file() else ""
    print(f"chatting with {model_path} ('exit' or Ctrl-D to quit)", flush=True)
    if not wants_chat("auto", stage):
        print("note: this model was not instruction-tuned; it has never seen the chat template", flush=True)
    while True:
        try:
            text = input("you> ")
        except (EOFError, KeyboardInterrupt):
            print()
            break
        if text.strip().lower() in QUIT_WORDS:
            break
        if not text.strip():
            continue
        conversation.append({"role": "user", "content": text})
        # Forget the oldest turns once the conversation no longer leaves room for an answer.
        while len(conversation) > 1 and len(prompt_ids(tokenizer, conversation)) + settings["max_new_tokens"] > model.config.block_size:
            conversation = conversation[2:] if len(conversation) > 2 else conversation[1:]
        check_lengths([conversation], tokenizer, model.config.block_size, "chat")
        answer = complete(model, tokenizer, [list(conversation)], generator=generator, **settings)[0]
        print(f"model> {answer}", flush=True)
        rows.append({"prompt": list(conversation), "response": answer})
        conversation.append({"role": "assistant", "content": answer})
        write_generations(run_dir, rows, earlier)  # after every turn: quitting with Ctrl-C keeps what was said
    return rows


def run(cfg: DictConfig, run_dir: Path) -> dict:
    settings = decoding(cfg)
    model, tokenizer, path, stage = load_policy(cfg.init_from, Path(cfg.paths.root))
    chat_turns = wants_chat(cfg.chat, stage)
    if torch.cuda.is_available():
        model = quant.place(model, "cuda")  # a quantised model (stage=quantize) stays on the CPU its kernels are for
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(int(cfg.seed))
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.prompt is None and cfg.prompts_file is None:
        if not sys.stdin.isatty():
            raise UserError("nothing to answer: give prompt=\"...\" or prompts_file=FILE (or run in a terminal to chat)")
        rows = chat(model, tokenizer, settings, generator, run_dir, path, stage)
    else:
        if cfg.prompt is not None:
            prompts, source = [str(cfg.prompt)], "prompt"
        else:
            prompts, source = read_prompts(Path(cfg.prompts_file)), str(cfg.prompts_file)
        # Text from the command line or a .txt file has no format of its own; a .jsonl row's text is
        # TRL's standard (non-chat) format and stays as it is.
        if chat_turns and (cfg.prompt is not None or Path(cfg.prompts_file).suffix == ".txt"):
            prompts = [[{"role": "user", "content": p}] for p in prompts]
        check_lengths(prompts, tokenizer, model.config.block_size, source)
        answers = complete(model, tokenizer, prompts, generator=generator, **settings)
        rows = [{"prompt": p, "response": a} for p, a in zip(prompts, answers)]
        for row in rows:
            shown = prompt_text(row["prompt"])
            print(f">>> {shown}\n{row['response']}\n", flush=True)
        write_generations(run_dir, rows)
    log.info("%d answers from %s written to %s", len(rows), path, run_dir / GENERATIONS_FILE)
    return {"stage": "generate", "init_from": str(path), "generations": len(rows), **{k: v for k, v in settings.items() if k != "batch_size"}}
