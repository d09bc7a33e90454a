"""The tokenizer: round trip, special tokens, chat template, saving and loading, the training cache."""

from __future__ import annotations

import json

import pytest
from pydoc_data.topics import topics
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from pipeline.errors import UserError
from pipeline.tokenizer import (
    ASSISTANT,
    BOS,
    EOS,
    PAD,
    ROLE_TOKENS,
    SPECIAL_TOKENS,
    USER,
    cached_tokenizer,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)

TEXTS = [topics[k] for k in sorted(topics)[:40]]  # ~100 KB of English reference text
SYSTEM_MSG = {"role": "system", "content": "Be brief."}
USER_MSG = {"role": "user", "content": "Reverse the list: a, b"}
ASSISTANT_MSG = {"role": "assistant", "content": "b, a"}
AWKWARD_TEXTS = [
    "plain words",
    "  leading spaces\n\ttabs and\nnewlines\r\nand CRLF\n\n",
    "ünïcödé — 東京 🙂👩‍👩‍👧 e\u0301 עברית",
    "a , b . c ! don 't",  # spaces before punctuation survive (no tokenization-space cleanup)
    "x = f(a, b)  # code\x00\x7f",
    "",
]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, 400)


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def chat_ids(tokenizer, messages, **kwargs) -> list[int]:
    # return_dict=False: transformers 5 returns a BatchEncoding from a tokenizing apply_chat_template by default.
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs))


def test_round_trip_of_any_text(tok):
    for text in AWKWARD_TEXTS:
        ids = ids_of(tok, text)
        assert tok.unk_token_id is None or tok.unk_token_id not in ids
        assert tok.decode(ids) == text


def test_special_tokens_are_single_distinct_ids(tok):
    ids = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert len(set(ids)) == len(SPECIAL_TOKENS) and all(isinstance(i, int) and 0 <= i < len(tok) for i in ids)
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == (PAD, BOS, EOS)
    assert tok.pad_token_id != tok.eos_token_id
    for token in SPECIAL_TOKENS:
        assert ids_of(tok, f"a{token}b")[1:-1] == [tok.convert_tokens_to_ids(token)]
    # Role tokens are special: decoding for display drops them.
    assert tok.decode(ids_of(tok, f"{USER}hi{EOS}"), skip_special_tokens=True) == "hi"
    assert tok.padding_side == "right" and tok.model_max_length >= 100_000


def test_vocab_size_below_bytes_plus_specials_is_a_user_error():
    with pytest.raises(UserError, match="vocab_size=100 is too small.*at least 262"):
        train_tokenizer(TEXTS, 100)


def test_chat_template_prompt_plus_answer_is_the_conversation_token_for_token(tok):
    for prompt in ([USER_MSG], [SYSTEM_MSG, USER_MSG], [USER_MSG, ASSISTANT_MSG, {"role": "user", "content": "Again"}]):
        full = chat_ids(tok, prompt + [ASSISTANT_MSG])
        prompt_ids = chat_ids(tok, prompt, add_generation_prompt=True)
        assert full == prompt_ids + ids_of(tok, ASSISTANT_MSG["content"]) + [tok.eos_token_id]
        assert full[0] == tok.bos_token_id and prompt_ids[-1] == tok.convert_tokens_to_ids(ASSISTANT)
    text = tok.apply_chat_template([SYSTEM_MSG, USER_MSG, ASSISTANT_MSG], tokenize=False)
    assert text == f"{BOS}<|system|>Be brief.{EOS}{USER}Reverse the list: a, b{EOS}{ASSISTANT}b, a{EOS}"


def test_assistant_tokens_mask_covers_answers_and_their_eos(tok):
    out = tok.apply_chat_template([USER_MSG, ASSISTANT_MSG], return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    answer = ids_of(tok, ASSISTANT_MSG["content"]) + [tok.eos_token_id]
    assert [i for i, m in zip(ids, mask) if m] == answer and mask[-len(answer) :] == [1] * len(answer)


def test_unknown_role_is_refused_by_the_template(tok):
    with pytest.raises(Exception, match="unknown chat role wizard"):
        tok.apply_chat_template([{"role": "wizard", "content": "hi"}], tokenize=False)


def test_render_writes_our_template_to_the_same_characters_as_jinja(tok):
    from pipeline.data.chat import render

    conversations = [
        [USER_MSG],
        [SYSTEM_MSG, USER_MSG, ASSISTANT_MSG],
        [USER_MSG, ASSISTANT_MSG, {"role": "user", "content": "{{ not a template }} {% raw %}"}, {"role": "assistant", "content": AWKWARD_TEXTS[2]}],
        [{"role": "user", "content": ""}],
    ]
    for messages in conversations:
        for gen in (False, True):
            assert render(tok, messages, add_generation_prompt=gen) == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    with pytest.raises(Exception, match="unknown chat role wizard"):  # the template's own error, as before
        render(tok, [USER_MSG, {"role": "wizard", "content": "hi"}])
    with pytest.raises(ValueError, match="empty conversation"):  # transformers' own refusal
        render(tok, [])
    other = train_tokenizer(TEXTS, 400)
    other.chat_template = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"  # a user's template goes through Jinja
    assert render(other, [USER_MSG]) == "[user]Reverse the list: a, b"


def test_trl_apply_chat_template_splits_prompt_from_completion(tok):
    from trl.data_utils import apply_chat_template, extract_prompt

    out = apply_chat_template({"prompt": [SYSTEM_MSG, USER_MSG], "completion": [ASSISTANT_MSG]}, tok)
    assert out["prompt"] == tok.apply_chat_template([SYSTEM_MSG, USER_MSG], tokenize=False, add_generation_prompt=True)
    assert out["completion"] == "b, a" + EOS
    pref = apply_chat_template({"prompt": [USER_MSG], "chosen": [ASSISTANT_MSG], "rejected": [{"role": "assistant", "content": "a, b"}]}, tok)
    assert pref["prompt"].endswith(ASSISTANT) and (pref["chosen"], pref["rejected"]) == ("b, a" + EOS, "a, b" + EOS)
    # Implicit prompt: TRL's extract_prompt takes the common leading messages as the prompt.
    implicit = extract_prompt({"chosen": [USER_MSG, ASSISTANT_MSG], "rejected": [USER_MSG, {"role": "assistant", "content": "no"}]})
    assert implicit["prompt"] == [USER_MSG] and apply_chat_template(implicit, tok)["chosen"] == "b, a" + EOS
    # A prompt ending in an assistant turn is continued (TRL's continue_final_message), not closed with EOS.
    cont = apply_chat_template({"prompt": [USER_MSG, {"role": "assistant", "content": "b,"}], "completion": [{"role": "assistant", "content": " a"}]}, tok)
    assert cont["prompt"].endswith(f"{ASSISTANT}b,")
    assert apply_chat_template({"messages": [USER_MSG, ASSISTANT_MSG]}, tok)["text"] == tok.apply_chat_template([USER_MSG, ASSISTANT_MSG], tokenize=False)


def test_saved_folder_and_bare_file_load_the_same(tok, tmp_path):
    folder = save_tokenizer(tok, tmp_path / "tok")
    assert folder == tmp_path / "tok" and (folder / "tokenizer.json").is_file() and (folder / "tokenizer_config.json").is_file()
    loaded = {
        "load_tokenizer(dir)": load_tokenizer(folder),
        "load_tokenizer(file)": load_tokenizer(folder / "tokenizer.json"),
        "AutoTokenizer": AutoTokenizer.from_pretrained(str(folder)),
        "PreTrainedTokenizerFast": PreTrainedTokenizerFast.from_pretrained(str(folder)),
    }
    conversation = [SYSTEM_MSG, USER_MSG, ASSISTANT_MSG]
    for name, other in loaded.items():
        for text in AWKWARD_TEXTS:
            assert ids_of(other, text) == ids_of(tok, text), name
            assert other.decode(ids_of(other, text)) == text, name
        assert chat_ids(other, conversation) == chat_ids(tok, conversation), name
        assert (other.pad_token_id, other.bos_token_id, other.eos_token_id) == (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id), name
        assert other.chat_template == tok.chat_template, name


def test_save_replaces_an_existing_folder_and_leaves_no_temporaries(tok, tmp_path):
    other = train_tokenizer(TEXTS[:5], 300)
    save_tokenizer(other, tmp_path / "tok")
    save_tokenizer(tok, tmp_path / "tok")
    assert [p.name for p in tmp_path.iterdir()] == ["tok"]
    assert load_tokenizer(tmp_path / "tok").get_vocab() == tok.get_vocab()


def test_a_foreign_tokenizer_file_gets_our_special_tokens_and_template(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    # GPT-2 style: byte-level BPE whose only special token is <|endoftext|>.
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(TEXTS, trainer)
    path = tmp_path / "tokenizer.json"
    backend.save(str(path))
    vocab_before = backend.get_vocab_size()
    tok = load_tokenizer(path)
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == (PAD, BOS, EOS)
    assert tok.eos_token_id == backend.token_to_id(EOS)  # the file's own EOS is kept, not duplicated
    assert len(tok) == vocab_before + 5 and len({tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}) == 6
    assert tok.chat_template and ids_of(tok, f"{USER}hi")[0] == tok.convert_tokens_to_ids(USER)
    assert tok.decode(chat_ids(tok, [USER_MSG, ASSISTANT_MSG]), skip_special_tokens=True) == USER_MSG["content"] + ASSISTANT_MSG["content"]

    # A GPT-2 style folder that pads with EOS gets a pad token of its own.
    hf = PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token=EOS, bos_token=EOS, pad_token=EOS)
    hf.save_pretrained(str(tmp_path / "gpt2ish"))
    tok = load_tokenizer(tmp_path / "gpt2ish")
    assert tok.pad_token == PAD and tok.pad_token_id != tok.eos_token_id
    assert all(t in tok.all_special_tokens for t in ROLE_TOKENS)


def test_cached_tokenizer_trains_once_per_key_and_vocab_size(tmp_path):
    calls = []

    def texts():
        calls.append(1)
        return iter(TEXTS[:10])

    first = cached_tokenizer(tmp_path, "corpus-a", texts, 300)
    second = cached_tokenizer(tmp_path, "corpus-a", texts, 300)
    assert len(calls) == 1
    assert first.get_vocab() == second.get_vocab() and ids_of(first, TEXTS[0]) == ids_of(second, TEXTS[0])
    assert [p.name.startswith("tokenizer-") for p in tmp_path.iterdir()] == [True]
    cached_tokenizer(tmp_path, "corpus-b", texts, 300)
    cached_tokenizer(tmp_path, "corpus-a", texts, 320)
    assert len(calls) == 3 and len(list(tmp_path.iterdir())) == 3


def test_bad_tokenizer_paths_are_named(tmp_path):
    with pytest.raises(UserError, match="nowhere/tokenizer.json does not exist"):
        load_tokenizer(tmp_path / "nowhere" / "tokenizer.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty has no tokenizer.json"):
        load_tokenizer(tmp_path / "empty")
    (tmp_path / "garbage.json").write_text("this is not json")
    with pytest.raises(UserError, match="garbage.json is not readable JSON"):
        load_tokenizer(tmp_path / "garbage.json")
    (tmp_path / "other.json").write_text(json.dumps({"model": "nonsense"}))
    with pytest.raises(UserError, match="cannot load a tokenizer from .*other.json"):
        load_tokenizer(tmp_path / "other.json")
