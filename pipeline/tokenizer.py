"""The tokenizer: byte-level BPE trained with HF `tokenizers`, used as a `PreTrainedTokenizerFast`.

Special tokens: a pad token distinct from EOS (RLHF masks padding and must not confuse it with the
stop token), BOS, EOS, and one token per chat role. The chat template writes each turn as
`<|role|>` + content + EOS after a leading BOS, so a conversation's every prefix renders as a prefix
of the whole; SFT relies on that to find the assistant tokens, and generation stops at EOS after
the assistant's turn.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from pipeline.errors import UserError

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|endoftext|>"
ROLES = ("system", "user", "assistant")
ROLE_TOKENS = tuple(f"<|{r}|>" for r in ROLES)
SPECIAL_TOKENS = (PAD, BOS, EOS, *ROLE_TOKENS)

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def _wrap(backend, model_max_length: int = 1_000_000):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        additional_special_tokens=list(ROLE_TOKENS),
        model_max_length=model_max_length,
        padding_side="right",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Byte-level BPE on texts; any string round-trips exactly and special tokens are never split."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return _wrap(backend)


def save_tokenizer(tokenizer, directory: Path) -> Path:
    """save_pretrained into a temporary folder beside `directory`, then swap it in."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
    try:
        tokenizer.save_pretrained(str(tmp))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load_tokenizer(path: str | Path):
    """A folder saved by save_tokenizer, or a bare tokenizer.json (ours or a user's, e.g. GPT-2's).

    A bare file gets whichever of our special tokens it lacks, and our chat template.
    """
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    if not path.exists():
        raise UserError(f"tokenizer path {path} does not exist")
    try:
        if path.is_dir():
            if not (path / "tokenizer.json").is_file():
                raise UserError(f"tokenizer folder {path} has no tokenizer.json")
            tok = PreTrainedTokenizerFast.from_pretrained(str(path))
        else:
            tok = PreTrainedTokenizerFast(tokenizer_file=str(path))
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"cannot load a tokenizer from {path}: {type(e).__name__}: {e}") from None
    missing = {}
    if tok.pad_token is None or tok.pad_token == tok.eos_token:
        missing["pad_token"] = PAD
    if tok.bos_token is None:
        missing["bos_token"] = BOS
    if tok.eos_token is None:
        missing["eos_token"] = EOS
    roles = [t for t in ROLE_TOKENS if t not in tok.get_vocab()]
    if missing:
        tok.add_special_tokens(missing)
    if roles:
        tok.add_tokens(roles, special_tokens=True)
    if not tok.chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def cached_tokenizer(cache_dir: Path, key: str, texts_fn: Callable[[], Iterable[str]], vocab_size: int):
    """Train once per (corpus key, vocab size); later runs load the saved folder."""
    digest = hashlib.sha1(f"{key}|{vocab_size}".encode()).hexdigest()[:12]
    directory = Path(cache_dir) / f"tokenizer-{digest}"
    if (directory / "tokenizer.json").is_file():
        return load_tokenizer(directory)
    tok = train_tokenizer(texts_fn(), vocab_size)
    save_tokenizer(tok, directory)
    return load_tokenizer(directory)
