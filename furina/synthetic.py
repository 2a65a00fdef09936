"""Random Llama checkpoints with a byte-level tokenizer, for tests and benchmarks.

Everything is built in-process from a seed: no file is downloaded. The tokenizer maps
each UTF-8 byte to one token and includes the ChatML markers that SmolLM2 uses, so chat
templates, padding and generation work as with a real model.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_level_tokenizer():
    """Build a PreTrainedTokenizerFast with 256 byte tokens plus the ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins for bytes
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS)}
    for symbol in sorted(alphabet):
        vocab[symbol] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def random_llama(
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    vocab_size: int = 259,
    tie_word_embeddings: bool = True,
    initializer_range: float = 0.02,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
):
    """Build a randomly initialised LlamaForCausalLM (eval mode) from a seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        vocab_size=vocab_size,
        max_position_embeddings=2048,
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=initializer_range,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    model.generation_config.pad_token_id = 0
    model.eval()
    return model


def write_random_llama(
    output_dir: str | os.PathLike[str],
    max_shard_size: str | int | None = None,
    **model_options,
) -> Path:
    """Save a random Llama and the byte-level tokenizer as a Hugging Face checkpoint.

    max_shard_size (for example "200KB") makes save_pretrained write shards plus an index.
    """
    output = Path(output_dir)
    model = random_llama(**model_options)
    save_options = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(output, **save_options)
    byte_level_tokenizer().save_pretrained(output)
    return output
