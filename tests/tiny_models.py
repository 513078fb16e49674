"""Tiny random Llamas built from a config (no downloads), shared by the fixtures and the tests that need
another shape."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_llama_config(**overrides):
    """The test suite's Llama: 2 blocks, hidden 64, intermediate 96, 4 heads of 16, vocabulary 384; ``overrides``
    change any field."""
    from transformers import LlamaConfig

    fields = dict(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaConfig(**{**fields, **overrides})


def build_tokenizer(directory: Path, vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from mixsparse.pruner.io.data import CALIBRATION, load_text

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator([load_text("wikitext2", CALIBRATION)[:200_000]], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(directory)
    return fast


def build_tiny_llama(
    directory: Path, intermediate_size: int = 96, seed: int = 0, tokenizer_from: Path | None = None, tied: bool = True
):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(intermediate_size=intermediate_size, tie_word_embeddings=tied)).to(
        torch.bfloat16
    )
    model.save_pretrained(directory)
    if tokenizer_from is None:
        build_tokenizer(directory)
    else:
        for file in tokenizer_from.iterdir():
            if file.name.startswith(("tokenizer", "special_tokens")):
                (directory / file.name).write_bytes(file.read_bytes())
    return directory
