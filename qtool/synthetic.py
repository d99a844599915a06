"""Random-weight checkpoints of any size, written one tensor at a time.

Memory tests and benchmarks need models larger than the memory they allow the quantizer, on
machines without the Hub: `write_random_model` writes a Hugging Face folder (config, safetensors
shards, a tokenizer) whose tensor names and shapes are those transformers builds from `config`,
with weights drawn from N(0, 0.02²) (norms at 1), without ever holding more than one tensor and
one shard. Nothing else in qtool depends on this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def llama_config(layers: int, hidden: int, intermediate: int, vocab: int = 49152, heads: int = 16,
                 kv_heads: int | None = None, tie: bool = True) -> Any:
    """A Llama config of the given shape (bos 1, eos 2, as SmolLM2's tokenizer has them)."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                       max_position_embeddings=2048, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2,
                       pad_token_id=2)


def write_random_model(folder: Path, config: Any, tokenizer: Any, seed: int = 0,
                       max_shard_bytes: int = 512 * 2**20) -> int:
    """Write a random-weight model of `config` (fp32) with `tokenizer` into the new folder `folder`;
    return the bytes of its weights."""
    from qtool.models import meta_model
    from qtool.streaming import ShardWriter

    folder = Path(folder)
    folder.mkdir(parents=True)
    shapes = {name: tuple(t.shape) for name, t in meta_model(config).state_dict().items()}
    if config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)
    generator = torch.Generator().manual_seed(seed)
    writer = ShardWriter(folder, max_shard_bytes)
    for name, shape in shapes.items():
        tensor = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=generator) * 0.02
        writer.add(name, tensor)
        del tensor
    writer.close()
    config.dtype = torch.float32
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return writer.total_bytes
