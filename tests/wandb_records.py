"""Read an offline W&B run file (`run-*.wandb`) back into its protobuf records.

The file is a 7-byte header followed by records in the LevelDB log format: 32 KiB blocks (counted
from the start of the file), each chunk a 7-byte header (CRC32 4, length 2, type 1) and its data;
a record is one FULL chunk or FIRST, MIDDLE..., LAST. Each record is a serialised
`wandb_internal_pb2.Record`. Tests use this to prove that metrics and artifacts were really logged.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2

HEADER_LEN = 7
BLOCK_LEN = 32 * 1024
CHUNK_HEADER_LEN = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list[wandb_internal_pb2.Record]:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    records, pending, pos = [], b"", HEADER_LEN
    while pos + CHUNK_HEADER_LEN <= len(data):
        left_in_block = BLOCK_LEN - pos % BLOCK_LEN
        if left_in_block < CHUNK_HEADER_LEN:  # the block's tail is padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + CHUNK_HEADER_LEN])
        chunk = data[pos + CHUNK_HEADER_LEN : pos + CHUNK_HEADER_LEN + length]
        pos += CHUNK_HEADER_LEN + length
        if kind == 0 and length == 0:  # zero fill at the end of a file that is still open
            break
        if kind in (FULL, FIRST):
            pending = chunk
        else:
            pending += chunk
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def run_file(run_dir: Path) -> Path:
    files = sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
    assert files, f"no offline W&B run file under {run_dir}/wandb"
    return files[-1]


def logged_metrics(records) -> dict[str, list[float]]:
    """Every history value by key, in logging order."""
    out: dict[str, list[float]] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            for item in r.history.item:
                key = item.key or "/".join(item.nested_key)
                try:
                    out.setdefault(key, []).append(json.loads(item.value_json))
                except json.JSONDecodeError:
                    continue
    return out


def artifacts(records) -> list[wandb_internal_pb2.ArtifactRecord]:
    return [r.artifact for r in records if r.WhichOneof("record_type") == "artifact"]
