"""Shared fixtures: a tiny random Llama built from a config (no downloads), and cache isolation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tiny_models import build_tiny_llama

_USER_CACHE = os.environ.get("MIXSPARSE_CACHE") or str(Path.home() / ".cache" / "mixsparse")


def pytest_collection_modifyitems(config, items):
    """A test of the built-in model is a slow one too (it converts the model once, then runs it)."""
    for item in items:
        if item.get_closest_marker("default_model"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """No test writes into the user's cache (perplexity results, models) unless it asks for the default model."""
    monkeypatch.setenv("MIXSPARSE_CACHE", str(tmp_path_factory.mktemp("cache")))


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
    from mixsparse.pruner.io import models

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
    from mixsparse.pruner.io.data import CalibrationProtocol

    return CalibrationProtocol(samples=8, seqlen=64)
