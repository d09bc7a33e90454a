"""Data: the embedded corpus, loading every file type and TRL format, column mapping, splits, formats,
row validation, packing, and the message each kind of bad input gets."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
from pydoc_data.topics import topics

import pipeline
from pipeline import data
from pipeline.data import DataFormat
from pipeline.data.corpus import CORPUS_MIN_CHARS, embedded_corpus_rows, materialize
from pipeline.data.loading import VALIDATE_BATCH_ROWS
from pipeline.data.packing import tokenize_and_pack
from pipeline.errors import UserError
from pipeline.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer


def U(text):
    return [{"role": "user", "content": text}]


def A(text):
    return [{"role": "assistant", "content": text}]


# name: (rows, (kind, conversational, implicit_prompt)); rows differ so that splits and round trips can be checked.
FORMATS = {
    "text": ([{"text": f"document {i} about birds"} for i in range(20)], ("language_modeling", False, False)),
    "messages": ([{"messages": U(f"hi {i}") + A(f"yo {i}")} for i in range(20)], ("language_modeling", True, False)),
    "prompt_only": ([{"prompt": f"say {i}"} for i in range(20)], ("prompt_only", False, False)),
    "prompt_only_conv": ([{"prompt": U(f"say {i}")} for i in range(20)], ("prompt_only", True, False)),
    "prompt_completion": ([{"prompt": f"{i}+1=", "completion": f"{i + 1}"} for i in range(20)], ("prompt_completion", False, False)),
    "prompt_completion_conv": ([{"prompt": U(f"{i}+1?"), "completion": A(f"{i + 1}")} for i in range(20)], ("prompt_completion", True, False)),
    "preference": ([{"prompt": f"{i}+1=", "chosen": f"{i + 1}", "rejected": f"{i + 2}"} for i in range(20)], ("preference", False, False)),
    "preference_conv": ([{"prompt": U(f"{i}+1?"), "chosen": A(f"{i + 1}"), "rejected": A(f"{i + 2}")} for i in range(20)], ("preference", True, False)),
    "implicit": ([{"chosen": f"{i}+1={i + 1}", "rejected": f"{i}+1={i + 2}"} for i in range(20)], ("preference", False, True)),
    "implicit_conv": ([{"chosen": U(f"{i}+1?") + A(f"{i + 1}"), "rejected": U(f"{i}+1?") + A(f"{i + 2}")} for i in range(20)], ("preference", True, True)),
}
STANDARD = [name for name, (_, (_, conversational, _)) in FORMATS.items() if not conversational]


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path_factory, monkeypatch):
    """datasets writes its Arrow files under a temporary folder, not under ~/.cache."""
    cache = tmp_path_factory.mktemp("hf_datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    return cache


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([topics[k] for k in sorted(topics)[:10]], 300)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write(rows, path, container: str):
    """Write rows as the given container; return the path to hand to load_data."""
    if container == "jsonl":
        return write_jsonl(path.with_suffix(".jsonl"), rows)
    if container == "json":  # a JSON array, the other shape users bring as .json
        target = path.with_suffix(".json")
        target.write_text(json.dumps(rows))
        return target
    dataset = datasets.Dataset.from_list(rows)
    if container == "parquet":
        dataset.to_parquet(str(path.with_suffix(".parquet")))
        return path.with_suffix(".parquet")
    if container == "csv":
        dataset.to_csv(str(path.with_suffix(".csv")), index=False)
        return path.with_suffix(".csv")
    if container == "saved":
        datasets.DatasetDict({"train": dataset.select(range(16)), "validation": dataset.select(range(16, 20))}).save_to_disk(str(path))
        return path
    if container == "split_files":
        path.mkdir()
        write_jsonl(path / "train.jsonl", rows[:16])
        write_jsonl(path / "validation.jsonl", rows[16:])
        return path
    raise ValueError(container)


def message_pattern(text: str) -> str:
    return re.escape(text)


# ---------------------------------------------------------------------------------------------
# The embedded corpus


def test_embedded_corpus_is_real_english_deterministic_and_split_by_document(capfd):
    # A second build in another process (another hash seed) must give the same rows; it runs
    # alongside this one, on the other core.
    digest = "import hashlib, json; from pipeline.data.corpus import embedded_corpus_rows as e; print(hashlib.sha256(json.dumps(e()).encode()).hexdigest())"
    root = str(Path(pipeline.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    other = subprocess.Popen([sys.executable, "-c", digest], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    corpus = embedded_corpus_rows()
    assert capfd.readouterr() == ("", "")  # prints nothing, not even SyntaxWarnings from old stdlib sources
    out, err = other.communicate(timeout=120)
    assert (out.strip(), err) == (hashlib.sha256(json.dumps(corpus).encode()).hexdigest(), "")
    assert set(corpus) == {"train", "validation"}
    train, val = [r["text"] for r in corpus["train"]], [r["text"] for r in corpus["validation"]]
    assert len(val) > 20 and 0.02 < len(val) / (len(train) + len(val)) < 0.1
    assert not set(train) & set(val) and len(set(train)) == len(train)
    total = sum(len(t) for t in train + val)
    assert 1_000_000 < total < 4_000_000
    assert all(len(t) >= CORPUS_MIN_CHARS for t in train + val)
    everything = train + val
    assert any(t.startswith("Customizing attribute access") for t in everything)  # a pydoc topic
    assert any(t.startswith("JSON (JavaScript Object Notation)") for t in everything)  # json's module docstring


def test_materialize_writes_once_and_is_read_by_the_user_loader(tmp_path):
    texts = [topics[k] for k in sorted(topics)[:55]]
    rows = {"train": [{"text": t} for t in texts[:50]], "validation": [{"text": t} for t in texts[50:]]}
    folder = materialize(rows, tmp_path / "corpus")
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == ["train.jsonl", "validation.jsonl"]
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert materialize(rows, folder) == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps  # nothing rewritten
    ds = data.load_data(str(folder))
    assert [r["text"] for r in ds["train"]] == [r["text"] for r in rows["train"]]
    assert [r["text"] for r in ds["validation"]] == [r["text"] for r in rows["validation"]]
    # Rows from a changed generator replace the old files instead of being shadowed by them.
    materialize({"train": rows["train"][:10], "validation": rows["validation"]}, folder)
    assert len((folder / "train.jsonl").read_text().splitlines()) == 10
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------
# Loading


@pytest.mark.parametrize("container", ["jsonl", "json", "parquet", "saved", "split_files"])
@pytest.mark.parametrize("name", FORMATS)
def test_every_format_loads_from_every_container(tmp_path, name, container):
    from trl.data_utils import is_conversational

    rows, expected = FORMATS[name]
    ds = data.load_data(str(write(rows, tmp_path / "d", container)), val_fraction=0.2)
    assert len(ds["train"]) == 16 and len(ds["validation"]) == 4
    assert sorted(map(json.dumps, list(ds["train"]) + list(ds["validation"]))) == sorted(map(json.dumps, rows))
    fmt = data.detect_format(ds["train"])
    assert (fmt.kind, fmt.conversational, fmt.implicit_prompt) == expected
    assert fmt.conversational == is_conversational(ds["train"][0])  # agrees with TRL's own test
    data.validate_rows(ds["train"], fmt, "d")


@pytest.mark.parametrize("name", STANDARD)
def test_flat_formats_load_from_csv_as_text(tmp_path, name):
    rows, expected = FORMATS[name]
    ds = data.load_data(str(write(rows, tmp_path / "d", "csv")), val_fraction=0.2)
    assert sorted(map(json.dumps, list(ds["train"]) + list(ds["validation"]))) == sorted(map(json.dumps, rows))
    fmt = data.detect_format(ds["train"])
    assert (fmt.kind, fmt.conversational, fmt.implicit_prompt) == expected
    data.validate_rows(ds["train"], fmt, "d.csv")  # "2" stayed the string "2", not the number 2


def test_csv_from_a_spreadsheet_keeps_numbers_as_text_and_empty_cells_as_missing(tmp_path):
    path = tmp_path / "sheet.csv"
    path.write_bytes("\ufeffprompt,completion\r\n2+2=,4\r\n3+3=,6\r\n4+4=,\r\n".encode())  # Excel writes a BOM and CRLF
    folder = tmp_path / "sheet"
    folder.mkdir()
    (folder / "train.csv").write_bytes(path.read_bytes())
    (folder / "validation.csv").write_bytes(path.read_bytes())
    train = data.load_data(str(folder))["train"]
    assert train.column_names == ["prompt", "completion"] and train[0] == {"prompt": "2+2=", "completion": "4"}
    with pytest.raises(UserError, match=message_pattern("train.csv, row 2, column 'completion': expected non-empty text, got None")):
        data.validate_rows(train, data.detect_format(train), str(folder / "train.csv"))


def test_text_files_give_one_document_per_paragraph_or_per_line(tmp_path):
    prose = tmp_path / "book.txt"
    prose.write_text("First paragraph,\nwrapped over lines.\n\n\nSecond one.\r\n\r\nThird.\n  \n\nFourth\n")
    ds = data.load_data(str(prose), val_fraction=0.25, seed=1)
    docs = sorted(list(ds["train"]["text"]) + list(ds["validation"]["text"]))
    assert docs == sorted(["First paragraph,\nwrapped over lines.", "Second one.", "Third.", "Fourth"])
    lines = tmp_path / "lines.txt"
    lines.write_text("".join(f"sentence {i}\n" for i in range(20)))
    ds = data.load_data(str(lines), val_fraction=0.25)
    assert sorted(list(ds["train"]["text"]) + list(ds["validation"]["text"])) == sorted(f"sentence {i}" for i in range(20))


def test_split_names_come_from_file_names(tmp_path):
    folder = tmp_path / "files"
    folder.mkdir()
    rows = [{"text": f"t{i}"} for i in range(10)]
    datasets.Dataset.from_list(rows[:6]).to_parquet(str(folder / "train-00000-of-00002.parquet"))
    datasets.Dataset.from_list(rows[6:8]).to_parquet(str(folder / "train-00001-of-00002.parquet"))
    datasets.Dataset.from_list(rows[8:9]).to_parquet(str(folder / "dev.parquet"))
    datasets.Dataset.from_list(rows[9:]).to_parquet(str(folder / "TEST.parquet"))
    ds = data.load_data(str(folder))
    assert {k: len(v) for k, v in ds.items()} == {"train": 8, "validation": 1, "test": 1}
    other = tmp_path / "other"
    other.mkdir()
    write_jsonl(other / "my_corpus.jsonl", rows)  # no split name: it is the training data
    write_jsonl(other / "valid.jsonl", rows[:2])
    (other / ".hidden.jsonl").write_text("not json")
    (other / "README.md").write_text("ignored")
    ds = data.load_data(str(other))
    assert {k: len(v) for k, v in ds.items()} == {"train": 10, "validation": 2}


def test_saved_splits_named_val_or_dev_become_validation(tmp_path):
    rows = [{"text": f"t{i}"} for i in range(10)]
    saved = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "dev": datasets.Dataset.from_list(rows[:3])})
    saved.save_to_disk(str(tmp_path / "dd"))
    assert {k: len(v) for k, v in data.load_data(str(tmp_path / "dd")).items()} == {"train": 10, "validation": 3}
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "single"))  # a bare Dataset is the train split
    assert {k: len(v) for k, v in data.load_data(str(tmp_path / "single"), val_fraction=0.2).items()} == {"train": 8, "validation": 2}


def test_held_out_split_is_deterministic_disjoint_and_only_carved_when_absent(tmp_path):
    path = str(write_jsonl(tmp_path / "d.jsonl", [{"text": f"doc {i}"} for i in range(200)]))
    a, b, c = data.load_data(path, seed=3), data.load_data(path, seed=3), data.load_data(path, seed=4)
    assert list(a["validation"]["text"]) == list(b["validation"]["text"]) and list(a["train"]["text"]) == list(b["train"]["text"])
    assert list(a["validation"]["text"]) != list(c["validation"]["text"])
    assert len(a["validation"]) == 10 and len(a["train"]) == 190
    assert not set(a["validation"]["text"]) & set(a["train"]["text"])
    folder = write([{"text": f"doc {i}"} for i in range(20)], tmp_path / "given", "split_files")
    ds = data.load_data(str(folder), val_fraction=0.5)
    assert (len(ds["train"]), len(ds["validation"])) == (16, 4)  # a validation file is used as it is


def test_column_mapping_renames_to_trl_columns(tmp_path):
    path = str(write_jsonl(tmp_path / "qa.jsonl", [{"question": f"q{i}", "answer": f"a{i}", "id": i} for i in range(10)]))
    ds = data.load_data(path, columns={"question": "prompt", "answer": "completion"})
    assert ds["train"].column_names == ["prompt", "completion", "id"]
    assert data.detect_format(ds["validation"]) == DataFormat("prompt_completion", False)
    with pytest.raises(UserError, match=message_pattern("names column 'query', which ") + ".*qa.jsonl.*" + message_pattern("[question, answer, id]")):
        data.load_data(path, columns={"query": "prompt"})
    with pytest.raises(UserError, match="renames onto 'id', which .* already has"):
        data.load_data(path, columns={"question": "id"})


# ---------------------------------------------------------------------------------------------
# Formats


def test_detect_format_reads_column_types_not_the_first_row():
    rows = [{"prompt": [], "completion": A("x")}, {"prompt": U("q"), "completion": A("a")}]
    assert data.detect_format(datasets.Dataset.from_list(rows)) == DataFormat("prompt_completion", True)
    extra = datasets.Dataset.from_list([{"text": "t", "source": "web", "score": 1.0}])
    assert data.detect_format(extra) == DataFormat("language_modeling", False)
    with pytest.raises(UserError, match="mix standard and conversational data: text in prompt but lists of messages in completion"):
        data.detect_format(datasets.Dataset.from_list([{"prompt": "q", "completion": A("a")}]))


def test_require_format_names_stage_columns_and_what_it_takes():
    ds = datasets.Dataset.from_list(FORMATS["preference"][0])
    assert data.require_format(ds, {"preference"}, "reward", "prefs.jsonl") == DataFormat("preference", False)
    expected = (
        "stage 'sft' cannot train on prefs.jsonl: it has columns [prompt, chosen, rejected] (preference format); "
        "sft expects language modeling (text or messages), prompt-completion (prompt, completion)"
    )
    with pytest.raises(UserError, match=f"^{message_pattern(expected)}$"):
        data.require_format(ds, {"prompt_completion", "language_modeling"}, "sft", "prefs.jsonl")
    with pytest.raises(UserError, match=r"stage 'pretrain' cannot train on q.jsonl: the columns \[question\] match none.*pretrain expects language modeling"):
        data.require_format(datasets.Dataset.from_list([{"question": "q"}]), {"language_modeling"}, "pretrain", "q.jsonl")


# ---------------------------------------------------------------------------------------------
# Bad input: each gets a message naming what is wrong and where

BAD_ROWS = {
    "missing chosen": ([{"prompt": "p", "rejected": "r"}] * 5, "look like preference data but the 'chosen' column is missing"),
    "unknown columns": ([{"question": U("p"), "answer": A("c")}] * 5, "the columns [question, answer] match none of TRL's dataset formats: language modeling (text or messages), prompt-only (prompt)"),
    "unknown role": ([{"messages": U("hi")}] * 3 + [{"messages": U("hi") + [{"role": "wizard", "content": "hi"}]}], "row 3, column 'messages', message 1: unknown role 'wizard'; expected one of system, user, assistant"),
    "empty completion": ([{"prompt": "p", "completion": "c"}] * 2 + [{"prompt": "p", "completion": "  "}], "row 2, column 'completion': expected non-empty text, got '  '"),
    "null text": ([{"text": "a"}, {"text": None}], "row 1, column 'text': expected non-empty text, got None"),
    "empty chosen": ([{"prompt": U("p"), "chosen": [], "rejected": A("r")}], "row 0, column 'chosen': expected a non-empty list of {role, content} messages, got []"),
    "no answer": ([{"prompt": U("p"), "chosen": A("c"), "rejected": U("only a question")}], "row 0, column 'rejected': expected an assistant message with non-empty content"),
    "blank answer": ([{"prompt": U("p"), "completion": A(" ")}], "row 0, column 'completion': expected an assistant message with non-empty content"),
    "message not a dict": ([{"messages": ["hello", "there"]}], "row 0, column 'messages', message 0: expected a {role, content} dict, got 'hello'"),
    "no content key": ([{"messages": [{"role": "user", "text": "hi"}]}], "row 0, column 'messages', message 0: expected a {role, content} dict, got {'role': 'user', 'text': 'hi'}"),
    # datasets stores messages with differing keys as JSON text; they are checked row by row.
    "no content in one row": ([{"messages": U("a")}, {"messages": [{"role": "user"}]}], "row 1, column 'messages', message 0: expected a {role, content} dict, got {'role': 'user'}"),
    "null content": ([{"messages": U("a")}, {"messages": [{"role": "user", "content": None}]}], "row 1, column 'messages', message 0: expected text content, got {'role': 'user', 'content': None}"),
    "text and messages across rows": ([{"prompt": "p", "completion": "c"}, {"prompt": U("p"), "completion": "c"}], "row 1, column 'prompt': expected non-empty text, got [{'role': 'user', 'content': 'p'}]"),
    "number as text": ([{"prompt": "2+2=", "completion": 4}], "row 0, column 'completion': expected non-empty text, got 4"),
}


@pytest.mark.parametrize("case", BAD_ROWS)
def test_bad_rows_are_named(tmp_path, case):
    rows, message = BAD_ROWS[case]
    # A validation file keeps load_data from carving (and shuffling), so row numbers are file lines.
    folder = tmp_path / "bad"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", rows)
    write_jsonl(folder / "validation.jsonl", rows[:1])
    train = data.load_data(str(folder))["train"]
    source = str(folder / "train.jsonl")
    with pytest.raises(UserError, match=message_pattern(message)) as err:
        data.validate_rows(train, data.detect_format(train), source)
    if "row" in message:
        assert str(err.value).startswith(f"{source}, row ")


def test_preference_data_given_to_a_language_modeling_stage(tmp_path):
    path = str(write_jsonl(tmp_path / "prefs.jsonl", FORMATS["preference_conv"][0]))
    ds = data.load_data(path)
    with pytest.raises(UserError, match=message_pattern(f"stage 'pretrain' cannot train on {path}: it has columns [prompt, chosen, rejected] (conversational preference format); pretrain expects language modeling (text or messages)")):
        data.require_format(ds["train"], {"language_modeling"}, "pretrain", path)


def test_bad_paths_and_files_are_named(tmp_path):
    with pytest.raises(UserError, match=message_pattern(f"data path {tmp_path}/nope.jsonl does not exist")):
        data.load_data(str(tmp_path / "nope.jsonl"))
    with pytest.raises(UserError, match=message_pattern("data path ./no/such/folder does not exist")):
        data.load_data("./no/such/folder")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(UserError, match=message_pattern(f"data file {tmp_path}/empty.jsonl is empty")):
        data.load_data(str(tmp_path / "empty.jsonl"))
    (tmp_path / "blank.txt").write_text("\n \n\n")
    with pytest.raises(UserError, match=message_pattern(f"data file {tmp_path}/blank.txt holds no rows")):
        data.load_data(str(tmp_path / "blank.txt"))
    (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(UserError, match=message_pattern(f"{tmp_path}/broken.jsonl, line 2, column 10: not valid JSON (Expecting value)")):
        data.load_data(str(tmp_path / "broken.jsonl"))
    (tmp_path / "notes.md").write_text("# notes")
    with pytest.raises(UserError, match="notes.md has an unknown type; expected one of .jsonl, .json"):
        data.load_data(str(tmp_path / "notes.md"))
    (tmp_path / "mixed").mkdir()
    write_jsonl(tmp_path / "mixed" / "train.jsonl", [{"text": "a"}] * 3)
    (tmp_path / "mixed" / "validation.csv").write_text("text\nb\n")
    with pytest.raises(UserError, match=r"mixed mixes file types \(csv, json\)"):
        data.load_data(str(tmp_path / "mixed"))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(UserError, match="nothing holds no data files"):
        data.load_data(str(tmp_path / "nothing"))
    write_jsonl(tmp_path / "one.jsonl", [{"text": "a"}])
    with pytest.raises(UserError, match="one.jsonl has 1 row: too few to hold out a validation split"):
        data.load_data(str(tmp_path / "one.jsonl"))
    with pytest.raises(UserError, match="val_fraction=1.5 must be between 0 and 1"):
        data.load_data(str(tmp_path / "one.jsonl"), val_fraction=1.5)


def test_an_unreachable_hub_name_is_named(monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # never try the network from a test
    with pytest.raises(UserError, match="data path no-such-org/no-such-dataset-xyz is neither a local file or folder nor a reachable hub dataset"):
        data.load_data("no-such-org/no-such-dataset-xyz")


def test_validation_is_columnar_and_names_the_row_across_batches():
    n = 100_000
    good = {"prompt": U("question"), "chosen": A("right"), "rejected": A("wrong")}
    ds = datasets.Dataset.from_dict({k: [v] * n for k, v in good.items()})
    fmt = data.detect_format(ds)
    data.validate_rows(ds, fmt, "big")
    bad_index = 2 * VALIDATE_BATCH_ROWS + 17  # in the third batch: offsets must add up
    ds = datasets.Dataset.from_dict({k: [v] * bad_index + [U("x") if k == "chosen" else v] + [v] * 5 for k, v in good.items()})
    with pytest.raises(UserError, match=message_pattern(f"big, row {bad_index}, column 'chosen': expected an assistant message")):
        data.validate_rows(ds, fmt, "big")
    # Row numbers are those of the data as loaded, also after carving (an indices mapping): the user's rows.
    shuffled = ds.select(list(range(len(ds) - 1, -1, -1)))
    with pytest.raises(UserError, match=message_pattern(f"row {bad_index}, column 'chosen'")):
        data.validate_rows(shuffled, fmt, "big")


# ---------------------------------------------------------------------------------------------
# Packing


def test_pack_is_bos_ids_eos_per_document_cut_into_fixed_rows(tmp_path, tok):
    texts = [f"The {i}th module docstring says hello.\nSecond line {i}." for i in range(30)]
    ds = data.load_data(str(write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])))["train"]
    packed = tokenize_and_pack(ds, tok, block_size=16)
    expected = []
    for text in ds["text"]:
        expected += [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    rows = packed["input_ids"]
    assert packed.column_names == ["input_ids"] and len(rows) == len(expected) // 17
    assert all(len(r) == 17 for r in rows)
    assert [t for r in rows for t in r] == expected[: len(rows) * 17]  # in order, remainder dropped
    assert rows[0][0] == tok.bos_token_id
    assert packed.with_format("torch")[:2]["input_ids"].shape == (2, 17)


def test_pack_is_cached_on_disk_for_file_backed_data(tmp_path, tok, monkeypatch):
    ds = data.load_data(str(write_jsonl(tmp_path / "d.jsonl", [{"text": f"text number {i} " * 5} for i in range(40)])))["train"]
    first = tokenize_and_pack(ds, tok, block_size=8)
    cache_file = first.cache_files[0]["filename"]
    assert cache_file.startswith(str(datasets.config.HF_DATASETS_CACHE))
    # A fresh tokenizer object read back from disk (as in a second run) finds the same cache file,
    # without tokenizing anything.
    reloaded = load_tokenizer(save_tokenizer(tok, tmp_path / "tok"))

    def refuse(*args, **kwargs):
        raise AssertionError("tokenized again instead of reading the cache")

    with monkeypatch.context() as patch:
        patch.setattr(type(reloaded), "__call__", refuse)
        second = tokenize_and_pack(ds, reloaded, block_size=8)
    assert second.cache_files[0]["filename"] == cache_file
    assert second["input_ids"][:] == first["input_ids"][:]
    other_block = tokenize_and_pack(ds, tok, block_size=12)
    other_tok = tokenize_and_pack(ds, train_tokenizer(["different text entirely"] * 10, 280), block_size=8)
    assert len({cache_file, other_block.cache_files[0]["filename"], other_tok.cache_files[0]["filename"]}) == 3


def test_too_little_text_for_one_block_is_named(tmp_path, tok):
    ds = datasets.Dataset.from_list([{"text": "ab"}, {"text": "cd"}])
    n_tokens = sum(len(tok(t, add_special_tokens=False)["input_ids"]) + 2 for t in ("ab", "cd"))
    with pytest.raises(UserError, match=message_pattern(f"holds {n_tokens} tokens (with BOS and EOS per document), fewer than one block of 1001 tokens (block_size=1000 + 1)")):
        tokenize_and_pack(ds, tok, block_size=1000)
    with pytest.raises(UserError, match=r"needs a 'text' column; the data has columns \[prompt\]"):
        tokenize_and_pack(datasets.Dataset.from_list([{"prompt": "p"}]), tok, block_size=4)
