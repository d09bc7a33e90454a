"""The model layer: the GPT backbone (gpt.py), the generation engine (engine.py), the transformers mapping (hf.py)."""

from pipeline.model.engine import Generation, filter_logits, generate, left_pad, sequence_logprobs, token_logprobs, truncate_after_eos
from pipeline.model.gpt import GPT, Block, GPTConfig, KVCache, ScalarGPT, decay_param_groups, last_token_index, pad_vocab, positions_from_mask

__all__ = [
    "GPT", "Block", "GPTConfig", "KVCache", "ScalarGPT", "Generation",
    "decay_param_groups", "filter_logits", "generate", "last_token_index", "left_pad", "pad_vocab", "positions_from_mask", "sequence_logprobs", "token_logprobs", "truncate_after_eos",
]
