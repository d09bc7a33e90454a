"""Chat rendering and token ids: prompts as the model sees them, SFT rows with their label masks, preference pairs.

A conversation goes through the tokenizer's chat template (pipeline/tokenizer.py): every prefix of a
conversation renders as a prefix of the whole, which is how the assistant tokens are found. Standard
(string) rows get BOS in front and EOS after the answer. Prompts are TRL prompts: a string or a list
of {role, content} messages.
"""

from __future__ import annotations

import hashlib
import json
import logging

from pipeline.data.loading import DataFormat, source_row
from pipeline.errors import UserError
from pipeline.losses.lm import IGNORE
from pipeline.timing import timed
from pipeline.tokenizer import ASSISTANT, CHAT_TEMPLATE, ROLE_TOKENS, ROLES

log = logging.getLogger(__name__)


def prompt_ids(tokenizer, prompt) -> list[int]:
    """Token ids of a prompt as the model sees it right before its answer."""
    if isinstance(prompt, str):
        return [tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return encode_ids(tokenizer, render(tokenizer, prompt, add_generation_prompt=True))


def prompt_text(prompt) -> str:
    """The user's words in a prompt (the last user turn of a conversation): what a judge reads."""
    if isinstance(prompt, str):
        return prompt
    users = [m["content"] for m in prompt if m["role"] == "user"]
    return users[-1] if users else prompt[-1]["content"]


def render(tokenizer, messages, add_generation_prompt: bool = False) -> str:
    """The conversation as text through the tokenizer's chat template.

    Our own template (pipeline/tokenizer.py) is written out here directly, to the same characters:
    Jinja took most of the time of tokenising the embedded preference pairs. Any other template, or
    a message that is not a plain {role, content: str} mapping, goes through the tokenizer itself.
    """
    messages = list(messages)
    if messages and tokenizer.chat_template == CHAT_TEMPLATE and all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
        role_tokens = dict(zip(ROLES, ROLE_TOKENS))
        parts = [tokenizer.bos_token]
        for m in messages:
            if m.get("role") not in role_tokens:
                break  # the template raises its own error, naming the role
            parts += (role_tokens[m["role"]], m["content"], tokenizer.eos_token)
        else:
            return "".join(parts) + (ASSISTANT if add_generation_prompt else "")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def encode_ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_conversation(tokenizer, messages, train_from: int, loss_on: str) -> tuple[list[int], list[int]]:
    """Ids of a whole conversation and labels that keep assistant turns from message `train_from` on.

    Each assistant turn's tokens are found by rendering the conversation up to it: the chat template
    renders every prefix of a conversation as a prefix of the whole, so token counts of the prefixes
    mark where each answer starts and ends.
    """
    ids = encode_ids(tokenizer, render(tokenizer, messages))
    if loss_on == "all":
        return ids, list(ids)
    labels = [IGNORE] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < train_from:
            continue
        start = len(encode_ids(tokenizer, render(tokenizer, messages[:i], add_generation_prompt=True)))
        end = len(encode_ids(tokenizer, render(tokenizer, messages[: i + 1])))
        labels[start:end] = ids[start:end]
    return ids, labels


def encode_example(tokenizer, row: dict, fmt: DataFormat, loss_on: str) -> tuple[list[int], list[int], int]:
    """(input ids, labels, prompt length) of one SFT row in any of the formats SFT takes."""
    if fmt.kind == "language_modeling":
        if fmt.conversational:
            ids, labels = encode_conversation(tokenizer, row["messages"], 0, loss_on)
            return ids, labels, 0
        ids = [tokenizer.bos_token_id] + encode_ids(tokenizer, row["text"]) + [tokenizer.eos_token_id]
        return ids, list(ids), 0
    # prompt-completion
    if fmt.conversational:
        prompt, completion = list(row["prompt"]), list(row["completion"])
        ids, labels = encode_conversation(tokenizer, prompt + completion, len(prompt), loss_on)
        prompt_len = len(encode_ids(tokenizer, render(tokenizer, prompt, add_generation_prompt=True)))
        return ids, labels, prompt_len
    prompt = [tokenizer.bos_token_id] + encode_ids(tokenizer, row["prompt"])
    completion = encode_ids(tokenizer, row["completion"]) + [tokenizer.eos_token_id]
    labels = ([IGNORE] * len(prompt) if loss_on == "completion" else list(prompt)) + completion
    return prompt + completion, labels, len(prompt)


@timed("data")
def tokenize_sft(ds, tokenizer, fmt, loss_on: str, max_len: int, source: str):
    """datasets.map over the rows (cached on disk for file-backed data); rows longer than the context are cut.

    A prompt that alone fills the context cannot be trained on and is an error naming the row.
    """

    def encode(row, index):
        ids, labels, prompt_len = encode_example(tokenizer, row, fmt, loss_on)
        if prompt_len >= max_len:
            raise UserError(
                f"{source}: row {source_row(ds, index)} has a prompt of {prompt_len} tokens, which leaves no room for the answer "
                f"in the model's context of {max_len - 1} tokens"
            )
        return {"input_ids": ids[:max_len], "labels": labels[:max_len], "truncated": len(ids) > max_len}

    out = ds.map(encode, with_indices=True, remove_columns=ds.column_names, desc="tokenising")
    cut = sum(out["truncated"])
    if cut:
        log.warning("%s: %d of %d rows are longer than the context and were cut to %d tokens", source, cut, len(out), max_len)
    if not any(any(l != IGNORE for l in labels) for labels in out["labels"][:1000]):
        raise UserError(f"{source}: no tokens to train on (every label is masked); check the format and sft.loss_on")
    return out.remove_columns("truncated")


def sequence_ids(tokenizer, prompt, response, conversational: bool) -> list[int]:
    """Ids of prompt + response as the policy would produce them, ending with EOS."""
    if conversational:
        return encode_ids(tokenizer, render(tokenizer, list(prompt or []) + list(response)))
    return [tokenizer.bos_token_id] + encode_ids(tokenizer, (prompt or "") + response) + [tokenizer.eos_token_id]


def _prompt_key(prompt_json: str) -> int:
    """A stable 63-bit key of a prompt (its JSON), so the sampler can keep a prompt's pairs together."""
    return int.from_bytes(hashlib.blake2b(prompt_json.encode("utf-8"), digest_size=8).digest(), "big") >> 1


@timed("data")
def encode_pairs(ds, tokenizer, fmt: DataFormat, max_len: int, source: str):
    """Tokenise chosen and rejected sequences; keep a margin and the gold ordering where the data has them."""
    has_margin = "margin" in ds.column_names
    has_gold = {"chosen_gold", "rejected_gold"} <= set(ds.column_names)
    memo: dict[tuple, list[int]] = {}  # K-wise rows repeat each prompt and answer: render and tokenise each once

    def once(key: tuple, make) -> list[int]:
        if key not in memo:
            if len(memo) >= 200_000:  # bounded memory on large datasets
                memo.clear()
            memo[key] = make()
        return memo[key]

    def encode(row, index):
        prompt = row["prompt"] if not fmt.implicit_prompt else None
        head = json.dumps(prompt, sort_keys=True, ensure_ascii=False)
        chosen = once((head, json.dumps(row["chosen"])), lambda: sequence_ids(tokenizer, prompt, row["chosen"], fmt.conversational))
        rejected = once((head, json.dumps(row["rejected"])), lambda: sequence_ids(tokenizer, prompt, row["rejected"], fmt.conversational))
        if prompt is not None:
            prompt_len = len(once((head,), lambda: prompt_ids(tokenizer, prompt)))
            if prompt_len >= max_len:
                raise UserError(f"{source}: row {source_row(ds, index)} has a prompt of {prompt_len} tokens, longer than the model's context of {max_len}")
        else:  # implicit prompt: the exchange both share (TRL's extraction), each answer keeping at least its last token
            limit = min(len(chosen), len(rejected)) - 1
            prompt_len = next((k for k in range(limit) if chosen[k] != rejected[k]), max(limit, 0))
        gold = 0.0
        if has_gold:
            gold = float((row["chosen_gold"] > row["rejected_gold"]) - (row["chosen_gold"] < row["rejected_gold"]))
        return {
            "prompt_key": _prompt_key(head) if prompt is not None else -1 - index,  # rows of one prompt share it
            "chosen_ids": chosen[:max_len],
            "rejected_ids": rejected[:max_len],
            "prompt_len": prompt_len,  # where the answers start: the tokens DPO scores
            "margin": float(row["margin"]) if has_margin else 0.0,
            "gold_sign": gold,  # +1 the label agrees with the noise-free judge, -1 it disagrees, 0 a tie / unknown
        }

    return ds.map(encode, with_indices=True, remove_columns=ds.column_names, desc="tokenising pairs")
