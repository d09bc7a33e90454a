"""Shared fixtures: every test writes under its own temporary outputs root, W&B offline, no hub access."""

from __future__ import annotations

import os

import pytest

# Set before anything imports wandb, datasets or transformers.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def outputs_root(tmp_path, monkeypatch):
    """A fresh outputs root for one test; the pipeline reads it from PIPELINE_OUTPUTS."""
    root = tmp_path / "outputs"
    monkeypatch.setenv("PIPELINE_OUTPUTS", str(root))
    return root
