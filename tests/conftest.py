"""Shared fixtures: a tiny random Llama built from a config (no downloads), and cache isolation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

_USER_CACHE = os.environ.get("MIXSPARSE_CACHE") or str(Path.home() / ".cache" / "mixsparse")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """No test writes into the user's cache (perplexity results, models) unless it asks for the default model."""
    monkeypatch.setenv("MIXSPARSE_CACHE", str(tmp_path_factory.mktemp("cache")))


def build_tokenizer(directory: Path, vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from mixsparse.pruner.data import CALIBRATION, load_text

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
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory)
    if tokenizer_from is None:
        build_tokenizer(directory)
    else:
        for file in tokenizer_from.iterdir():
            if file.name.startswith(("tokenizer", "special_tokens")):
                (directory / file.name).write_bytes(file.read_bytes())
    return directory


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-block random Llama (hidden 64, intermediate 96) saved as an HF directory with a BPE tokenizer."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_llama_odd(tmp_path_factory, tiny_llama) -> Path:
    """Like tiny_llama but with intermediate 68: down_proj's input is a multiple of 4, not of 8."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-odd"), intermediate_size=68, tokenizer_from=tiny_llama)


@pytest.fixture(scope="session")
def tiny_llama_untied(tmp_path_factory, tiny_llama) -> Path:
    """Like tiny_llama but lm_head has its own weight."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-untied"), tokenizer_from=tiny_llama, tied=False)


@pytest.fixture(scope="session")
def default_model() -> Path:
    """The built-in smollm2-135m, converted once into the user's cache (not the per-test one)."""
    from mixsparse.pruner import models

    previous = os.environ.get("MIXSPARSE_CACHE")
    os.environ["MIXSPARSE_CACHE"] = _USER_CACHE
    try:
        return models.ensure_builtin("smollm2-135m")
    finally:
        if previous is None:
            del os.environ["MIXSPARSE_CACHE"]
        else:
            os.environ["MIXSPARSE_CACHE"] = previous


@pytest.fixture
def small_calibration():
    """8 windows of 64 tokens of the bundled WikiText-2: enough to exercise every code path quickly."""
    from mixsparse.pruner.data import CalibrationProtocol

    return CalibrationProtocol(samples=8, seqlen=64)
