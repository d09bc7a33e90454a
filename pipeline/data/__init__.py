"""Data: loading and format detection (loading.py), the embedded defaults (corpus.py), chat rendering and
label masks (chat.py), packing (packing.py), collators (collators.py) and samplers (samplers.py)."""

from pipeline.data.loading import (
    DataFormat,
    datasets_cache,
    detect_format,
    load_data,
    load_stage_data,
    require_format,
    validate_rows,
    validate_splits,
)

__all__ = ["DataFormat", "datasets_cache", "detect_format", "load_data", "load_stage_data", "require_format", "validate_rows", "validate_splits"]
