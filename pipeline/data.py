"""Data through HF `datasets`, in TRL's standard dataset formats, and the embedded default data.

One loader for everything: a user's file or folder (`data.path=`), a saved dataset, a hub name, and
the embedded defaults, which are written to JSON-lines files first and then read by that same loader.

TRL's formats (each standard = strings, or conversational = lists of {role, content} messages):
    language modelling   text            | messages
    prompt-only          prompt
    prompt-completion    prompt, completion
    preference           prompt, chosen, rejected  (or implicit prompt: chosen, rejected)
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from pipeline.errors import UserError

FILE_TYPES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
TASK_VERSION = "v3"  # bump when the embedded task generator changes, so cached files are rebuilt
SPLIT_NAMES = {
    "train": "train",
    "validation": "validation",
    "val": "validation",
    "valid": "validation",
    "dev": "validation",
    "test": "test",
}
ROLES = {"system", "user", "assistant"}
FORMAT_COLUMNS = {
    "language_modeling": "text (or messages)",
    "prompt_only": "prompt",
    "prompt_completion": "prompt, completion",
    "preference": "prompt, chosen, rejected (or chosen, rejected)",
}
FORMAT_NAMES = {
    "language_modeling": "language modeling",
    "prompt_only": "prompt-only",
    "prompt_completion": "prompt-completion",
    "preference": "preference",
}


@dataclass(frozen=True)
class DataFormat:
    kind: str  # language_modeling | prompt_only | prompt_completion | preference
    conversational: bool
    implicit_prompt: bool = False

    def describe(self) -> str:
        name = FORMAT_NAMES[self.kind] + (" with implicit prompt" if self.implicit_prompt else "")
        return f"{'conversational ' if self.conversational else ''}{name}"


# ---------------------------------------------------------------------------------------------
# The embedded pretraining corpus: English text that ships with Python.


def _stdlib_docstrings() -> Iterable[tuple[str, str]]:
    """(module name, docstring) of the standard library's modules, read with ast (nothing is imported)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo", "__pycache__", "dist-packages"}
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if skip & set(rel.parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        name = ".".join(rel.with_suffix("").parts)
        documented = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        for node in (n for n in ast.walk(tree) if isinstance(n, documented)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= 120:
                label = name if node is tree else f"{name}.{node.name}"
                yield label, doc


def embedded_corpus_rows(seed: int = 0) -> dict[str, list[dict]]:
    """Python's reference documentation (pydoc topics) and stdlib docstrings, split by document.

    A document goes to validation when a hash of its text (and seed) says so (~5%), so the split is
    stable across machines and never puts one document in both.
    """
    from pydoc_data.topics import topics

    docs = [(f"topic:{k}", v.strip()) for k, v in sorted(topics.items()) if len(v.strip()) >= 200]
    docs += [(f"doc:{k}", v.strip()) for k, v in _stdlib_docstrings()]
    splits: dict[str, list[dict]] = {"train": [], "validation": []}
    seen: set[str] = set()
    for name, text in docs:
        if text in seen:  # the same docstring in two places (re-exports, copies) is one document
            continue
        seen.add(text)
        bucket = int(hashlib.sha1(f"{seed}:{text}".encode()).hexdigest()[:8], 16) % 100
        splits["validation" if bucket < 5 else "train"].append({"text": text})
    return splits


def materialize(rows_by_split: dict[str, list[dict]], directory: Path) -> Path:
    """Write <split>.jsonl per split (atomically) unless all are there already; return the folder."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for split, rows in rows_by_split.items():
        target = directory / f"{split}.jsonl"
        if target.is_file():
            continue
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, target)
    return directory


def embedded_task(cache_dir: Path, kind: str) -> Path:
    """The embedded instruction task's files of one kind (sft, preference, prompts), written on first use."""
    from pipeline import task

    directory = Path(cache_dir) / f"embedded/task-{TASK_VERSION}/{kind}"
    if all((directory / f"{s}.jsonl").is_file() for s in ("train", "validation", "test")):
        return directory
    return materialize(task.default_rows()[kind], directory)


# ---------------------------------------------------------------------------------------------
# Loading


def _looks_like_path(path: str) -> bool:
    """A local path rather than a hub name ('org/name' is a hub name; '/x', './x', 'a/b/c', 'x.jsonl' are paths)."""
    return path.startswith(("/", ".", "~")) or path.count("/") > 1 or Path(path).suffix.lower() in FILE_TYPES


def _split_of(file: Path) -> str | None:
    stem = file.name.split(".")[0].lower()
    return SPLIT_NAMES.get(stem)


def _load_files(files: dict[str, list[str]], source: str):
    import datasets

    kinds = {FILE_TYPES[Path(f).suffix.lower()] for fs in files.values() for f in fs}
    if len(kinds) > 1:
        raise UserError(f"{source} mixes file types {sorted(kinds)}; use one type per dataset")
    for fs in files.values():
        for f in fs:
            if Path(f).stat().st_size == 0:
                raise UserError(f"data file {f} is empty")
    try:
        return datasets.load_dataset(kinds.pop(), data_files=files)
    except Exception as e:
        raise UserError(f"cannot read {source}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def _load_path(path: Path):
    import datasets

    if path.is_file():
        if path.suffix.lower() not in FILE_TYPES:
            raise UserError(f"data file {path} has an unknown type; expected one of {sorted(FILE_TYPES)}")
        return _load_files({"train": [str(path)]}, str(path))
    if (path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file() or (path / "state.json").is_file():
        loaded = datasets.load_from_disk(str(path))
        return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})
    data_files = sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() in FILE_TYPES and not f.name.startswith("."))
    if not data_files:
        raise UserError(f"data folder {path} holds no data files ({', '.join(sorted(FILE_TYPES))}) and no saved dataset")
    files: dict[str, list[str]] = {}
    for f in data_files:
        split = _split_of(f) or "train"
        files.setdefault(split, []).append(str(f))
    return _load_files(files, str(path))


def load_data(path: str, columns: dict[str, str] | None = None, val_fraction: float = 0.05, seed: int = 0):
    """A DatasetDict with train and validation (and test where the data has it) from any supported source."""
    import datasets

    source = str(path)
    local = Path(os.path.expanduser(source))
    if local.exists():
        ds = _load_path(local)
    elif _looks_like_path(source):
        raise UserError(f"data path {source} does not exist")
    else:
        try:
            ds = datasets.load_dataset(source)
        except Exception as e:
            raise UserError(
                f"data.path={source} is neither an existing local file or folder nor a dataset the hub could provide "
                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            ) from None
    if not isinstance(ds, datasets.DatasetDict):
        ds = datasets.DatasetDict({"train": ds})
    if "train" not in ds:
        raise UserError(f"{source} has no train split (splits found: {sorted(ds)})")
    for split, part in ds.items():
        if len(part) == 0:
            raise UserError(f"{source}: the {split} split has no rows")
    if columns:
        present = ds["train"].column_names
        absent = [c for c in columns if c not in present]
        if absent:
            raise UserError(f"data.columns names {absent}, which {source} does not have; its columns are {present}")
        ds = ds.rename_columns(dict(columns))
    if "validation" not in ds:
        if len(ds["train"]) < 2:
            raise UserError(f"{source} has {len(ds['train'])} row: too few to hold out a validation split")
        parts = ds["train"].train_test_split(test_size=val_fraction, seed=seed, shuffle=True)
        ds["train"], ds["validation"] = parts["train"], parts["test"]
    return ds


# ---------------------------------------------------------------------------------------------
# Formats


def _is_messages(value) -> bool:
    return isinstance(value, list) and (not value or isinstance(value[0], dict))


def detect_format(dataset) -> DataFormat:
    """Which TRL format the columns (and the first row) say this dataset is in."""
    cols = set(dataset.column_names)
    first = dataset[0] if len(dataset) else {}
    pair = {"chosen", "rejected"} & cols
    if len(pair) == 1:
        (have,) = pair
        lacking = "rejected" if have == "chosen" else "chosen"
        raise UserError(f"the columns {sorted(cols)} look like preference data with '{have}' but no '{lacking}' column; preference rows need both")
    if {"chosen", "rejected"} <= cols:
        implicit = "prompt" not in cols
        return DataFormat("preference", _is_messages(first.get("chosen")), implicit)
    if {"prompt", "completion"} <= cols:
        return DataFormat("prompt_completion", _is_messages(first.get("prompt")))
    if "messages" in cols:
        return DataFormat("language_modeling", True)
    if "text" in cols:
        return DataFormat("language_modeling", False)
    if "prompt" in cols:
        return DataFormat("prompt_only", _is_messages(first.get("prompt")))
    formats = "; ".join(f"{FORMAT_NAMES[k]} ({v})" for k, v in FORMAT_COLUMNS.items())
    raise UserError(f"the columns {sorted(cols)} match none of TRL's dataset formats: {formats}. Rename columns with data.columns")


def require_format(dataset, allowed_kinds: Iterable[str], stage: str, source: str) -> DataFormat:
    fmt = detect_format(dataset)
    allowed = list(allowed_kinds)
    if fmt.kind not in allowed:
        wanted = "; ".join(f"{FORMAT_NAMES[k]} ({FORMAT_COLUMNS[k]})" for k in allowed)
        raise UserError(f"stage '{stage}' cannot train on {source}: it has columns {dataset.column_names} ({fmt.describe()} format); {stage} expects {wanted}")
    return fmt


def _check_text(value, where: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{where}: expected non-empty text, got {value!r}")


def _check_messages(value, where: str, allow_empty: bool = False) -> None:
    if not isinstance(value, list) or (not value and not allow_empty):
        raise UserError(f"{where}: expected a non-empty list of messages {{role, content}}, got {value!r}")
    for j, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise UserError(f"{where}, message {j}: expected a {{role, content}} dict, got {message!r}")
        if message["role"] not in ROLES:
            raise UserError(f"{where}, message {j}: unknown role {message['role']!r}; roles are {sorted(ROLES)}")
        if not isinstance(message["content"], str):
            raise UserError(f"{where}, message {j}: content must be text, got {message['content']!r}")


def validate_rows(dataset, fmt: DataFormat, source: str) -> None:
    """Every row has what its format needs: text where text is needed, well-formed messages, known roles."""
    columns = {
        "language_modeling": ["messages"] if fmt.conversational else ["text"],
        "prompt_only": ["prompt"],
        "prompt_completion": ["prompt", "completion"],
        "preference": (["chosen", "rejected"] if fmt.implicit_prompt else ["prompt", "chosen", "rejected"]),
    }[fmt.kind]
    check = _check_messages if fmt.conversational else _check_text
    for column in columns:
        for i, value in enumerate(dataset[column]):
            check(value, f"{source}, row {i}, column '{column}'")
    if fmt.conversational and fmt.kind in ("prompt_completion", "preference"):
        for column in [c for c in columns if c != "prompt"]:
            for i, value in enumerate(dataset[column]):
                if not any(m["role"] == "assistant" and m["content"].strip() for m in value):
                    raise UserError(f"{source}, row {i}, column '{column}': expected an assistant message with content")


# ---------------------------------------------------------------------------------------------
# Tokenisation for pretraining


def tokenize_and_pack(ds, tokenizer, block_size: int, num_proc: int = 1):
    """Documents as BOS + ids + EOS, concatenated and cut into rows of block_size + 1 tokens.

    The +1 gives each row its inputs [:-1] and shifted targets [1:]. datasets caches the result next
    to file-backed data, so a second run with the same data and tokenizer skips the work.
    """
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    width = block_size + 1

    def pack(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        flat = [t for doc in ids for t in (bos, *doc, eos)]
        n = len(flat) // width * width
        return {"input_ids": [flat[i : i + width] for i in range(0, n, width)]}

    packed = ds.map(pack, batched=True, batch_size=1000, num_proc=num_proc if num_proc > 1 else None, remove_columns=ds.column_names, desc="tokenising and packing")
    if len(packed) == 0:
        total = sum(len(d) + 2 for d in tokenizer(ds["text"][:1000], add_special_tokens=False)["input_ids"])
        raise UserError(f"the data holds about {total} tokens, fewer than one block of {width} (model.block_size + 1); use more text or a smaller block")
    return packed
