"""Answering prompts with a model and scoring the answers: the measurements SFT and PPO report.

Prompts are TRL prompts: a string (standard) or a list of {role, content} messages (conversational).
Conversational prompts go through the tokenizer's chat template with the generation prompt; standard
ones get BOS in front. Batches are left-padded for the KV-cache sampler.
"""

from __future__ import annotations

from typing import Sequence

import torch

from pipeline.model import GPT, Generation, generate


def prompt_ids(tokenizer, prompt) -> list[int]:
    """Token ids of a prompt as the model sees it right before its answer."""
    if isinstance(prompt, str):
        return [tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    text = tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_text(prompt) -> str:
    """The user's words in a prompt (the last user turn of a conversation): what a judge reads."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m["role"] == "user"]
    return users[-1] if users else prompt[-1]["content"]


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and attention mask, padded on the left so every row ends on a real token."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        if len(s):
            ids[i, width - len(s) :] = torch.as_tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def complete(
    model: GPT,
    tokenizer,
    prompts: Sequence,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    batch_size: int = 32,
    generator: torch.Generator | None = None,
) -> list[str]:
    """The model's answers to prompts (greedy at temperature 0), decoded without special tokens."""
    device = next(model.parameters()).device
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = [prompt_ids(tokenizer, p) for p in prompts[start : start + batch_size]]
        ids, mask = left_pad(batch, tokenizer.pad_token_id, device)
        out: Generation = generate(
            model,
            ids,
            mask,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            eos_id=tokenizer.eos_token_id,
            pad_id=tokenizer.pad_token_id,
            generator=generator,
        )
        answers.extend(tokenizer.decode(row[m.bool()], skip_special_tokens=True).strip() for row, m in zip(out.tokens, out.mask))
    return answers


def gold_eval(model: GPT, tokenizer, prompts: Sequence, max_new_tokens: int, batch_size: int = 32) -> tuple[float, list[dict]]:
    """Mean gold-judge score of greedy answers to held-out prompts, and the rows (prompt, answer, score)."""
    from pipeline.task import gold_score

    answers = complete(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    rows = []
    for prompt, answer in zip(prompts, answers):
        text = prompt_text(prompt)
        rows.append({"prompt": text, "response": answer, "gold": gold_score(text, answer)})
    mean = sum(r["gold"] for r in rows) / max(1, len(rows))
    return mean, rows
