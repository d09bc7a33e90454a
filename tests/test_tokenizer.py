"""The tokenizer: round trip, special tokens, chat template, saving and loading, the training cache."""

from __future__ import annotations

import pytest
from pydoc_data.topics import topics
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from pipeline.errors import UserError
from pipeline.tokenizer import BOS, EOS, PAD, ROLE_TOKENS, cached_tokenizer, load_tokenizer, save_tokenizer, train_tokenizer

TEXTS = [topics[k] for k in sorted(topics)[:40]]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, 400)


def test_round_trip_of_any_text(tok):
    for text in ["plain words", "  leading spaces\n\ttabs and\nnewlines", "ünïcödé — 東京 🙂", "x = f(a, b)  # code"]:
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_special_tokens_are_single_distinct_ids(tok):
    ids = [tok.convert_tokens_to_ids(t) for t in (PAD, BOS, EOS, *ROLE_TOKENS)]
    assert len(set(ids)) == len(ids) and tok.unk_token_id not in ids
    assert tok.pad_token_id != tok.eos_token_id
    assert tok("<|user|>hi<|endoftext|>", add_special_tokens=False)["input_ids"][0] == tok.convert_tokens_to_ids("<|user|>")


def test_chat_template_renders_prefixes_as_prefixes(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reverse: a, b"}, {"role": "assistant", "content": "b, a"}]
    full = tok.apply_chat_template(messages, tokenize=False)
    prompt = tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert full == prompt + "b, a" + EOS
    ids = tok(full, add_special_tokens=False)["input_ids"]
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids and ids[-1] == tok.eos_token_id and ids[0] == tok.bos_token_id


def test_trl_apply_chat_template_splits_prompt_and_completion(tok):
    from trl.data_utils import apply_chat_template

    out = apply_chat_template({"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "yo"}]}, tok)
    assert out["prompt"].endswith("<|assistant|>") and out["completion"] == "yo" + EOS


def test_saved_folder_and_bare_file_load_the_same(tok, tmp_path):
    folder = save_tokenizer(tok, tmp_path / "tok")
    again = load_tokenizer(folder)
    bare = load_tokenizer(folder / "tokenizer.json")
    auto = AutoTokenizer.from_pretrained(folder)
    fast = PreTrainedTokenizerFast.from_pretrained(folder)
    text = "<|user|>Sort: 3, 1<|endoftext|><|assistant|>1, 3<|endoftext|>"
    expected = tok(text, add_special_tokens=False)["input_ids"]
    for other in (again, bare, auto, fast):
        assert other(text, add_special_tokens=False)["input_ids"] == expected
    assert bare.pad_token == PAD and bare.chat_template and auto.chat_template == tok.chat_template


def test_a_foreign_tokenizer_file_gets_our_special_tokens(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel()
    backend.train_from_iterator(TEXTS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    path = tmp_path / "tokenizer.json"
    backend.save(str(path))
    tok = load_tokenizer(path)
    assert tok.pad_token == PAD and tok.bos_token == BOS and tok.eos_token == EOS
    assert all(t in tok.get_vocab() for t in ROLE_TOKENS) and tok.chat_template


def test_cached_tokenizer_trains_once(tmp_path):
    calls = []

    def texts():
        calls.append(1)
        return TEXTS

    first = cached_tokenizer(tmp_path, "corpus-a", texts, 300)
    second = cached_tokenizer(tmp_path, "corpus-a", texts, 300)
    assert len(calls) == 1 and first.get_vocab() == second.get_vocab()
    cached_tokenizer(tmp_path, "corpus-b", texts, 300)
    assert len(calls) == 2


def test_missing_tokenizer_path_is_named(tmp_path):
    with pytest.raises(UserError, match="nowhere/tokenizer.json"):
        load_tokenizer(tmp_path / "nowhere" / "tokenizer.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no tokenizer.json"):
        load_tokenizer(tmp_path / "empty")
