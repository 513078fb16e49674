"""The runner's contract: sequential across blocks, and one pass within a block."""

import copy

import torch

from mixsparse.pruner.core.adapter import adapt, fused_groups
from mixsparse.pruner.core.calibration import run_blocks
from mixsparse.pruner.io import models


def load(tiny_llama):
    return models.load(str(tiny_llama), dtype=torch.float32).model


def test_adapter_finds_blocks_linears_and_fused_groups(tiny_llama):
    adapter = adapt(load(tiny_llama))
    assert adapter.blocks_name == "model.layers" and len(adapter.blocks) == 2
    assert sorted(adapter.block_linears(1)) == sorted(
        f"model.layers.1.{m}"
        for m in [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ]
    )
    assert adapter.lm_head()[0] == "lm_head"
    groups = fused_groups(adapter)
    assert groups[:4] == [
        ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"],
        ["model.layers.0.self_attn.o_proj"],
        ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"],
        ["model.layers.0.mlp.down_proj"],
    ]
    assert len(groups) == 8


def test_pruning_inside_the_callback_is_seen_by_the_rest_of_the_block_and_later_blocks(tiny_llama):
    model = load(tiny_llama)
    reference = copy.deepcopy(model)
    adapter = adapt(model)
    ids = torch.randint(0, 384, (3, 16), generator=torch.Generator().manual_seed(0))
    seen = {}

    def halve_and_record(index, name, module, x):
        seen[name] = x.clone()
        module.weight.mul_(0.5)  # "prune" in place, before the module runs

    run_blocks(adapter, ids, halve_and_record)
    # A manual pass over the reference with the same edits applied up front must see the same inputs.
    with torch.no_grad():
        for module in adapt(reference).linears().values():
            module.weight.mul_(0.5)
        expected = {}
        hooks = [
            m.register_forward_pre_hook(lambda mod, args, n=n: expected.__setitem__(n, args[0].clone()))
            for n, m in adapt(reference).linears().items()
        ]
        reference(ids, use_cache=False)
        for hook in hooks:
            hook.remove()
    assert seen.keys() == expected.keys()
    for name in seen:
        torch.testing.assert_close(seen[name], expected[name], rtol=1e-5, atol=1e-5)


def test_every_linear_sees_the_whole_calibration_batch_once(tiny_llama):
    adapter = adapt(load(tiny_llama))
    calls = {}
    ids = torch.randint(0, 384, (5, 12))
    run_blocks(adapter, ids, lambda i, name, module, x: calls.setdefault(name, []).append(tuple(x.shape)))
    assert set(calls) == set(adapter.linears())
    assert all(
        shapes == [(5, 12, module.in_features)]
        for (name, shapes), module in zip(sorted(calls.items()), [adapter.linears()[n] for n in sorted(calls)])
    )
