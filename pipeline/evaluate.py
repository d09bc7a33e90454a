"""Answering prompts with a model and scoring the answers with the task's gold judge: what SFT, PPO and the report measure.

Prompts are TRL prompts: a string (standard) or a list of {role, content} messages (conversational),
turned into ids by data/chat.py and sampled by the one engine (model/engine.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from pipeline.data.chat import prompt_ids, prompt_text
from pipeline.model import GPT, Generation, generate, left_pad
from pipeline.tasks import default_task


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
    gold_score = default_task().gold_score
    answers = complete(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
    rows = []
    for prompt, answer in zip(prompts, answers):
        text = prompt_text(prompt)
        rows.append({"prompt": text, "response": answer, "gold": gold_score(text, answer)})
    mean = sum(r["gold"] for r in rows) / max(1, len(rows))
    return mean, rows


def gold_prompts(cfg) -> list | None:
    """The first `eval.num_prompts` held-out prompts of the embedded task (its test split), when the gold judge applies.

    `eval.gold` auto: on the embedded data only (a user's data has no judge).
    """
    from pipeline.data import datasets_cache, load_data
    from pipeline.data.corpus import embedded_task

    use = cfg.eval.gold
    if use == "auto":
        use = not cfg.data.path
    if not use:
        return None
    path = embedded_task(Path(cfg.paths.cache_dir), "prompts")
    test = load_data(str(path), cache_dir=datasets_cache(cfg))["test"]
    return [row["prompt"] for row in test.select(range(min(cfg.eval.num_prompts, len(test))))]


@torch.no_grad()
def sampled_kl(
    policy: GPT,
    reference: GPT,
    prompt_ids_list: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float,
    eos_id: int,
    pad_id: int,
    seed: int,
    batch_size: int = 200,
) -> torch.Tensor:
    """KL(policy || reference) in nats per response, one sampled response per prompt: (B,).

    The summed log-ratio of tokens the policy samples (at `temperature`, both models under it) is an
    unbiased estimate of the sequence KL between the two sampling distributions; a greedy answer's
    log-ratio is not (it is not a sample). The generator depends on `seed` alone, so every
    evaluation of a run draws alike and the figure is comparable across methods and checkpoints.
    """
    from pipeline.model import token_logprobs, truncate_after_eos

    device = next(policy.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = policy.training
    policy.eval()
    out = []
    for start in range(0, len(prompt_ids_list), batch_size):
        ids, mask = left_pad(prompt_ids_list[start : start + batch_size], pad_id, device)
        gen = generate(policy, ids, mask, max_new_tokens=max_new_tokens, temperature=temperature, eos_id=eos_id, pad_id=pad_id, generator=generator)
        response, rmask = truncate_after_eos(gen.tokens, gen.mask, eos_id, pad_id)
        seqs, att = torch.cat([ids, response], 1), torch.cat([mask, rmask], 1)
        P = ids.size(1)
        lp = token_logprobs(policy(seqs, attention_mask=att)[:, P - 1 : -1], response, temperature)
        ref = token_logprobs(reference(seqs, attention_mask=att)[:, P - 1 : -1], response, temperature)
        out.append(((lp - ref) * rmask).sum(1))
    policy.train(was_training)
    return torch.cat(out)
