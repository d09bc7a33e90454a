"""The embedded default data: a pretraining corpus of English that ships with Python, and the task's files.

Both are written once to JSON-lines files under the outputs cache and then read by the same loader
as a user's data (data/loading.py), so the default run exercises the real loading path.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import sysconfig
import warnings
from pathlib import Path
from typing import Iterator

from pipeline.data.loading import load_stage_data, validate_rows
from pipeline.errors import UserError
from pipeline.files import atomic_write_bytes
from pipeline.timing import timed

EMBEDDED_CORPUS = "embedded/pretrain-v2"  # bump the version when the corpus builder changes
CORPUS_MIN_CHARS = 200  # shorter docstrings are mostly one-line summaries
VALIDATION_PERCENT = 5
# Test suites and demos are code-heavy prose; site-packages is not the standard library.
_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "dist-packages", "lib2to3", "turtledemo", "__pycache__", "ensurepip"}
_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _stdlib_files() -> list[Path]:
    """The standard library's .py files, walked in a fixed order with the skipped folders pruned (not visited)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
        files += [Path(folder, n) for n in sorted(names) if n.endswith(".py")]
    return files


def _docstrings(node: ast.AST, qualname: str) -> Iterator[tuple[str, str]]:
    """(qualified name, docstring) of a module, class or function and of every one defined inside it.

    Only statement bodies are walked (definitions cannot hide in expressions), which keeps this fast;
    definitions nested in if/try/with blocks count and take the name of their enclosing scope.
    """
    if isinstance(node, _DOCUMENTED):
        doc = ast.get_docstring(node, clean=True)
        if doc:
            yield qualname, doc
    for field in ("body", "orelse", "finalbody", "handlers", "cases"):
        for child in getattr(node, field, None) or ():
            if isinstance(child, _DOCUMENTED):
                yield from _docstrings(child, f"{qualname}.{child.name}")
            elif isinstance(child, ast.AST):
                yield from _docstrings(child, qualname)


def _corpus_documents() -> list[tuple[str, str]]:
    """(document id, text): pydoc's topics, then docstrings of stdlib modules, classes and functions."""
    from pydoc_data.topics import topics

    documents = [(f"topic:{name}", text.strip()) for name, text in sorted(topics.items())]
    root = Path(sysconfig.get_paths()["stdlib"])
    for path in _stdlib_files():
        parts = path.relative_to(root).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # old escape sequences in stdlib sources raise SyntaxWarning on 3.12+
                tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, OSError):
            continue  # a template or a file for another Python version
        documents += [(f"doc:{name}", text) for name, text in _docstrings(tree, module)]
    return [(doc_id, text) for doc_id, text in documents if len(text) >= CORPUS_MIN_CHARS]


def embedded_corpus_rows(seed: int = 0) -> dict[str, list[dict]]:
    """Python's reference documentation (pydoc topics) and stdlib docstrings as {"text"} rows, split by document.

    A document goes to validation when a hash of its id (and seed) says so (~5%), so the split is the
    same on every machine and no document is in both. Text that appears twice (re-exported or
    copied docstrings) is one document.
    """
    splits: dict[str, list[dict]] = {"train": [], "validation": []}
    seen: set[str] = set()
    for doc_id, text in _corpus_documents():
        if text in seen:
            continue
        seen.add(text)
        bucket = int.from_bytes(hashlib.sha256(f"{seed}\0{doc_id}".encode()).digest()[:8], "big") % 100
        splits["validation" if bucket < VALIDATION_PERCENT else "train"].append({"text": text})
    return splits


def materialize(rows_by_split: dict[str, list[dict]], directory: str | Path) -> Path:
    """Write <split>.jsonl per split (each atomically) unless they are all there already; return the folder.

    A hidden stamp records a hash of the rows, so files left by an older version of the rows'
    generator are rewritten rather than silently reused.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    texts = {split: "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows) for split, rows in sorted(rows_by_split.items())}
    digest = hashlib.sha256(json.dumps(texts, sort_keys=True).encode()).hexdigest()
    stamp = directory / ".rows.sha256"
    targets = {split: directory / f"{split}.jsonl" for split in texts}
    if all(t.is_file() for t in targets.values()) and stamp.is_file() and stamp.read_text().strip() == digest:
        return directory
    for split, text in texts.items():
        atomic_write_bytes(targets[split], text.encode("utf-8"))
    atomic_write_bytes(stamp, (digest + "\n").encode())
    return directory


def embedded_task_dir(cache_dir: Path, kind: str) -> Path:
    """Where the embedded task's files of one kind (sft, preference, prompts) live under the outputs cache."""
    from pipeline.tasks import default_task

    return Path(cache_dir) / f"embedded/task-{default_task().VERSION}/{kind}"


@timed("data")
def embedded_task(cache_dir: Path, kind: str) -> Path:
    """The embedded instruction task's files of one kind (sft, preference, prompts), written on first use.

    Building the rows takes most of a minute and yields every kind at once, so all kinds are
    written then: the stages after the first (and its gold prompts) find theirs ready.
    """
    from pipeline.tasks import default_task

    directory = embedded_task_dir(cache_dir, kind)
    if all((directory / f"{s}.jsonl").is_file() for s in ("train", "validation", "test")):
        return directory
    for each, rows in default_task().default_rows().items():
        materialize(rows, embedded_task_dir(cache_dir, each))
    return directory


@timed("data")
def load_corpus(cfg) -> tuple[object, str]:
    """The pretraining text (`data.path`, else the embedded corpus) as a DatasetDict (train/validation) and a name for messages."""
    default = None if cfg.data.path else materialize(embedded_corpus_rows(seed=0), Path(cfg.paths.cache_dir) / EMBEDDED_CORPUS)
    ds, fmt, source = load_stage_data(cfg, "pretrain", {"language_modeling"}, default)
    if fmt.conversational:
        raise UserError(f"stage 'pretrain' trains on plain text (a `text` column); {source} holds conversations (`messages`): use stage=sft for those")
    for split in ("train", "validation"):
        validate_rows(ds[split], fmt, f"{source} [{split}]")
    return ds, source
