"""Shared fixtures: every test writes under its own temporary outputs root, W&B offline, no hub access."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# Set before anything imports wandb, datasets or transformers.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Under pytest-xdist (the README's `-n 2`, one worker per core) each worker, and every process it starts,
# computes on one thread: two workers of two threads each on two cores would only take turns.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def outputs_root(tmp_path, monkeypatch):
    """A fresh outputs root for one test; the pipeline reads it from PIPELINE_OUTPUTS."""
    root = tmp_path / "outputs"
    monkeypatch.setenv("PIPELINE_OUTPUTS", str(root))
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A small text corpus file: a slice of the English reference text that ships with Python."""
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    with path.open("w") as f:
        for name in sorted(topics)[:60]:
            f.write(json.dumps({"text": topics[name]}) + "\n")
    return path


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE of exactly helpers.TOKENIZER_SIZE tokens (tests/model/test_hf.py, tests/stages/test_export.py)."""
    from pydoc_data.topics import topics

    from helpers import TOKENIZER_SIZE
    from pipeline.tokenizer import train_tokenizer

    tok = train_tokenizer([topics[k] for k in sorted(topics)[:20]], TOKENIZER_SIZE)
    assert len(tok) == TOKENIZER_SIZE
    return tok
