"""The CLI: every verb's --help, and a one-line error naming the cause for each kind of bad input."""

import json
import shutil
import subprocess
import sys

import pytest

from mixsparse.serve.cli import build_parser, main

VERBS = [["prune"], ["eval"], ["eval", "ppl"], ["export"], ["sensitivity"], ["plan"], ["serve"], ["deploy"], ["bench"]]


@pytest.mark.parametrize("verb", VERBS, ids=" ".join)
def test_help(verb, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*verb, "--help"])
    assert exit_.value.code == 0
    assert "usage: mixsparse" in capsys.readouterr().out


def test_every_subcommand_has_a_help_test():
    verbs = build_parser()._subparsers._group_actions[0].choices
    assert {v[0] for v in VERBS} == set(verbs)


def test_console_script_runs():
    script = shutil.which("mixsparse", path=str(__import__("pathlib").Path(sys.executable).parent))
    result = subprocess.run([script, "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("mixsparse ")


def error_of(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert err[-1].startswith("mixsparse: error: ")
    return err[-1]


def prune_args(model, out, *extra):
    return ["prune", str(model), "--metric", "wanda", "--out", str(out), "--samples", "4", "--seqlen", "32", *extra]


def test_unknown_model(tmp_path, capsys):
    message = error_of(prune_args(tmp_path / "nowhere", tmp_path / "out", "--sparsity", "2:4"), capsys)
    assert "unknown model" in message and "nowhere" in message
    assert not (tmp_path / "out").exists()


def test_directory_without_config(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert "has no config.json" in error_of(prune_args(tmp_path / "empty", tmp_path / "o", "--sparsity", "0.5"), capsys)


def test_architecture_without_linear_decoder_blocks(tiny_llama, tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel

    # GPT-2's blocks use transformers' Conv1D, not nn.Linear
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=384)).save_pretrained(tmp_path / "gpt2")
    for file in tiny_llama.glob("tokenizer*"):
        shutil.copy(file, tmp_path / "gpt2")
    message = error_of(prune_args(tmp_path / "gpt2", tmp_path / "o", "--sparsity", "0.5"), capsys)
    assert "GPT2LMHeadModel: no decoder blocks with linear layers found" in message


def test_unknown_architecture(tmp_path, capsys):
    (tmp_path / "weird").mkdir()
    (tmp_path / "weird" / "config.json").write_text('{"model_type": "no-such-arch"}')
    message = error_of(prune_args(tmp_path / "weird", tmp_path / "o", "--sparsity", "0.5"), capsys)
    assert "cannot load model" in message and "no-such-arch" in message


@pytest.mark.parametrize(
    "sparsity, message",
    [
        ("1.5", r"sparsity 1.5 is outside [0, 1)"),
        ("-0.2", r"sparsity -0.2 is outside [0, 1)"),
        ("4:4", "N:M sparsity 4:4 needs 0 < N < M"),
        ("8:4", "N:M sparsity 8:4 needs 0 < N < M"),
    ],
)
def test_bad_sparsity(tiny_llama, tmp_path, capsys, sparsity, message):
    assert message in error_of(prune_args(tiny_llama, tmp_path / "o", f"--sparsity={sparsity}"), capsys)
    assert not (tmp_path / "o").exists()


def test_nm_that_does_not_divide_a_module_names_it(tiny_llama_odd, tmp_path, capsys):
    message = error_of(prune_args(tiny_llama_odd, tmp_path / "o", "--sparsity", "4:8"), capsys)
    assert "model.layers.0.mlp.down_proj: input size 68 is not a multiple of M=8" in message


def test_calibration_text_too_short(tiny_llama, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("only a few words here")
    message = error_of([*prune_args(tiny_llama, tmp_path / "o", "--sparsity", "2:4"), "--calib", str(short)], capsys)
    assert "calibration text (file" in message and "need at least 33" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["short.txt"]


def test_existing_output(tiny_llama, tmp_path, capsys):
    (tmp_path / "o").mkdir()
    assert "already exists; pass --overwrite" in error_of(
        prune_args(tiny_llama, tmp_path / "o", "--sparsity", "2:4"), capsys
    )


def test_prune_then_eval_then_export(tiny_llama, tmp_path, capsys):
    assert main(prune_args(tiny_llama, tmp_path / "art", "--sparsity", "2:4", "--json")) == 0
    assert json.loads(capsys.readouterr().out)["linear_sparsity"] == pytest.approx(0.5)
    assert main(["eval", "ppl", str(tmp_path / "art"), "--windows", "2", "--seqlen", "64", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"tokens": 126' in out and '"linear_sparsity": 0.5' in out
    assert main(["export", "--dense", str(tmp_path / "art"), str(tmp_path / "plain")]) == 0
    assert "already exists" in error_of(["export", "--dense", str(tmp_path / "art"), str(tmp_path / "plain")], capsys)


@pytest.fixture
def artifact_dir(tiny_llama, tmp_path, capsys):
    assert main(prune_args(tiny_llama, tmp_path / "art", "--sparsity", "2:4")) == 0
    capsys.readouterr()
    return tmp_path / "art"


def test_truncated_artifact(artifact_dir, capsys):
    weights = artifact_dir / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as handle:
        handle.truncate(size - 1000)
    message = error_of(["eval", "ppl", str(artifact_dir), "--windows", "1", "--seqlen", "64"], capsys)
    assert f"model.safetensors is {size - 1000} bytes but the artifact records {size}" in message


def test_artifact_with_a_missing_tensor(artifact_dir, capsys):
    from safetensors.torch import load_file, save_file

    weights = artifact_dir / "model.safetensors"
    tensors = load_file(weights)
    del tensors["model.layers.1.mlp.down_proj.meta"]
    save_file(tensors, weights)
    config = json.loads((artifact_dir / "config.json").read_text())
    config["quantization_config"]["files"]["model.safetensors"] = weights.stat().st_size
    (artifact_dir / "config.json").write_text(json.dumps(config))
    message = error_of(["export", "--dense", str(artifact_dir), str(artifact_dir.parent / "x")], capsys)
    assert "tensor model.layers.1.mlp.down_proj.meta of 2:4 module model.layers.1.mlp.down_proj is missing" in message


def test_artifact_with_an_unknown_format_version(artifact_dir, capsys):
    config = json.loads((artifact_dir / "config.json").read_text())
    config["quantization_config"]["format_version"] = 99
    (artifact_dir / "config.json").write_text(json.dumps(config))
    assert "format_version 99 is not supported" in error_of(["eval", "ppl", str(artifact_dir)], capsys)


def test_bad_windows_argument(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "ppl", "x", "--windows", "some"])
    assert exit_.value.code == 2 and "'some' is not a number of windows" in capsys.readouterr().err
