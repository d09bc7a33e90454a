"""Loading data through HF `datasets`, detecting TRL's dataset formats, and naming every bad row.

One loader for everything: a user's file or folder (`data.path=`), a saved dataset, a hub name, and
the embedded defaults (data/corpus.py), which are written to JSON-lines files first and then read by
that same loader.

TRL's formats (each standard = strings, or conversational = lists of {role, content} messages):
    language modeling    text            | messages
    prompt-only          prompt
    prompt-completion    prompt, completion
    preference           prompt, chosen, rejected  (or implicit prompt: chosen, rejected)
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping

from pipeline.errors import UserError
from pipeline.timing import timed

if TYPE_CHECKING:  # datasets is imported where it is used: importing it takes most of a second
    import datasets
    import pyarrow as pa

FILE_TYPES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".txt": "text"}
# File-name prefixes that name a split (train.jsonl, val.parquet, test-00001-of-00002.parquet, ...).
SPLIT_NAMES = {
    "train": "train",
    "validation": "validation",
    "val": "validation",
    "valid": "validation",
    "dev": "validation",
    "test": "test",
}
_SPLIT_FILE = re.compile(r"^(" + "|".join(sorted(SPLIT_NAMES, key=len, reverse=True)) + r")(?=$|[-_.])", re.IGNORECASE)
ROLES = ("system", "user", "assistant")
_BLANK_LINE = re.compile(r"\n[ \t]*\n")  # separates paragraphs in a .txt file
KINDS = ("language_modeling", "prompt_only", "prompt_completion", "preference")
FORMAT_NAMES = {
    "language_modeling": "language modeling",
    "prompt_only": "prompt-only",
    "prompt_completion": "prompt-completion",
    "preference": "preference",
}
FORMAT_COLUMNS = {
    "language_modeling": "text or messages",
    "prompt_only": "prompt",
    "prompt_completion": "prompt, completion",
    "preference": "prompt, chosen, rejected; or chosen, rejected with the prompt implicit",
}
# Columns that hold an answer: in conversational data each needs an assistant message with content.
ANSWER_COLUMNS = ("completion", "chosen", "rejected")
VALIDATE_BATCH_ROWS = 20_000


@dataclass(frozen=True)
class DataFormat:
    kind: str  # one of KINDS
    conversational: bool  # lists of {role, content} messages rather than strings
    implicit_prompt: bool = False  # preference data without a prompt column: chosen/rejected hold the prompt too

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"DataFormat kind {self.kind!r} is not one of {KINDS}")

    @property
    def columns(self) -> tuple[str, ...]:
        """The columns this format reads."""
        if self.kind == "language_modeling":
            return ("messages",) if self.conversational else ("text",)
        if self.kind == "prompt_only":
            return ("prompt",)
        if self.kind == "prompt_completion":
            return ("prompt", "completion")
        return ("chosen", "rejected") if self.implicit_prompt else ("prompt", "chosen", "rejected")

    def describe(self) -> str:
        name = FORMAT_NAMES[self.kind] + (" with implicit prompt" if self.implicit_prompt else "")
        return f"{'conversational ' if self.conversational else ''}{name}"


def _column_list(columns: Iterable[str]) -> str:
    return "[" + ", ".join(columns) + "]"


def _formats_wanted(kinds: Iterable[str]) -> str:
    return ", ".join(f"{FORMAT_NAMES[k]} ({FORMAT_COLUMNS[k]})" for k in kinds)


def _reason(error: BaseException) -> str:
    """The innermost cause of a library error, in one line (datasets wraps parser errors several layers deep)."""
    while error.__cause__ is not None or (error.__context__ is not None and not error.__suppress_context__):
        error = error.__cause__ or error.__context__
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"{type(error).__name__}: {first_line}" if first_line else type(error).__name__


def _short(value, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# ---------------------------------------------------------------------------------------------
# Loading


def looks_like_path(name: str) -> bool:
    """A local path rather than a hub name: hub names are 'name' or 'org/name'; '/x', './x', 'a/b/c', 'x.jsonl' are paths."""
    return (
        name.startswith(("/", ".", "~"))
        or (os.sep != "/" and os.sep in name)
        or name.count("/") > 1
        or Path(name).suffix.lower() in FILE_TYPES
    )


def _split_of(file: Path) -> str | None:
    match = _SPLIT_FILE.match(file.name)
    return SPLIT_NAMES[match.group(1).lower()] if match else None


def _has_blank_line(file: Path, chunk_chars: int = 1 << 20) -> bool:
    tail = ""
    with file.open(encoding="utf-8", errors="replace") as f:  # text mode: \r\n reads as \n
        while chunk := f.read(chunk_chars):
            if _BLANK_LINE.search(tail + chunk):
                return True
            tail = chunk[-64:]  # a blank line may straddle two chunks
    return False


def _tidy_paragraphs(batch: dict) -> dict:
    """The text builder splits only at exactly "\n\n": also split at lines holding just spaces, trim, drop blanks."""
    paragraphs = (p.lstrip("\n").rstrip() for text in batch["text"] for p in _BLANK_LINE.split(text))
    return {"text": [p for p in paragraphs if p.strip()]}


def _load_files(files: dict[str, list[Path]], source: str, cache_dir: str | None):
    """One datasets builder (json, parquet, csv or text) over the files of every split."""
    import datasets

    builders = {FILE_TYPES[f.suffix.lower()] for fs in files.values() for f in fs}
    if len(builders) > 1:
        raise UserError(f"data folder {source} mixes file types ({', '.join(sorted(builders))}); put one type of file in a dataset folder")
    for f in (f for fs in files.values() for f in fs):
        if f.stat().st_size == 0:
            raise UserError(f"data file {f} is empty; expected rows in one of TRL's dataset formats")
    builder = builders.pop()
    options: dict = {}
    if builder == "csv":
        # Every TRL column is text: read all as strings, or a completion "4" would become the number 4.
        first = next(f for fs in files.values() for f in fs)
        with first.open(newline="", encoding="utf-8-sig", errors="replace") as f:  # -sig: drop a BOM, as pandas does
            header = next(csv.reader(f), [])
        if header:
            options["features"] = datasets.Features({name: datasets.Value("string") for name in header})
    elif builder == "text":
        # Paragraphs (blank-line separated) are the documents: the lines of hard-wrapped prose are not.
        # A file with no blank line at all is taken as one document per line.
        paragraphs = any(_has_blank_line(f) for fs in files.values() for f in fs)
        options["sample_by"] = "paragraph" if paragraphs else "line"
    try:
        ds = datasets.load_dataset(builder, data_files={s: [str(f) for f in fs] for s, fs in files.items()}, cache_dir=cache_dir, **options)
    except Exception as e:  # datasets raises many types for an unreadable file; all mean the same to the user
        where = _json_problem([f for fs in files.values() for f in fs]) if builder == "json" else None
        if where:
            raise UserError(f"{where}; expected one JSON object per line, or a JSON array of objects") from None
        raise UserError(f"cannot read {source} as {builder} ({_reason(e)}); expected a {'/'.join(sorted(k for k, v in FILE_TYPES.items() if v == builder))} file in one of TRL's dataset formats") from None
    if builder == "text":
        ds = ds.map(_tidy_paragraphs, batched=True, remove_columns=["text"], desc="splitting paragraphs")
    for split, part in ds.items():
        if len(part) == 0:
            names = ", ".join(str(f) for f in files[split])
            raise UserError(f"data file {names} holds no rows; expected rows in one of TRL's dataset formats")
    return ds


def _json_problem(files: list[Path]) -> str | None:
    """The first place where a .json/.jsonl file is not rows of JSON, by line: datasets' parser gives a byte offset at best.

    A file holds either one JSON document (an array of row objects, or one object) or JSON lines
    (an object per line). None when every file looks right, and the problem is something else.
    """
    for file in files:
        try:
            text = file.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as e:
            return f"{file}: not UTF-8 text (byte {e.start}: {e.reason})"
        try:
            whole = json.loads(text)
        except json.JSONDecodeError as e:
            error = e
        else:
            if isinstance(whole, list):
                bad = next((i for i, row in enumerate(whole) if not isinstance(row, dict)), None)
                if bad is not None:
                    return f"{file}, element {bad} of the array: expected a JSON object (one row), got {_short(whole[bad])}"
            elif not isinstance(whole, dict):
                return f"{file}: holds a single JSON {type(whole).__name__} ({_short(whole)}), not rows"
            continue
        first = next((line for line in text.splitlines() if line.strip()), "")
        try:
            json.loads(first)
        except json.JSONDecodeError:  # not JSON lines: one document, broken where the parser stopped
            return f"{file}, line {error.lineno}, column {error.colno}: not valid JSON ({error.msg.removesuffix(' starting at')})"
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                return f"{file}, line {number}, column {e.colno}: not valid JSON ({e.msg.removesuffix(' starting at')})"
            if not isinstance(row, dict):
                return f"{file}, line {number}: expected a JSON object (one row), got {_short(row)}"
    return None


def _load_saved(path: Path):
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as e:
        raise UserError(f"cannot read the saved dataset in {path} ({_reason(e)}); expected a folder written by Dataset.save_to_disk or DatasetDict.save_to_disk") from None
    return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})


def _load_local(path: Path, cache_dir: str | None):
    if path.is_file():
        if path.suffix.lower() not in FILE_TYPES:
            raise UserError(f"data file {path} has an unknown type; expected one of {', '.join(FILE_TYPES)}")
        return _load_files({"train": [path]}, str(path), cache_dir)
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return _load_saved(path)
    data_files = sorted(f for f in path.iterdir() if f.is_file() and f.suffix.lower() in FILE_TYPES and not f.name.startswith("."))
    if not data_files:
        raise UserError(f"data folder {path} holds no data files ({', '.join(FILE_TYPES)}) and no dataset written by save_to_disk")
    files: dict[str, list[Path]] = {}
    for f in data_files:
        files.setdefault(_split_of(f) or "train", []).append(f)
    return _load_files(files, str(path), cache_dir)


def _load_hub(name: str, cache_dir: str | None):
    import datasets

    try:
        return datasets.load_dataset(name, cache_dir=cache_dir)
    except Exception as e:  # offline, not found, gated, ...: none of them leaves anything to load
        raise UserError(
            f"data path {name} is neither a local file or folder nor a reachable hub dataset ({_reason(e)}); "
            f"expected a .jsonl/.json/.parquet/.csv/.txt file, a folder of them, a folder written by save_to_disk, or a hub dataset name"
        ) from None


def _rename_columns(ds, columns: Mapping[str, str], source: str):
    for split, part in ds.items():
        present = part.column_names
        missing = [c for c in columns if c not in present]
        if missing:
            raise UserError(
                f"data.columns names column {', '.join(repr(c) for c in missing)}, which {source} ({split} split) does not have; "
                f"its columns are {_column_list(present)}"
            )
        clashes = [new for old, new in columns.items() if new in present and new not in columns and new != old]
        if clashes:
            raise UserError(f"data.columns renames onto {', '.join(repr(c) for c in clashes)}, which {source} ({split} split) already has; its columns are {_column_list(present)}")
    return ds.rename_columns({old: new for old, new in columns.items() if old != new})


def load_data(
    path: str | os.PathLike,
    columns: Mapping[str, str] | None = None,
    val_fraction: float = 0.05,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
) -> datasets.DatasetDict:
    """A DatasetDict with train and validation (and test where the data has it) from any supported source.

    `path`: a .jsonl/.json/.parquet/.csv/.txt file (a .txt file gives one `text` row per paragraph),
    a folder of such files (split by file name: train.*, validation.*/val.*/valid.*/dev.*, test.*;
    other files are train), a folder written by save_to_disk, or a hub dataset name.
    `columns` renames the data's columns to TRL's ({"question": "prompt", "answer": "completion"}).
    Without a validation split, `val_fraction` of train is held out, the same rows for the same seed.
    `cache_dir` is where datasets keeps its Arrow files (its own default when None).
    """
    import datasets

    if not 0 < val_fraction < 1:
        raise UserError(f"data.val_fraction={val_fraction} must be between 0 and 1")
    source = os.fspath(path)
    cache = os.fspath(cache_dir) if cache_dir is not None else None
    local = Path(source).expanduser()
    if local.exists():
        ds = _load_local(local, cache)
    elif looks_like_path(source):
        raise UserError(f"data path {source} does not exist; expected a .jsonl/.json/.parquet/.csv/.txt file, a folder of them, or a folder written by save_to_disk")
    else:
        ds = _load_hub(source, cache)
    if not isinstance(ds, datasets.DatasetDict):
        ds = datasets.DatasetDict({"train": ds})
    # Hub and saved datasets name their splits freely: map val/valid/dev to validation where unambiguous.
    renamed = {SPLIT_NAMES.get(s.lower(), s): s for s in ds}
    if len(renamed) == len(ds):
        ds = datasets.DatasetDict({new: ds[old] for new, old in renamed.items()})
    if "train" not in ds:
        raise UserError(f"{source} has no train split (its splits are {_column_list(ds)}); name the training file train.* or the split 'train'")
    for split, part in ds.items():
        if len(part) == 0:
            raise UserError(f"{source}: the {split} split has no rows")
    if columns:
        ds = _rename_columns(ds, dict(columns), source)
    if "validation" not in ds:
        if len(ds["train"]) < 2:
            raise UserError(f"{source} has {len(ds['train'])} row: too few to hold out a validation split; add rows or a validation file")
        parts = ds["train"].train_test_split(test_size=val_fraction, seed=seed, shuffle=True)
        ds["train"], ds["validation"] = parts["train"], parts["test"]
    return ds


# ---------------------------------------------------------------------------------------------
# Formats


def _arrow_type(dataset, column: str) -> pa.DataType:
    return dataset.features.arrow_schema.field(column).type


def _holds_messages(arrow_type) -> bool | None:
    """True for a list column (conversational), False for anything else, None for an all-null column (no evidence)."""
    import pyarrow as pa

    if pa.types.is_null(arrow_type) or isinstance(arrow_type, pa.ExtensionType):
        return None  # all nulls, or datasets' Json type for values of mixed shapes: no evidence either way
    return pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type) or pa.types.is_fixed_size_list(arrow_type)


def _no_format_message(columns: list[str]) -> str:
    return (
        f"the columns {_column_list(columns)} match none of TRL's dataset formats: {_formats_wanted(KINDS)}; "
        f"rename columns with data.columns, e.g. data.columns={{question: prompt, answer: completion}}"
    )


def detect_format(dataset: datasets.Dataset) -> DataFormat:
    """Which TRL format the columns (and their types) say this dataset is in.

    Conversational when the format's columns hold lists (of messages), standard when they hold
    strings; decided from the column types, so an empty or odd first row does not mislead it.
    Extra columns are allowed and ignored.
    """
    columns = list(dataset.column_names)
    present = set(columns)
    if {"chosen", "rejected"} & present:
        lacking = [c for c in ("chosen", "rejected") if c not in present]
        if lacking:
            raise UserError(
                f"the columns {_column_list(columns)} look like preference data but the '{lacking[0]}' column is missing; "
                f"preference rows need both chosen and rejected ({FORMAT_COLUMNS['preference']})"
            )
        kind, implicit = "preference", "prompt" not in present
    elif {"prompt", "completion"} <= present:
        kind, implicit = "prompt_completion", False
    elif "messages" in present:
        kind, implicit = "language_modeling", False
    elif "text" in present:
        return DataFormat("language_modeling", False)
    elif "prompt" in present:
        kind, implicit = "prompt_only", False
    else:
        raise UserError(_no_format_message(columns))
    probe = DataFormat(kind, kind == "language_modeling", implicit)
    evidence = {c: _holds_messages(_arrow_type(dataset, c)) for c in probe.columns}
    decided = {c: v for c, v in evidence.items() if v is not None}
    if len(set(decided.values())) > 1:
        texts = [c for c, v in decided.items() if not v]
        lists = [c for c, v in decided.items() if v]
        raise UserError(
            f"the columns {_column_list(columns)} mix standard and conversational data: text in {', '.join(texts)} but "
            f"lists of messages in {', '.join(lists)}; a TRL dataset has text in all of them or messages in all of them"
        )
    if kind == "language_modeling":
        return probe
    return DataFormat(kind, any(decided.values()), implicit)


def require_format(dataset: datasets.Dataset, allowed_kinds: Iterable[str], stage: str, source: str) -> DataFormat:
    """detect_format, and a UserError naming the stage, the data's columns and what the stage takes when it does not fit."""
    allowed = set(allowed_kinds)
    unknown = allowed - set(KINDS)
    if unknown:
        raise ValueError(f"unknown format kinds {sorted(unknown)}; kinds are {KINDS}")
    wanted = _formats_wanted(k for k in KINDS if k in allowed)
    try:
        fmt = detect_format(dataset)
    except UserError as e:
        raise UserError(f"stage '{stage}' cannot train on {source}: {e}; {stage} expects {wanted}") from None
    if fmt.kind not in allowed:
        raise UserError(
            f"stage '{stage}' cannot train on {source}: it has columns {_column_list(dataset.column_names)} "
            f"({fmt.describe()} format); {stage} expects {wanted}"
        )
    return fmt


def _text_problem(value) -> str | None:
    if isinstance(value, str) and value.strip():
        return None
    return f"expected non-empty text, got {_short(value)}"


def _messages_problem(value, needs_answer: bool) -> str | None:
    if not isinstance(value, list) or not value:
        return f"expected a non-empty list of {{role, content}} messages, got {_short(value)}"
    for j, message in enumerate(value):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            return f"message {j}: expected a {{role, content}} dict, got {_short(message)}"
        if message["role"] not in ROLES:
            return f"message {j}: unknown role {message['role']!r}; expected one of {', '.join(ROLES)}"
        if not isinstance(message["content"], str):
            return f"message {j}: expected text content, got {_short(message)}"
    if needs_answer and not any(m["role"] == "assistant" and m["content"].strip() for m in value):
        return f"expected an assistant message with non-empty content, got {_short(value)}"
    return None


def _is_text_type(arrow_type) -> bool:
    import pyarrow as pa

    return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)


def _suspect_text_rows(values: pa.Array):
    """Boolean numpy mask of rows that are null or blank; None when the column is not plain strings."""
    import pyarrow.compute as pc

    if not _is_text_type(values.type):
        return None
    blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(values)), 0)
    return pc.or_kleene(values.is_null(), blank).fill_null(True).to_numpy(zero_copy_only=False)


def _suspect_message_rows(values: pa.Array, needs_answer: bool):
    """Boolean numpy mask of rows with a malformed message list; None unless the column is list<struct<role, content>> of strings.

    datasets stores messages whose dicts differ in their keys as JSON text (its Json feature); those,
    and any other layout, take the row-by-row path instead.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if not (pa.types.is_list(values.type) or pa.types.is_large_list(values.type)):
        return None
    struct = values.type.value_type
    if not pa.types.is_struct(struct) or struct.get_field_index("role") < 0 or struct.get_field_index("content") < 0:
        return None
    if not (_is_text_type(struct.field("role").type) and _is_text_type(struct.field("content").type)):
        return None
    lengths = pc.list_value_length(values).fill_null(0).to_numpy(zero_copy_only=False)
    suspect = values.is_null().to_numpy(zero_copy_only=False) | (lengths == 0)
    messages = pc.list_flatten(values)
    rows = pc.list_parent_indices(values).to_numpy(zero_copy_only=False)
    role, content = pc.struct_field(messages, "role"), pc.struct_field(messages, "content")
    bad_message = pc.or_kleene(
        pc.or_kleene(messages.is_null(), pc.invert(pc.is_in(role, value_set=pa.array(ROLES)))),
        content.is_null(),
    ).fill_null(True)
    suspect[rows[bad_message.to_numpy(zero_copy_only=False)]] = True
    if needs_answer:
        answers = pc.and_(pc.equal(role, "assistant"), pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(content)), 0))
        answered = np.zeros(len(values), dtype=bool)
        answered[rows[answers.fill_null(False).to_numpy(zero_copy_only=False)]] = True
        suspect |= ~answered
    return suspect


def validate_rows(dataset: datasets.Dataset, fmt: DataFormat, source: str) -> None:
    """Every row has what its format needs: non-empty text, well-formed messages, known roles, an answer.

    Whole columns are screened with Arrow compute in batches (100k rows take well under a second);
    the rows it flags, and columns Arrow cannot screen, are checked in Python, which words the
    error: the row (source_row: its index in the data as loaded), the column, and what was expected.
    """
    missing = [c for c in fmt.columns if c not in dataset.column_names]
    if missing:
        raise UserError(f"{source} lacks column {', '.join(missing)} of the {fmt.describe()} format; its columns are {_column_list(dataset.column_names)}")
    view = dataset.select_columns(list(fmt.columns))
    arrow_view = view.with_format("arrow")
    for start in range(0, len(view), VALIDATE_BATCH_ROWS):
        stop = min(start + VALIDATE_BATCH_ROWS, len(view))
        batch = arrow_view[start:stop]
        for column in fmt.columns:
            needs_answer = column in ANSWER_COLUMNS
            values = batch.column(column).combine_chunks()
            _require_utf8(values, view, dataset, start, column, source)
            if fmt.conversational:
                suspect = _suspect_message_rows(values, needs_answer)
                problem_of = lambda value: _messages_problem(value, needs_answer)  # noqa: E731
            else:
                suspect = _suspect_text_rows(values)
                problem_of = _text_problem
            if suspect is None:  # a layout Arrow cannot screen: decode the batch and check every row
                candidates = enumerate(view[start:stop][column])
            else:
                candidates = ((int(i), view[start + int(i)][column]) for i in suspect.nonzero()[0])
            for i, value in candidates:
                problem = problem_of(value)
                if problem:
                    # Problems with one message read "message j: ...", which continues the location.
                    joint = ", " if problem.startswith("message ") else ": "
                    raise UserError(f"{source}, row {source_row(dataset, start + i)}, column '{column}'{joint}{problem}")


def source_row(dataset, position: int) -> int:
    """The row of the data as loaded that a split's `position` holds, for messages that name a row.

    load_data carves validation out of a shuffled train split (an indices mapping over the loaded
    rows); a message must point at the user's row, not at a place in the shuffle.
    """
    indices = getattr(dataset, "_indices", None)
    return position if indices is None else int(indices.column(0)[position].as_py())


def _require_utf8(values: pa.Array, view, dataset, start: int, column: str, source: str) -> None:
    """pyarrow reads bytes that are not UTF-8 into a text column without a word; reading them later fails deep inside."""
    import pyarrow as pa

    try:
        values.validate(full=True)
    except pa.ArrowInvalid:
        for i in range(len(values)):
            try:
                view[start + i][column]
            except UnicodeDecodeError:
                raise UserError(f"{source}, row {source_row(dataset, start + i)}, column '{column}': not UTF-8 text") from None
        raise UserError(f"{source}, column '{column}': not UTF-8 text") from None


def datasets_cache(cfg) -> str:
    """Where `datasets` keeps its Arrow files and map caches: under the outputs cache, not the home folder."""
    return str(Path(cfg.paths.cache_dir) / "datasets")


@timed("data")
def load_stage_data(cfg, stage: str, kinds: Iterable[str], default):
    """A stage's data: `data.path` (else `default`), its columns renamed by `data.columns`, split, in one of `kinds`.

    `default` is a path, or a function that makes one (the embedded task's files, built on first use):
    called only when data.path is unset, so a user's data never waits for the embedded task.

    Returns (DatasetDict with train / validation (/ test), its DataFormat, the source's name for messages).
    """
    from omegaconf import OmegaConf

    source = str(cfg.data.path) if cfg.data.path else str(default() if callable(default) else default)
    columns = OmegaConf.to_container(cfg.data.columns) if cfg.data.columns else None
    ds = load_data(source, columns=columns, val_fraction=cfg.data.val_fraction, seed=cfg.seed, cache_dir=datasets_cache(cfg))
    return ds, require_format(ds["train"], kinds, stage, source), source


def validate_splits(ds, fmt: DataFormat, source: str) -> None:
    """validate_rows on every split, each named in the message."""
    for split in ds:
        validate_rows(ds[split], fmt, f"{source} [{split}]")
