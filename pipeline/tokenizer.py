"""The tokenizer: byte-level BPE trained with HF `tokenizers`, used as a `PreTrainedTokenizerFast`.

Special tokens: a pad token distinct from EOS (RLHF masks padding and must not confuse it with the
stop token), BOS, EOS, and one token per chat role. The chat template writes each turn as
`<|role|>` + content + EOS after a leading BOS, so a conversation's every prefix renders as a prefix
of the whole; SFT relies on that to find the assistant tokens, and generation stops at EOS after
the assistant's turn. Assistant turns sit inside `{% generation %}` tags so that
`apply_chat_template(..., return_assistant_tokens_mask=True)` (TRL's `assistant_only_loss`) works.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

from pipeline.errors import UserError
from pipeline.timing import timed

if TYPE_CHECKING:  # transformers is imported where it is used: it takes most of a second
    from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS = "<|pad|>", "<|bos|>", "<|endoftext|>"
ROLES = ("system", "user", "assistant")
ROLE_TOKENS = tuple(f"<|{r}|>" for r in ROLES)
SYSTEM, USER, ASSISTANT = ROLE_TOKENS
SPECIAL_TOKENS = (PAD, BOS, EOS, *ROLE_TOKENS)
BYTE_ALPHABET_SIZE = 256
MIN_VOCAB_SIZE = BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)
# Documents are tokenized whole before packing; the model's context is enforced by the model config,
# so the tokenizer needs no length limit of its own (and must not warn about long documents).
MODEL_MAX_LENGTH = 1_000_000

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown chat role ' + message['role'] + '; roles are system, user, assistant') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}"
    "{{ message['content'] + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE on texts; any string round-trips exactly and special tokens are never split."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    if vocab_size < MIN_VOCAB_SIZE:
        raise UserError(
            f"tokenizer.vocab_size={vocab_size} is too small: a byte-level BPE needs at least {MIN_VOCAB_SIZE} "
            f"({BYTE_ALPHABET_SIZE} bytes + {len(SPECIAL_TOKENS)} special tokens)"
        )
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # Offsets that point at the original characters; return_assistant_tokens_mask maps through them.
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 bytes from the start, so text never seen in training still encodes without <unk>.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return _wrap(backend)


def _wrap(backend) -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        # `additional_special_tokens` is understood by transformers 4 and 5 (5 renames it extra_special_tokens).
        additional_special_tokens=list(ROLE_TOKENS),
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="right",
        # Cleanup would turn "a , b" into "a, b" on decode and break the exact round trip.
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def save_tokenizer(tokenizer: PreTrainedTokenizerFast, directory: str | Path) -> Path:
    """save_pretrained into a temporary folder beside `directory`, then swap it in (files.write_dir_atomically)."""
    from pipeline.files import write_dir_atomically

    return write_dir_atomically(Path(directory), lambda tmp: tokenizer.save_pretrained(str(tmp)))


def _read_tokenizer(path: Path) -> PreTrainedTokenizerFast:
    from transformers import PreTrainedTokenizerFast

    if not path.exists():
        raise UserError(f"tokenizer path {path} does not exist; expected a folder written by save_tokenizer or a tokenizer.json file")
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise UserError(f"tokenizer folder {path} has no tokenizer.json; expected a folder written by save_tokenizer")
        file = path / "tokenizer.json"
    else:
        file = path
    try:
        json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"tokenizer file {file} is not readable JSON ({type(e).__name__}: {e}); expected a HF tokenizers tokenizer.json") from None
    try:
        if path.is_dir():
            return PreTrainedTokenizerFast.from_pretrained(str(path))
        return PreTrainedTokenizerFast(tokenizer_file=str(path), model_max_length=MODEL_MAX_LENGTH, clean_up_tokenization_spaces=False)
    except Exception as e:  # tokenizers raises its own Exception types for a malformed file
        raise UserError(f"cannot load a tokenizer from {path} ({type(e).__name__}: {e}); expected a HF tokenizers tokenizer.json") from None


def _extra_special_tokens(tok) -> list[str]:
    """Special tokens beyond bos/eos/pad/...: transformers 5 calls them extra_special_tokens (a list), 4 additional_special_tokens."""
    extra = getattr(tok, "extra_special_tokens", None)
    if isinstance(extra, list):
        return [str(t) for t in extra]
    return [str(t) for t in getattr(tok, "additional_special_tokens", None) or []]


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerFast:
    """A folder saved by save_tokenizer, or a bare tokenizer.json (ours or a user's, e.g. GPT-2's).

    Whatever it lacks of ours (a pad token distinct from EOS, BOS, EOS, role tokens, the chat
    template) is added, so every stage can rely on them.
    """
    tok = _read_tokenizer(Path(path))
    named = {}
    if tok.eos_token is None:
        named["eos_token"] = EOS
    if tok.bos_token is None:
        named["bos_token"] = BOS
    # GPT-2 style tokenizers pad with EOS; RLHF must tell padding from the stop token.
    if tok.pad_token is None or tok.pad_token in (tok.eos_token, named.get("eos_token")):
        named["pad_token"] = PAD
    if named:
        tok.add_special_tokens(named)
    roles = [t for t in ROLE_TOKENS if t not in tok.all_special_tokens]
    if roles:
        # The key means "replace the list", so pass the tokenizer's own extra special tokens along.
        tok.add_special_tokens({"additional_special_tokens": [*_extra_special_tokens(tok), *roles]})
    if not tok.chat_template:
        tok.chat_template = CHAT_TEMPLATE
    return tok


def _cache_key(key: str, vocab_size: int) -> str:
    """Short hash naming a cached tokenizer; our special tokens and template are part of it, so changing them retrains."""
    material = "\n".join([key, str(vocab_size), *SPECIAL_TOKENS, CHAT_TEMPLATE])
    return hashlib.sha256(material.encode()).hexdigest()[:16]


@timed("data")
def cached_tokenizer(
    cache_dir: str | Path, key: str, texts_fn: Callable[[], Iterable[str]], vocab_size: int
) -> PreTrainedTokenizerFast:
    """Train once per (corpus key, vocab size) under cache_dir/tokenizer-<hash>/; later calls load that folder.

    The trained tokenizer is saved and read back, so a fresh run and a cached run use byte-identical
    tokenizers (and datasets' map fingerprints over them agree).
    """
    directory = Path(cache_dir) / f"tokenizer-{_cache_key(key, vocab_size)}"
    if not (directory / "tokenizer.json").is_file():
        tok = train_tokenizer(texts_fn(), vocab_size)
        try:
            save_tokenizer(tok, directory)
        except OSError:
            # Another process (a DDP rank) put the same tokenizer there first; use that one.
            if not (directory / "tokenizer.json").is_file():
                raise
    return load_tokenizer(directory)
