"""Artifact <-> plain transformers model, with packed modules unpacked (exact)."""

from __future__ import annotations

import os

import torch

from mixsparse.runtime.errors import MixsparseError
from mixsparse.runtime.formats import artifact


def plain_config(config: artifact.ArtifactConfig):
    """The transformers config of an artifact, without its quantization_config."""
    from transformers import AutoConfig

    hf = dict(config.hf_config)
    hf.pop("quantization_config", None)
    model_type = hf.pop("model_type", None)
    if model_type is None:
        raise MixsparseError(f"{config.path}: config.json has no model_type")
    return AutoConfig.for_model(model_type, **hf)


def empty_model(hf_config, dtype: torch.dtype):
    """A model skeleton with uninitialised weights (they are about to be overwritten)."""
    from transformers import AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers < 5
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        return AutoModelForCausalLM.from_config(hf_config, dtype=dtype)


def check_shapes(config: artifact.ArtifactConfig, headers: dict[str, tuple[tuple[int, ...], str]]) -> None:
    """Every stored tensor that the model keeps as itself (norms, embeddings, dense weights) has the shape the
    model's config gives it; from the files' headers and a skeleton on the meta device, so nothing is loaded."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        expected = AutoModelForCausalLM.from_config(plain_config(config)).state_dict()
    for key, (shape, _) in sorted(headers.items()):
        if key in expected and tuple(shape) != tuple(expected[key].shape):
            raise MixsparseError(
                f"{config.path}: tensor {key} has shape {list(shape)}, its config makes it "
                f"{list(expected[key].shape)} (artifact does not match its config)"
            )


def load_dense(path: str | os.PathLike, dtype: torch.dtype | None = None):
    """Load an artifact as a transformers model whose weights are dense (zeros where pruned)."""
    config = artifact.read_config(path)
    tensors = artifact.load_tensors(config)
    state = artifact.dense_state_dict(config, tensors)
    model = empty_model(plain_config(config), dtype or config.dtype)
    load_state(model, state, config.path)
    return model, config


def load_state(model, state: dict[str, torch.Tensor], source, allowed_missing: set[str] = frozenset()) -> None:
    """Load ``state`` into ``model``; only weights tied to another (e.g. lm_head) or ``allowed_missing``
    may be absent, and every tensor must have the shape the model's config gives it."""
    expected = model.state_dict()
    for key, tensor in sorted(state.items()):
        if key in expected and tuple(tensor.shape) != tuple(expected[key].shape):
            raise MixsparseError(
                f"{source}: tensor {key} has shape {list(tensor.shape)}, its config makes it "
                f"{list(expected[key].shape)} (artifact does not match its config)"
            )
    result = model.load_state_dict(state, strict=False)
    model.tie_weights()
    tied = {name for name, param in model.named_parameters(remove_duplicate=False)} - {
        name for name, _ in model.named_parameters()
    }
    missing = [
        k
        for k in result.missing_keys
        if k not in tied and k not in allowed_missing and not k.endswith("rotary_emb.inv_freq")
    ]
    if missing or result.unexpected_keys:
        problem = f"missing tensor {missing[0]}" if missing else f"unexpected tensor {result.unexpected_keys[0]}"
        raise MixsparseError(f"{source}: {problem} (artifact does not match its config)")
    model.eval()
