"""Packing: tokenised documents concatenated and cut into full blocks (pretraining, optional in SFT)."""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING

from pipeline.data.loading import _column_list
from pipeline.errors import UserError
from pipeline.timing import timed

if TYPE_CHECKING:
    import datasets

PACK_BATCH_ROWS = 1_000  # each map batch drops its last partial block; 1000 documents make that loss negligible
PACK_VERSION = "1"  # part of the packed data's cache fingerprint: bump when tokenize_and_pack's output changes


def _pack_fingerprint(ds, tokenizer, width: int) -> str:
    """Cache key of the packed data: the input data's fingerprint, the tokenizer's exact content, the block width.

    Explicit, because datasets' own hash of the map function pickles the tokenizer object, whose
    pickle also carries incidental state (the folder it was loaded from, padding settings).
    """
    material = json.dumps([PACK_VERSION, ds._fingerprint, width, tokenizer.bos_token_id, tokenizer.eos_token_id])
    digest = hashlib.sha256(material.encode())
    digest.update(tokenizer.backend_tokenizer.to_str().encode())
    return digest.hexdigest()[:32]


@timed("data")
def tokenize_and_pack(ds: datasets.Dataset, tokenizer, block_size: int, num_proc: int = 1) -> datasets.Dataset:
    """Documents as BOS + ids + EOS, concatenated and cut into `input_ids` rows of block_size + 1 tokens.

    The +1 gives each row its inputs [:-1] and shifted targets [1:]. The tail that does not fill a
    block is dropped. For file-backed data, datasets keeps the result next to the data's Arrow files,
    so a second run with the same data and tokenizer reads it instead of tokenizing again.
    """
    import numpy as np

    if block_size < 1:
        raise UserError(f"block_size={block_size} must be at least 1")
    if "text" not in ds.column_names:
        raise UserError(f"packing for pretraining needs a 'text' column; the data has columns {_column_list(ds.column_names)}")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None or eos is None:
        raise UserError("the tokenizer has no BOS or EOS token; load it with pipeline.tokenizer.load_tokenizer, which adds them")
    width = block_size + 1

    def pack(batch):
        flat: list[int] = []
        for ids in tokenizer(batch["text"], add_special_tokens=False)["input_ids"]:
            flat.append(bos)
            flat.extend(ids)
            flat.append(eos)
        usable = len(flat) // width * width
        return {"input_ids": np.asarray(flat[:usable], dtype=np.int32).reshape(-1, width)}

    packed = ds.map(
        pack,
        batched=True,
        batch_size=PACK_BATCH_ROWS,
        num_proc=num_proc if num_proc > 1 else None,
        remove_columns=ds.column_names,
        new_fingerprint=_pack_fingerprint(ds, tokenizer, width),
        desc="tokenizing and packing",
    )
    if len(packed) == 0:
        total = sum(len(ids) + 2 for ids in tokenizer(list(ds["text"]), add_special_tokens=False)["input_ids"])
        split = f" ({ds.split} split)" if getattr(ds, "split", None) else ""
        raise UserError(
            f"the data{split} holds {total} tokens (with BOS and EOS per document), fewer than one block of "
            f"{width} tokens (block_size={block_size} + 1); use more text or a smaller block size"
        )
    return packed


def pack_rows(ds, block: int):
    """Concatenate tokenised examples and cut them into rows of exactly `block` tokens (optional packing)."""

    def chunk(batch):
        ids = [t for row in batch["input_ids"] for t in row]
        labels = [t for row in batch["labels"] for t in row]
        n = len(ids) // block * block
        return {"input_ids": [ids[i : i + block] for i in range(0, n, block)], "labels": [labels[i : i + block] for i in range(0, n, block)]}

    return ds.map(chunk, batched=True, batch_size=1000, remove_columns=ds.column_names, desc="packing")
