"""`serve`'s pre-flight check catches what vLLM's engine would die on, in one line, before the engine starts."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from mixsparse.pruner import pipeline
from mixsparse.pruner.io.data import CalibrationProtocol
from mixsparse.pruner.jobs import PruneJob
from mixsparse.runtime.errors import MixsparseError
from mixsparse.runtime.formats import artifact
from mixsparse.serve.cli import main
from mixsparse.serve.server import preflight

PACKED = "model.layers.1.mlp.down_proj"


@pytest.fixture(scope="module")
def artifact_24(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("preflight") / "tiny-24"
    pipeline.prune(
        PruneJob(
            model=str(tiny_llama),
            metric="magnitude",
            sparsity="2:4",
            out=str(out),
            calibration=CalibrationProtocol(samples=2, seqlen=32),
        )
    )
    return out


def edit_tensors(change):
    def edit(path):
        tensors = load_file(path / "model.safetensors")
        change(tensors)
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
        config = json.loads((path / "config.json").read_text())
        config["quantization_config"]["files"]["model.safetensors"] = (path / "model.safetensors").stat().st_size
        (path / "config.json").write_text(json.dumps(config))

    return edit


def edit_config(change):
    def edit(path):
        config = json.loads((path / "config.json").read_text())
        change(config)
        (path / "config.json").write_text(json.dumps(config))

    return edit


def zero_meta_byte(tensors):
    tensors[f"{PACKED}.meta"][0, 0] = 0  # both indices of two groups 0: not a 2:4 packing


def remove_tokenizer(path):
    for file in path.iterdir():
        if file.name.startswith(("tokenizer", "special_tokens")):
            file.unlink()


CASES = {
    "meta byte 0x00": (edit_tensors(zero_meta_byte), f"{PACKED}: meta holds invalid 2:4 indices"),
    "config not JSON": (lambda p: (p / "config.json").write_text("{not json"), "config.json is not readable JSON"),
    "quantization_config null": (
        edit_config(lambda c: c.__setitem__("quantization_config", None)),
        "holds packed 2:4 tensors",
    ),
    "module entry deleted": (
        edit_config(lambda c: c["quantization_config"]["modules"].pop(PACKED)),
        f"does not record its module {PACKED} as packed",
    ),
    "tokenizer deleted": (remove_tokenizer, "no usable tokenizer"),
    "meta stored as I8": (
        edit_tensors(lambda t: t.__setitem__(f"{PACKED}.meta", t[f"{PACKED}.meta"].view(torch.int8))),
        f"{PACKED}.meta is stored as I8",
    ),
}


def test_a_good_artifact_passes(artifact_24):
    assert preflight(str(artifact_24)) == artifact_24


@pytest.mark.parametrize("case", CASES)
def test_what_the_engine_needs_is_checked(case, artifact_24, tmp_path):
    edit, message = CASES[case]
    broken = tmp_path / "broken"
    shutil.copytree(artifact_24, broken)
    edit(broken)
    with pytest.raises(MixsparseError, match=None) as error:
        preflight(str(broken))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_serve_says_it_in_one_line(artifact_24, tmp_path, capsys):
    from serving_helpers import free_port

    broken = tmp_path / "broken"
    shutil.copytree(artifact_24, broken)
    CASES["meta byte 0x00"][0](broken)
    assert main(["serve", str(broken), "--port", str(free_port())]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "meta holds invalid 2:4 indices" in err[0]


BITMASK = "model.layers.0.mlp.down_proj"


@pytest.fixture(scope="module")
def artifact_bitmask(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("preflight") / "tiny-60"
    pipeline.prune(
        PruneJob(
            model=str(tiny_llama),
            metric="magnitude",
            sparsity="0.6",
            out=str(out),
            calibration=CalibrationProtocol(samples=2, seqlen=32),
        )
    )
    return out


def flip_mask_bit(tensors):
    tensors[f"{BITMASK}.mask"][3, 0] ^= 1


BITMASK_CASES = {
    "mask bit flipped": (edit_tensors(flip_mask_bit), f"{BITMASK}: bitmask offsets disagree with the mask"),
    "offsets stored as I32": (
        edit_tensors(lambda t: t.__setitem__(f"{BITMASK}.offsets", t[f"{BITMASK}.offsets"].int())),
        f"{BITMASK}.offsets is stored as I32, a bitmask offsets tensor must be I64",
    ),
    "nnz recorded wrong": (
        edit_config(
            lambda c: c["quantization_config"]["modules"][BITMASK].__setitem__(
                "nnz", c["quantization_config"]["modules"][BITMASK]["nnz"] + 8
            )
        ),
        f"{BITMASK}.values has shape",
    ),
    "module entry deleted": (
        edit_config(lambda c: c["quantization_config"]["modules"].pop(BITMASK)),
        f"does not record its module {BITMASK} as bitmask",
    ),
    "recorded as dense": (
        edit_config(lambda c: c["quantization_config"]["modules"][BITMASK].__setitem__("storage", "dense")),
        f"tensor {BITMASK}.weight of module {BITMASK} is missing",
    ),
}


def test_a_good_bitmask_artifact_passes(artifact_bitmask):
    assert artifact.read_config(artifact_bitmask).bitmask
    assert preflight(str(artifact_bitmask)) == artifact_bitmask


@pytest.mark.parametrize("case", BITMASK_CASES)
def test_bitmask_modules_are_checked(case, artifact_bitmask, tmp_path):
    edit, message = BITMASK_CASES[case]
    broken = tmp_path / "broken"
    shutil.copytree(artifact_bitmask, broken)
    edit(broken)
    with pytest.raises(MixsparseError) as error:
        preflight(str(broken))
    assert message in str(error.value) and "\n" not in str(error.value)


NORM = "model.layers.0.input_layernorm.weight"


def outside_file(path):
    """The weight file moved one directory up, and quantization_config.files pointing there."""
    (path.parent / "elsewhere").mkdir()
    (path / "model.safetensors").rename(path.parent / "elsewhere" / "model.safetensors")
    edit_config(
        lambda c: c["quantization_config"].__setitem__(
            "files", {"../elsewhere/model.safetensors": c["quantization_config"]["files"]["model.safetensors"]}
        )
    )(path)


# each broken artifact, and what serve, eval and export must say about it in one line
EVERY_READER = {
    "a norm stored 2-D": (
        edit_tensors(lambda t: t.__setitem__(NORM, t[NORM].reshape(1, -1))),
        f"tensor {NORM} has shape [1, 64]",
    ),
    "packed values stored as F16": (
        edit_tensors(lambda t: t.__setitem__(f"{PACKED}.values", t[f"{PACKED}.values"].view(torch.float16))),
        f"tensor {PACKED}.values is stored as",
    ),
    "the embedding stored as F16": (
        edit_tensors(
            lambda t: t.__setitem__("model.embed_tokens.weight", t["model.embed_tokens.weight"].view(torch.float16))
        ),
        "tensor model.embed_tokens.weight is stored as",
    ),
    "a weight file outside the artifact": (outside_file, "outside the artifact directory"),
}


@pytest.mark.parametrize("reader", ["eval", "export", "serve"])
@pytest.mark.parametrize("case", EVERY_READER)
def test_every_reader_refuses_a_tensor_or_file_the_config_does_not_describe(
    case, reader, artifact_24, tmp_path, capsys
):
    from serving_helpers import free_port

    edit, message = EVERY_READER[case]
    broken = tmp_path / "artifact" / "broken"
    shutil.copytree(artifact_24, broken)
    edit(broken)
    command = {
        "eval": ["eval", "ppl", str(broken), "--windows", "1", "--seqlen", "32"],
        "export": ["export", "--dense", str(broken), str(tmp_path / "plain")],
        "serve": ["serve", str(broken), "--port", str(free_port())],
    }[reader]
    assert main(command) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "plain").exists()
