import json

import pytest

from mixsparse.pruner.core.spec import Spec
from mixsparse.pruner.plans.plan import Plan
from mixsparse.runtime.errors import MixsparseError


@pytest.mark.parametrize(
    "text, kind, sparsity",
    [
        ("0.5", "unstructured", 0.5),
        ("2:4", "nm", 0.5),
        ("4:8", "nm", 0.5),
        ("1:4", "nm", 0.75),
        ("0", "dense", 0.0),
        ("dense", "dense", 0.0),
        (0.7, "unstructured", 0.7),
    ],
)
def test_parse(text, kind, sparsity):
    spec = Spec.parse(text)
    assert spec.kind == kind and spec.sparsity == pytest.approx(sparsity)
    assert Spec.parse(str(spec)) == spec


@pytest.mark.parametrize(
    "text, message",
    [
        ("1.0", r"outside \[0, 1\)"),
        ("-0.1", r"outside \[0, 1\)"),
        ("4:4", "0 < N < M"),
        ("5:4", "0 < N < M"),
        ("0:4", "0 < N < M"),
        ("half", "cannot read sparsity"),
    ],
)
def test_parse_rejects(text, message):
    with pytest.raises(MixsparseError, match=message):
        Spec.parse(text)


def test_nm_needs_input_size_multiple_of_m_and_names_the_module():
    with pytest.raises(MixsparseError, match=r"model\.layers\.0\.mlp\.down_proj: input size 68 .* M=8"):
        Spec.parse("4:8").check_shape("model.layers.0.mlp.down_proj", (64, 68))


SHAPES = {"a.q": (8, 16), "a.k": (4, 16), "a.down": (16, 32)}


def test_plan_round_trip(tmp_path):
    plan = Plan(
        {"a.q": Spec.parse("2:4"), "a.k": Spec.parse("0.7"), "a.down": Spec.dense()},
        SHAPES,
        {"allocator": "msp", "seed": 3},
    )
    plan.save(tmp_path / "plan.json")
    again = Plan.load(tmp_path / "plan.json")
    assert again.modules == plan.modules and again.shapes == plan.shapes and again.info == plan.info
    assert again.weight_sparsity() == pytest.approx((0.5 * 128 + 0.7 * 64) / (128 + 64 + 512))


def test_plan_save_refuses_to_overwrite(tmp_path):
    plan = Plan.uniform(SHAPES, Spec.parse("0.5"))
    plan.save(tmp_path / "plan.json")
    with pytest.raises(MixsparseError, match="already exists"):
        plan.save(tmp_path / "plan.json")
    plan.save(tmp_path / "plan.json", overwrite=True)


def test_plan_validation_lists_unknown_modules_and_shape_mismatches():
    plan = Plan.uniform({**SHAPES, "b.q": (8, 16), "b.k": (4, 16)}, Spec.parse("0.5"))
    model = {**SHAPES, "a.q": (8, 32)}
    with pytest.raises(MixsparseError, match=r"2 modules the model lacks: b\.k, b\.q; 1 with other shapes: a\.q"):
        plan.validate(model)


@pytest.mark.parametrize(
    "content, message",
    [
        ("{", "not valid JSON"),
        ('{"x": 1}', "not a mixsparse plan"),
        ('{"format": "mixsparse-plan", "version": 9}', "version 9"),
        ('{"format": "mixsparse-plan", "version": 1, "modules": {"a": "3:2"}, "shapes": {"a": [1, 4]}}', "0 < N < M"),
        (
            '{"format": "mixsparse-plan", "version": 1, "modules": {"a": "2:4"}, "shapes": {}}',
            "no shape recorded for a",
        ),
    ],
)
def test_plan_load_errors(tmp_path, content, message):
    path = tmp_path / "plan.json"
    path.write_text(content)
    with pytest.raises(MixsparseError, match=message):
        Plan.load(path)


def test_plan_json_is_self_describing():
    data = Plan.uniform(SHAPES, Spec.parse("2:4"), metric="wanda").to_json()
    assert data["format"] == "mixsparse-plan" and data["allocator"] == "uniform" and data["metric"] == "wanda"
    assert data["modules"]["a.q"] == "2:4" and data["shapes"]["a.down"] == [16, 32]
    json.dumps(data)
