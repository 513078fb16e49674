"""Recovery after pruning, on the tiny random Llama: zeros stay zero, errors go down, interrupted runs resume."""

import copy
import json
from dataclasses import replace

import pytest
import torch

from mixsparse.pruner import pipeline
from mixsparse.pruner.core.adapter import adapt
from mixsparse.pruner.core.prune import prune_model
from mixsparse.pruner.core.spec import Spec
from mixsparse.pruner.io import data, models
from mixsparse.pruner.jobs import PruneJob
from mixsparse.pruner.plans.plan import Plan
from mixsparse.pruner.recover.inputs import recovery_state_dir
from mixsparse.pruner.recover.options import RecoverOptions
from mixsparse.pruner.recover.run import recover_model, recovery_steps
from mixsparse.pruner.recover.state import RecoveryState
from mixsparse.runtime.errors import MixsparseError
from mixsparse.runtime.formats.hf import load_dense
from mixsparse.serve.cli import main

pytestmark = pytest.mark.slow  # recovery tunes every block

FAST = RecoverOptions(epochs=2, batch=2, lr=1e-3, norm_lr=1e-3)


def pruned(tiny_llama, calibration_protocol, metric="wanda", spec="2:4"):
    loaded = models.load(str(tiny_llama), dtype=torch.float32)
    dense = copy.deepcopy(loaded.model)
    adapter = adapt(loaded.model)
    plan = Plan.uniform(adapter.shapes(), Spec.parse(spec))
    calibration = data.calibration_windows(loaded.tokenizer, calibration_protocol)
    prune_model(adapter, plan, metric, calibration)
    return adapter, adapt(dense), plan, calibration


def zeros_of(modules):
    return {name: module.weight == 0 for name, module in modules.items()}


@pytest.mark.parametrize("spec", ["2:4", "0.6"])
def test_recovery_keeps_every_zero_and_lowers_every_block_error(tiny_llama, small_calibration, spec):
    adapter, dense, plan, calibration = pruned(tiny_llama, small_calibration, "sparsegpt", spec)
    before = {n: m.weight.clone() for n, m in adapter.linears().items()}
    norms = {n: p.clone() for n, p in adapter.blocks.named_parameters() if p.dim() == 1}
    result = recover_model(adapter, dense, plan, calibration, FAST)
    assert len(result.blocks) == 2
    assert all(b.mse_after < b.mse_before for b in result.blocks), result.blocks
    for name, module in adapter.linears().items():
        assert torch.equal(module.weight == 0, before[name] == 0), name  # no zero lost, none added
        assert not torch.equal(module.weight, before[name]), name  # the kept weights were tuned
        if spec == "2:4":
            assert ((module.weight != 0).reshape(module.weight.shape[0], -1, 4).sum(-1) == 2).all(), name
    assert any(not torch.equal(p, norms[n]) for n, p in adapter.blocks.named_parameters() if p.dim() == 1)


def test_norm_lr_zero_leaves_norms_alone(tiny_llama, small_calibration):
    adapter, dense, plan, calibration = pruned(tiny_llama, small_calibration)
    norms = {n: p.clone() for n, p in adapter.blocks.named_parameters() if p.dim() == 1}
    recover_model(adapter, dense, plan, calibration, RecoverOptions(epochs=1, batch=4, norm_lr=0.0))
    assert all(torch.equal(p, norms[n]) for n, p in adapter.blocks.named_parameters() if p.dim() == 1)


def test_both_targets_lower_the_final_error(tiny_llama, small_calibration):
    for target in ("dense", "same"):
        adapter, dense, plan, calibration = pruned(tiny_llama, small_calibration)
        result = recover_model(
            adapter, dense, plan, calibration, RecoverOptions(epochs=2, batch=2, lr=1e-3, target=target)
        )
        assert result.blocks[-1].mse_after < result.blocks[-1].mse_before, target


@pytest.mark.parametrize("metric", ["magnitude", "wanda", "sparsegpt"])
def test_recovered_artifact_keeps_the_one_shot_masks(tiny_llama, tmp_path, small_calibration, metric):
    common = dict(
        model=str(tiny_llama),
        metric=metric,
        sparsity="2:4",
        calibration=small_calibration,
        evaluation=data.EvaluationProtocol(seqlen=128, windows=2),
    )
    plain = pipeline.prune(PruneJob(out=str(tmp_path / "plain"), **common))
    summary = pipeline.prune(PruneJob(out=str(tmp_path / "rec"), recover=FAST, **common))
    one_shot, _ = load_dense(tmp_path / "plain", torch.float32)
    recovered, config = load_dense(tmp_path / "rec", torch.float32)
    for name in summary.plan.modules:
        a, b = one_shot.get_submodule(name).weight, recovered.get_submodule(name).weight
        assert torch.equal(a == 0, b == 0), name  # magnitude/wanda masks are deterministic: same zeros
        assert ((b != 0).reshape(b.shape[0], -1, 4).sum(-1) == 2).all(), name
        assert config.modules[name].format == "2:4" and config.modules[name].sparsity == pytest.approx(0.5)
    assert set(summary.perplexity) == {"dense", "one_shot", "pruned"}
    assert summary.perplexity["one_shot"].perplexity == pytest.approx(plain.perplexity["pruned"].perplexity)
    record = json.loads((tmp_path / "rec" / "plan.json").read_text())
    # auto resolves: data to text (the tiny tokenizer has no chat template), precision to what this CPU has
    used = {**FAST.to_json(), "data": "text", "precision": FAST.resolved(device="cpu").precision}
    assert record["recover"]["options"] == used and len(record["recover"]["blocks"]) == 2
    assert record["request"]["recover"] == FAST.to_json()
    assert "recover" not in json.loads((tmp_path / "plain" / "plan.json").read_text())["request"]
    card = (tmp_path / "rec" / "README.md").read_text()
    assert "Recovery: masks frozen" in card and "one-shot ->" in card and "end to end" in card
    assert record["recover"]["distill"]["kl_end"] >= 0
    assert ("used by recovery" in card) == (metric == "magnitude")
    assert not recovery_state_dir(str(tmp_path / "rec")).exists()


def test_recovery_under_a_mixed_plan(tiny_llama, tmp_path, small_calibration):
    shapes = adapt(models.load(str(tiny_llama)).model).shapes()
    specs = {name: Spec.parse("2:4") for name in shapes}
    specs["model.layers.0.self_attn.k_proj"] = Spec.parse("0.7")
    specs["model.layers.1.mlp.down_proj"] = Spec.parse("4:8")
    del specs["model.layers.1.self_attn.o_proj"]
    Plan(specs, shapes, {"allocator": "test"}).save(tmp_path / "plan.json")
    pipeline.prune(
        PruneJob(
            model=str(tiny_llama),
            metric="sparsegpt",
            plan=str(tmp_path / "plan.json"),
            out=str(tmp_path / "art"),
            calibration=small_calibration,
            recover=FAST,
        )
    )
    model, config = load_dense(tmp_path / "art", torch.float32)
    k = model.get_submodule("model.layers.0.self_attn.k_proj").weight
    assert int((k == 0).sum()) == round(0.7 * k.numel())
    down = model.get_submodule("model.layers.1.mlp.down_proj").weight
    assert ((down != 0).reshape(down.shape[0], -1, 8).sum(-1) == 4).all()
    assert (model.get_submodule("model.layers.1.self_attn.o_proj").weight != 0).all()  # dense stays dense
    q = model.get_submodule("model.layers.0.self_attn.q_proj").weight
    assert ((q != 0).reshape(q.shape[0], -1, 4).sum(-1) == 2).all()


class Interrupt(Exception):
    pass


def test_an_interrupted_recovery_resumes_at_the_next_block(tiny_llama, tmp_path, small_calibration):
    state_dir = tmp_path / "state"
    request = {"job": "test"}
    adapter, dense, plan, calibration = pruned(tiny_llama, small_calibration)
    reference = copy.deepcopy(adapter.model)
    steps_per_block = FAST.epochs * -(-small_calibration.samples // FAST.batch) + 1
    calls = []

    def stop_in_block_1(status=None):
        calls.append(status)
        if len(calls) == steps_per_block + 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        recover_model(
            adapter, dense, plan, calibration, FAST, state=RecoveryState(state_dir, request), after_step=stop_in_block_1
        )
    assert sorted(p.name for p in state_dir.iterdir()) == ["block-0.pt", "state.json"]

    fresh, dense, plan, calibration = pruned(tiny_llama, small_calibration)
    resumed = recover_model(fresh, dense, plan, calibration, FAST, state=RecoveryState(state_dir, request))
    assert [b.resumed for b in resumed.blocks] == [True, False]
    whole = recover_model(adapt(reference), dense, plan, calibration, FAST)
    assert resumed.blocks[0].mse_after == whole.blocks[0].mse_after
    for name, module in fresh.linears().items():
        torch.testing.assert_close(module.weight, reference.get_submodule(name).weight, rtol=0, atol=0)

    RecoveryState(state_dir, {"job": "another"})  # another request: the saved blocks are not reused
    assert sorted(p.name for p in state_dir.iterdir()) == ["state.json"]


def test_interrupted_prune_writes_no_artifact_and_resumes(tiny_llama, tmp_path, small_calibration, monkeypatch):
    from mixsparse.pruner.recover import run as recover

    out = tmp_path / "art"
    job = PruneJob(
        model=str(tiny_llama), metric="wanda", sparsity="2:4", out=str(out), calibration=small_calibration, recover=FAST
    )
    original = recover.tune_block
    tuned = []

    def tune_once(*args, **kwargs):
        if tuned:
            raise Interrupt
        tuned.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(recover, "tune_block", tune_once)
    with pytest.raises(Interrupt):
        pipeline.prune(job)
    assert not out.exists() and recovery_state_dir(str(out)).is_dir()
    monkeypatch.setattr(recover, "tune_block", original)
    summary = pipeline.prune(job)
    assert summary.recovery.resumed_blocks == 1
    assert out.is_dir() and not recovery_state_dir(str(out)).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_bad_recovery_settings_are_refused():
    with pytest.raises(MixsparseError, match="at least one epoch"):
        RecoverOptions(epochs=0)
    with pytest.raises(MixsparseError, match="learning rates"):
        RecoverOptions(lr=-1.0)
    with pytest.raises(MixsparseError, match="target"):
        RecoverOptions(target="logits")
    with pytest.raises(MixsparseError, match="recovery data 'chat'"):
        RecoverOptions(data="chat")
    with pytest.raises(MixsparseError, match="recovery precision 'float16'"):
        RecoverOptions(precision="float16")


def test_bfloat16_tuning_reaches_the_float32_result(tiny_llama, small_calibration):
    """bf16 matmuls (autocast) must tune the weights as float32 does, also when the caller already runs under
    autocast: with its weight-cast cache on, every step after the first would see the untuned weights."""
    results, weights = {}, {}
    for precision in ("float32", "bfloat16"):
        adapter, dense, plan, calibration = pruned(tiny_llama, small_calibration, "sparsegpt")
        zeros = zeros_of(adapter.linears())
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bfloat16"):
            results[precision] = recover_model(
                adapter, dense, plan, calibration, replace(FAST, distill_epochs=2, distill_lr=1e-3, precision=precision)
            )
        assert results[precision].options.precision == precision
        for name, module in adapter.linears().items():
            assert torch.equal(module.weight == 0, zeros[name]), name
            assert module.weight.dtype == torch.float32, name
        weights[precision] = {n: m.weight.clone() for n, m in adapter.linears().items()}
    for fp32, bf16 in zip(results["float32"].blocks, results["bfloat16"].blocks):
        assert bf16.mse_after < 0.8 * bf16.mse_before, bf16
        assert bf16.mse_after == pytest.approx(fp32.mse_after, rel=0.05), (fp32, bf16)
    assert results["bfloat16"].distill.kl_end == pytest.approx(results["float32"].distill.kl_end, rel=0.05)
    moved = {n: (weights["float32"][n] - w).norm() for n, w in weights["bfloat16"].items()}
    assert all(moved[n] > 0 for n in moved)  # not the float32 run again


def test_auto_precision_is_bfloat16_only_where_the_cpu_has_it(monkeypatch):
    from mixsparse.pruner.core import precision

    for serving, expected in (("bfloat16", "bfloat16"), ("float32", "float32")):
        monkeypatch.setattr(precision, "cpu_serving_dtype", lambda serving=serving: serving)
        assert RecoverOptions().resolved(device="cpu").precision == expected
        assert precision.resolve("auto", "cpu") == expected
        assert RecoverOptions(precision="float32").resolved(device="cpu").precision == "float32"


def test_cli_prune_recover(tiny_llama, tmp_path, capsys):
    assert (
        main(
            [
                "prune",
                str(tiny_llama),
                "--metric",
                "wanda",
                "--sparsity",
                "2:4",
                "--out",
                str(tmp_path / "a"),
                "--samples",
                "4",
                "--seqlen",
                "64",
                "--recover",
                "--recover-epochs",
                "1",
                "--recover-batch",
                "2",
                "--recover-lr",
                "1e-3",
                "--recover-precision",
                "float32",
                "--json",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["recovery"]["options"]["epochs"] == 1 and summary["recovery"]["options"]["lr"] == 1e-3
    assert summary["recovery"]["options"]["precision"] == "float32"
    assert len(summary["recovery"]["blocks"]) == 2
    with pytest.raises(SystemExit):  # the parser's range check: a usage error before any model is loaded
        main(
            [
                "prune",
                str(tiny_llama),
                "--metric",
                "wanda",
                "--sparsity",
                "2:4",
                "--out",
                str(tmp_path / "b"),
                "--recover",
                "--recover-epochs",
                "0",
            ]
        )
    assert "--recover-epochs" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    base = ["prune", str(tiny_llama), "--metric", "wanda", "--sparsity", "2:4", "--out", str(tmp_path / "c")]
    with pytest.raises(SystemExit):
        main([*base, "--recover", "--recover-data", "chat-only"])
    assert "--recover-data" in capsys.readouterr().err
    # a prompt file that is not there: one line naming it, before any model is loaded
    assert main([*base, "--recover", "--recover-chat-prompts", str(tmp_path / "missing.txt")]) != 0
    assert "missing.txt" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


@pytest.fixture(scope="module")
def chat_llama(tiny_llama, tmp_path_factory):
    """tiny_llama with a chat template, as a chat model's tokenizer has."""
    import shutil

    from serving_helpers import CHAT_TEMPLATE
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("chat-llama") / "model"
    shutil.copytree(tiny_llama, directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    return directory


def test_chat_recovery_tunes_on_the_dense_models_own_answers(chat_llama, tmp_path, small_calibration):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is the capital of France?\n\nName three colours.\n" + "Say hello.\n" * 6)
    out = tmp_path / "art"
    options = RecoverOptions(epochs=1, batch=4, chat_prompts=str(prompts), chat_tokens=24)
    summary = pipeline.prune(
        PruneJob(
            model=str(chat_llama),
            metric="wanda",
            sparsity="2:4",
            out=str(out),
            calibration=small_calibration,
            recover=options,
        )
    )
    record = json.loads((out / "plan.json").read_text())
    assert record["recover"]["options"]["data"] == "text+chat"  # auto: the tokenizer has a chat template
    assert summary.recovery.options.chat_prompts == str(prompts)
    model, _ = load_dense(out, torch.float32)
    for name in summary.plan.modules:
        w = model.get_submodule(name).weight
        assert ((w != 0).reshape(w.shape[0], -1, 4).sum(-1) == 2).all(), name
    assert "answers (at most 24 tokens) to the prompts of" in (out / "README.md").read_text()


def test_chat_windows_hold_the_prompt_and_the_answer_in_the_template(chat_llama):
    from mixsparse.pruner.recover.chat_data import chat_windows, conversations, recovery_windows

    loaded = models.load(str(chat_llama), dtype=torch.float32)
    tokenizer = loaded.tokenizer
    prompts = ["What is the capital of France?", "Name three colours.", "Say hello."]
    talks = conversations(loaded.model, tokenizer, prompts, max_new_tokens=12, batch=2)
    assert len(talks) == 3
    for prompt, ids in zip(prompts, talks):
        head = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        head = list(head["input_ids"] if hasattr(head, "keys") else head)
        assert ids[: len(head)] == head  # the prompt as the template writes it, no padding
        answer = ids[len(head) :]
        assert 1 <= len(answer) <= 12
        assert tokenizer.eos_token_id not in answer[:-1]  # stops at the end of its turn, if it ends it
        # greedy and unpadded: the same answer as generating for this prompt alone
        alone = loaded.model.generate(torch.tensor([head]), max_new_tokens=12, do_sample=False)[0, len(head) :]
        alone = alone.tolist()
        if tokenizer.eos_token_id in alone:
            alone = alone[: alone.index(tokenizer.eos_token_id) + 1]
        assert answer == alone

    windows = chat_windows(talks, 5, 16, seed=3, separator=[7])
    assert windows.shape == (5, 16)
    for window in windows.tolist():  # each window is a run of the joined conversations
        assert window in _runs(talks, 16, 7)
    assert torch.equal(windows, chat_windows(talks, 5, 16, seed=3, separator=[7]))
    with pytest.raises(MixsparseError, match="need more prompts"):
        chat_windows(talks[:1], 2, 10_000)

    calibration = torch.arange(6 * 16).reshape(6, 16)
    mixed = recovery_windows(calibration, loaded.model, tokenizer, prompts="bundled", max_new_tokens=4)
    assert mixed.shape == (6, 16) and torch.equal(mixed[:3], calibration[:3])


def _runs(talks, length, separator):
    """Every window of ``length`` in any joining order of ``talks`` (few enough to enumerate here)."""
    import itertools

    runs = []
    for order in itertools.permutations(talks):
        joined = [t for talk in order for t in talk + [separator]]
        runs += [joined[start : start + length] for start in range(len(joined) - length + 1)]
    return runs


def test_chat_recovery_errors_name_what_is_wrong(tiny_llama, tmp_path, small_calibration):
    from mixsparse.pruner.recover.chat_data import load_prompts

    assert len(load_prompts()) == 96
    with pytest.raises(MixsparseError, match="no-such-prompts.txt"):
        load_prompts(str(tmp_path / "no-such-prompts.txt"))
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(MixsparseError, match="has no prompts"):
        load_prompts(str(tmp_path / "empty.txt"))
    job = PruneJob(
        model=str(tiny_llama),
        metric="wanda",
        sparsity="2:4",
        out=str(tmp_path / "art"),
        calibration=small_calibration,
        recover=RecoverOptions(data="text+chat"),
    )
    with pytest.raises(MixsparseError, match="has no chat template"):
        pipeline.prune(job)
    assert not (tmp_path / "art").exists()


def test_end_to_end_distillation_lowers_the_kl_and_keeps_every_zero(tiny_llama, small_calibration):
    from mixsparse.pruner.recover.distill import distill_model

    adapter, dense, plan, calibration = pruned(tiny_llama, small_calibration, "magnitude")
    zeros = zeros_of(adapter.linears())
    embedding = adapter.model.get_input_embeddings().weight.clone()
    start, end = distill_model(adapter, dense, plan, calibration, epochs=8, lr=1e-3, batch=2)
    assert end < 0.7 * start, (start, end)
    for name, module in adapter.linears().items():
        if name in plan.modules:
            assert torch.equal(module.weight == 0, zeros[name]), name
    assert torch.equal(adapter.model.get_input_embeddings().weight, embedding)  # tied to the head: left alone
    assert not any(p.requires_grad for p in adapter.model.parameters())


def test_recovery_without_the_end_to_end_step(tiny_llama, small_calibration):
    adapter, dense, plan, calibration = pruned(tiny_llama, small_calibration)
    result = recover_model(adapter, dense, plan, calibration, RecoverOptions(epochs=1, batch=4, distill_epochs=0))
    assert result.distill is None and "distill" not in result.to_json()
    adapter, dense, plan, calibration = pruned(tiny_llama, small_calibration)
    result = recover_model(adapter, dense, plan, calibration, RecoverOptions(epochs=1, batch=4))
    assert result.distill.kl_start > 0 and result.to_json()["distill"]["seconds"] > 0  # lowering: the test above


def test_a_finished_end_to_end_step_is_resumed_not_repeated(tiny_llama, tmp_path, small_calibration):
    options = RecoverOptions(epochs=1, batch=4, distill_epochs=2)
    request = {"job": "distill"}
    adapter, dense, plan, calibration = pruned(tiny_llama, small_calibration)
    first = recover_model(adapter, dense, plan, calibration, options, state=RecoveryState(tmp_path / "s", request))
    assert (tmp_path / "s" / "distilled.pt").is_file() and not first.distill.resumed
    fresh, dense, plan, calibration = pruned(tiny_llama, small_calibration)
    calls = []
    again = recover_model(
        fresh,
        dense,
        plan,
        calibration,
        options,
        state=RecoveryState(tmp_path / "s", request),
        after_step=lambda status=None: calls.append(status),
    )
    assert again.distill.resumed and again.resumed_blocks == 2
    assert len(calls) == recovery_steps(options, calibration.shape[0], 2)  # the progress bar's total is right
    for name, module in fresh.linears().items():
        assert torch.equal(module.weight, adapter.model.get_submodule(name).weight), name
