"""Data loading: every file type and TRL format, column mapping, splits, packing, and bad input."""

from __future__ import annotations

import json

import datasets
import pytest

from pipeline import data
from pipeline.errors import UserError
from pipeline.tokenizer import train_tokenizer

U = lambda text: [{"role": "user", "content": text}]  # noqa: E731
A = lambda text: [{"role": "assistant", "content": text}]  # noqa: E731

FORMATS = {
    "text": ({"text": "hello world"}, ("language_modeling", False, False)),
    "messages": ({"messages": U("hi") + A("yo")}, ("language_modeling", True, False)),
    "prompt_only": ({"prompt": "say hi"}, ("prompt_only", False, False)),
    "prompt_only_conv": ({"prompt": U("say hi")}, ("prompt_only", True, False)),
    "prompt_completion": ({"prompt": "2+2=", "completion": "4"}, ("prompt_completion", False, False)),
    "prompt_completion_conv": ({"prompt": U("2+2?"), "completion": A("4")}, ("prompt_completion", True, False)),
    "preference": ({"prompt": "2+2=", "chosen": "4", "rejected": "5"}, ("preference", False, False)),
    "preference_conv": ({"prompt": U("2+2?"), "chosen": A("4"), "rejected": A("5")}, ("preference", True, False)),
    "implicit": ({"chosen": "2+2=4", "rejected": "2+2=5"}, ("preference", False, True)),
    "implicit_conv": ({"chosen": U("2+2?") + A("4"), "rejected": U("2+2?") + A("5")}, ("preference", True, True)),
}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("name", FORMATS)
def test_every_trl_format_is_detected(tmp_path, name):
    row, expected = FORMATS[name]
    ds = data.load_data(str(write_jsonl(tmp_path / "d.jsonl", [row] * 20)))
    fmt = data.detect_format(ds["train"])
    assert (fmt.kind, fmt.conversational, fmt.implicit_prompt) == expected
    data.validate_rows(ds["train"], fmt, "d.jsonl")


@pytest.mark.parametrize("suffix", ["jsonl", "json", "parquet", "csv", "txt"])
def test_every_file_type_loads(tmp_path, suffix):
    rows = [{"text": f"document number {i}"} for i in range(40)]
    path = tmp_path / f"corpus.{suffix}"
    if suffix == "txt":
        path.write_text("".join(r["text"] + "\n" for r in rows))
    else:
        getattr(datasets.Dataset.from_list(rows), {"jsonl": "to_json", "json": "to_json", "parquet": "to_parquet", "csv": "to_csv"}[suffix])(str(path))
    ds = data.load_data(str(path), val_fraction=0.1)
    assert len(ds["train"]) + len(ds["validation"]) == 40 and len(ds["validation"]) == 4
    assert ds["train"][0]["text"].startswith("document number")


def test_saved_dataset_folder_and_split_files(tmp_path):
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": f"t{i}"} for i in range(10)]), "test": datasets.Dataset.from_list([{"text": "x"}])})
    dd.save_to_disk(str(tmp_path / "saved"))
    loaded = data.load_data(str(tmp_path / "saved"))
    assert set(loaded) == {"train", "validation", "test"}
    folder = tmp_path / "files"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", [{"text": f"t{i}"} for i in range(10)])
    write_jsonl(folder / "dev.jsonl", [{"text": "v"}] * 3)
    loaded = data.load_data(str(folder))
    assert len(loaded["train"]) == 10 and len(loaded["validation"]) == 3


def test_held_out_carving_is_deterministic_and_disjoint(tmp_path):
    path = str(write_jsonl(tmp_path / "d.jsonl", [{"text": f"doc {i}"} for i in range(200)]))
    a, b = data.load_data(path, seed=3), data.load_data(path, seed=3)
    assert a["validation"]["text"] == b["validation"]["text"]
    assert not set(a["validation"]["text"]) & set(a["train"]["text"])


def test_column_mapping(tmp_path):
    path = str(write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}] * 10))
    ds = data.load_data(path, columns={"question": "prompt", "answer": "completion"})
    assert data.detect_format(ds["train"]).kind == "prompt_completion"
    with pytest.raises(UserError, match=r"\['query'\].*\['question', 'answer'\]"):
        data.load_data(path, columns={"query": "prompt"})


def test_embedded_corpus_is_deterministic_and_disjoint():
    a = data.embedded_corpus_rows()
    assert a == data.embedded_corpus_rows()
    assert len(a["train"]) > 1000 and len(a["validation"]) > 50
    assert not {r["text"] for r in a["train"]} & {r["text"] for r in a["validation"]}


def test_embedded_task_goes_through_the_same_loader(tmp_path):
    folder = data.embedded_task(tmp_path, "preference")
    ds = data.load_data(str(folder))
    assert set(ds) == {"train", "validation", "test"}
    assert data.detect_format(ds["train"]) == data.DataFormat("preference", True, False)


def test_pack_blocks_have_bos_eos_and_fixed_width(tmp_path):
    tok = train_tokenizer(["alpha beta gamma delta " * 20] * 5, 300)
    path = str(write_jsonl(tmp_path / "d.jsonl", [{"text": "alpha beta gamma " * (i + 1)} for i in range(30)]))
    ds = data.load_data(path)
    packed = data.tokenize_and_pack(ds["train"], tok, block_size=16)
    assert len(packed) > 0 and all(len(r) == 17 for r in packed["input_ids"])
    assert packed[0]["input_ids"][0] == tok.bos_token_id
    flat = [t for r in packed["input_ids"] for t in r]
    assert flat.count(tok.eos_token_id) >= 1
    again = data.tokenize_and_pack(ds["train"], tok, block_size=16)
    assert again.cache_files and again.cache_files[0]["filename"] == packed.cache_files[0]["filename"]
    with pytest.raises(UserError, match="fewer than one block"):
        data.tokenize_and_pack(ds["train"].select(range(1)), tok, block_size=1000)


BAD = [
    ([{"prompt": "p", "chosen": "c"}] * 5, None, "'chosen' but no 'rejected' column"),
    ([{"messages": [{"role": "wizard", "content": "hi"}]}] * 5, None, "unknown role 'wizard'"),
    ([{"prompt": "p", "completion": ""}] * 5, None, "column 'completion': expected non-empty text"),
    ([{"question": U("p"), "answer": A("c")}] * 5, None, "match none"),
    ([{"prompt": "p", "chosen": "c", "rejected": "r"}] * 5, "sft", "stage 'sft' cannot train on"),
]


@pytest.mark.parametrize("rows, stage, message", BAD)
def test_bad_rows_are_named(tmp_path, rows, stage, message):
    path = str(write_jsonl(tmp_path / "bad.jsonl", rows))
    ds = data.load_data(path)
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")) as err:
        if stage == "sft":
            data.require_format(ds["train"], {"language_modeling", "prompt_completion"}, "sft", path)
        fmt = data.detect_format(ds["train"])
        data.validate_rows(ds["train"], fmt, path)
    assert "bad.jsonl" in str(err.value) or "columns" in str(err.value)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        data.load_data(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match="empty.jsonl is empty"):
        data.load_data(str(tmp_path / "empty.jsonl"))
    with pytest.raises(UserError, match="neither an existing local file"):
        data.load_data("no-such-org/no-such-dataset-xyz")
