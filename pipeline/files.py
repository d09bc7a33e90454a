"""Writing results so that a kill never leaves a half-written file or folder: the old one or the new one.

The bottom of the house: it imports nothing of the package, so the tokenizer, the model export and
the run directories can all write through it without importing each other.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file in the same directory and rename: a kill leaves the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes files private; results are meant to be shared
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_dir_atomically(directory: Path, fill: Callable[[Path], None]) -> Path:
    """fill() a temporary folder beside `directory`, then swap it in.

    Readers never see a half-written folder: they see the old one or the new one. os.replace cannot
    overwrite a non-empty folder, so the old one is moved aside first and deleted after the swap.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".tmp"))
    old = None
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes folders private; results are meant to be shared
        fill(tmp)
        if directory.exists():
            old = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".old"))
            os.replace(directory, old / "previous")
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and (old / "previous").exists() and not directory.exists():
            os.replace(old / "previous", directory)  # the swap failed: put the old folder back, not lose it
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return directory


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=float) + "\n").encode())


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


class UnsafeFileError(Exception):
    """A torch file that holds more than tensors and plain Python types: loading it could run code."""


def load_tensors(path: Path, map_location: str = "cpu") -> Any:
    """torch.load with weights_only=True: tensors, numbers, strings, lists, tuples and dicts, never code.

    A pickle of anything else (a class, a function, an OmegaConf object) raises UnsafeFileError naming
    the file and what it holds; every model file and checkpoint the pipeline writes loads this way.
    """
    import pickle

    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found is None:
            raise  # not a pickle of ours at all (truncated, foreign bytes): the caller names the file
        raise UnsafeFileError(
            f"{path} holds Python objects other than tensors and plain types ({found.group(1)}); "
            f"it is refused because loading it could run code (every file is loaded with torch.load(weights_only=True))"
        ) from None
