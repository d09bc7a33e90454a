"""Answering prompts with a model and scoring the answers with the task's gold judge: what SFT, PPO and the report measure;
the sampled KL of a policy to a reference; and generation speed (tokens/s) of models side by side (quantize, distill).

Prompts are TRL prompts: a string (standard) or a list of {role, content} messages (conversational),
turned into ids by data/chat.py and sampled by the one engine (model/engine.py).
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import Sequence

import torch

from pipeline.data.chat import prompt_ids, prompt_text
from pipeline.losses.distill import sequence_kl
from pipeline.model import GPT, Generation, generate, left_pad
from pipeline.tasks import default_task
from pipeline.timing import timed

log = logging.getLogger(__name__)


@torch.no_grad()
@timed("eval")
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


@timed("eval")
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
@timed("eval")
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
    exact: bool = False,
) -> torch.Tensor:
    """KL(policy || reference) in nats per response, one sampled response per prompt: (B,).

    The summed log-ratio of tokens the policy samples (at `temperature`, both models under it) is an
    unbiased estimate of the sequence KL between the two sampling distributions; a greedy answer's
    log-ratio is not (it is not a sample). The generator depends on `seed` alone, so every
    evaluation of a run draws alike and the figure is comparable across methods and checkpoints.
    `exact`: each sampled position's KL over the whole vocabulary instead of the drawn token's log-ratio
    (losses/distill.sequence_kl): the same expectation, never negative, less noisy.
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
        policy_logits, reference_logits = policy(seqs, attention_mask=att)[:, P - 1 : -1], reference(seqs, attention_mask=att)[:, P - 1 : -1]
        if exact:
            out.append(sequence_kl(policy_logits, reference_logits, rmask, temperature))
        else:
            lp, ref = token_logprobs(policy_logits, response, temperature), token_logprobs(reference_logits, response, temperature)
            out.append(((lp - ref) * rmask).sum(1))
    policy.train(was_training)
    return torch.cat(out)


def bench_prompts(tokenizer, n: int, block_size: int, new_tokens: int) -> list[list[int]]:
    """n held-out task prompts as token ids, cut to leave room for new_tokens: the same prompts for every model timed."""
    rows = default_task().prompt_rows("test", n)
    room = max(1, block_size - new_tokens)
    return [prompt_ids(tokenizer, r["prompt"])[-room:] for r in rows]


@torch.no_grad()
def tokens_per_s(models: dict[str, GPT], prompts: list[list[int]], pad_id: int, batch_size: int, new_tokens: int, warmup: int, repeats: int) -> dict[str, float]:
    """Greedy tokens per second of each model at one batch size: warmup calls, then `repeats` timed calls, the models in turn.

    No stop token, so every call generates the same number of tokens (new_tokens, or fewer where the
    context ends); the median call time decides. Prefill is included: it is part of answering a prompt.
    Timing the models in turn means a busy machine slows them alike.
    """
    ids, mask = left_pad(prompts[:batch_size], pad_id)
    times: dict[str, list[float]] = {name: [] for name in models}
    made = {}
    for name, model in models.items():
        for _ in range(warmup):
            generate(model, ids, mask, max_new_tokens=new_tokens, temperature=0.0, pad_id=pad_id)
    for _ in range(repeats):
        for name, model in models.items():
            started = time.perf_counter()
            out = generate(model, ids, mask, max_new_tokens=new_tokens, temperature=0.0, pad_id=pad_id)
            times[name].append(time.perf_counter() - started)
            made[name] = out.tokens.numel()
    return {name: made[name] / statistics.median(t) for name, t in times.items()}


def speed_figures(models: dict[str, GPT], tokenizer, block_size: int, bench) -> dict[str, float]:
    """perf/<name>_tokens_per_s_b<B> of each model and perf/speedup_b<B> (the last model's over the first's) at each of
    bench.batch_sizes, timed by tokens_per_s with bench.new_tokens, bench.warmup and bench.repeats; perf/threads."""
    first, last = list(models)[0], list(models)[-1]
    batch_sizes = [int(b) for b in bench.batch_sizes]
    prompts = bench_prompts(tokenizer, max(batch_sizes), block_size, int(bench.new_tokens))
    figures: dict[str, float] = {}
    for b in batch_sizes:
        speed = tokens_per_s(models, prompts, tokenizer.pad_token_id, b, int(bench.new_tokens), int(bench.warmup), int(bench.repeats))
        figures.update({f"perf/{name}_tokens_per_s_b{b}": value for name, value in speed.items()})
        figures[f"perf/speedup_b{b}"] = speed[last] / speed[first]
        log.info("batch %d: %s (%d threads)", b, ", ".join(f"{name} {value:.0f} tokens/s" for name, value in speed.items()), torch.get_num_threads())
    figures["perf/threads"] = torch.get_num_threads()
    return figures
