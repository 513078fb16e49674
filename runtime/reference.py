"""The reference engine: a transformers model whose compressed linears (packed 2:4, bitmask) are SparseLinear.

Used for evaluation, tests and GPU benchmarks where vLLM is not installed, and as the ground truth the
served output is compared with: it runs the same kernels as the server. Compressed modules are never
materialised dense on the host: the skeleton is built without initialising weights, the other tensors are
loaded, and each compressed module is prepared straight from its tensors (on CPU it stays compressed; where
no kernel runs, the exact dense fallback).
"""

from __future__ import annotations

import os

import torch

from mixsparse.runtime.formats import artifact
from mixsparse.runtime.formats.hf import empty_model, load_state, plain_config
from mixsparse.runtime.sparse_linear import SparseLinear, prepare


def load_reference(
    path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, backend: str = "auto"
):
    """(model, artifact config, {module name: backend}) for an artifact."""
    config = artifact.read_config(path)
    tensors = artifact.load_tensors(config)
    dtype = dtype or config.dtype
    model = empty_model(plain_config(config), dtype)
    compressed = list(config.compressed)
    state = {k: v for k, v in tensors.items() if k.rpartition(".")[0] not in compressed}
    # compressed modules' weights are absent on purpose: their modules are replaced below
    load_state(model, state, config.path, allowed_missing={f"{name}.weight" for name in compressed})
    model.to(device)
    backends = {}
    for name in compressed:
        weight = (artifact.packed_module if name in config.packed else artifact.bitmask_module)(config, tensors, name)
        old = model.get_submodule(name)
        module = SparseLinear(prepare(weight, device, dtype, backend), None if old.bias is None else old.bias.detach())
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module)
        backends[name] = module.backend
    model.eval()
    return model, config, backends


def resident_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of all parameters and buffers as held now (tied tensors counted once)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() not in seen and tensor.numel():
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total
