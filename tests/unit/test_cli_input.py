"""Bad input a new user types is refused up front, in one line, before any model is loaded."""

import argparse
import os
import signal
import socket
import subprocess
import sys

import pytest

from mixsparse.serve.cli import build_parser, main


def numeric_flags():
    """(verb path, option) of every flag whose value the parser converts to a number, from the parser itself."""
    found = []

    def walk(parser, path):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, [*path, name])
            elif (
                action.option_strings
                and action.type is not None
                and action.type not in (str,)
                and getattr(action.type, "__name__", "") in ("int", "float", "list")
            ):
                found.append((tuple(path), action.option_strings[-1]))

    walk(build_parser(), [])
    return found


def test_every_numeric_flag_has_a_range_check():
    unchecked = []
    for path, option in numeric_flags():
        parser = build_parser()
        action = next(a for a in _subparser(parser, path)._actions if option in a.option_strings)
        try:
            action.type("-99999")
        except argparse.ArgumentTypeError:
            continue
        unchecked.append(f"{' '.join(path)} {option}")
    assert numeric_flags() and not unchecked, f"flags without a range check: {unchecked}"


def _subparser(parser, path):
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["prune", "m", "--metric", "sparsegpt", "--sparsity", "2:4", "--out", "o", "--blocksize", "0"], "--blocksize"),
        (["prune", "m", "--metric", "wanda", "--sparsity", "2:4", "--out", "o", "--samples", "0"], "--samples"),
        (["prune", "m", "--metric", "wanda", "--sparsity", "2:4", "--out", "o", "--seqlen", "0"], "--seqlen"),
        (["prune", "m", "--metric", "sparsegpt", "--sparsity", "2:4", "--out", "o", "--damp", "nan"], "--damp"),
        (["eval", "ppl", "m", "--seqlen", "0"], "--seqlen"),
        (["serve", "m", "--port", "99999"], "--port"),
        (["serve", "m", "--metrics-window", "0"], "--metrics-window"),
        (["plan", "m", "--deploy", "--budget", "-1", "--out", "p.json"], "--budget"),
        (["plan", "m", "--deploy", "--memory", "0", "--out", "p.json"], "--memory"),
        (["plan", "m", "--target", "1.5", "--out", "p.json"], "--target"),
        (["plan", "m", "--deploy", "--pareto", "--budgets", "0,2", "--out", "front"], "--budgets"),
        (["plan", "m", "--target", "0.5", "--steps", "4,x", "--out", "p.json"], "--steps"),
        (["deploy", "m", "--port", "0"], "--port"),
        (["bench", "--dense", "d", "--sparse", "s", "--concurrency", "1,0"], "--concurrency"),
    ],
)
def test_out_of_range_numbers_are_usage_errors(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("mixsparse") and flag in lines[-1] and "Traceback" not in "\n".join(lines)


def test_lists_and_ranges_reach_the_commands_converted():
    args = build_parser().parse_args(
        ["plan", "m", "--deploy", "--pareto", "--budgets", "0,0.5,1", "--out", "f", "--steps", "2,4"]
    )
    assert args.budgets == (0.0, 0.5, 1.0) and args.steps == (2, 4)
    assert build_parser().parse_args(["bench", "--dense", "d", "--sparse", "s"]).concurrency == (1, 4, 16, 64)


def test_longer_fitness_sequences_keep_the_tokens_per_selection_step_unless_steps_are_given():
    """--fitness-seqlen alone changes the length of the held-out sequences, not the tokens each selection step
    reads (nor the search's cost): 4,16 sequences of 128 tokens become 1,4 of 512; --steps still wins."""
    from mixsparse.serve.cli.plan import search_options_from

    def steps(*flags):
        args = ["plan", "m", "--allocator", "msp", "--target", "0.7", "--out", "p.json", *flags]
        return search_options_from(build_parser().parse_args(args)).settings.steps

    assert steps() == (4, 16)
    assert steps("--fitness-seqlen", "512") == (1, 4)
    assert steps("--fitness-seqlen", "64") == (8, 32)
    assert steps("--fitness-seqlen", "4096") == (1, 1)  # never below one sequence
    assert steps("--fitness-seqlen", "512", "--steps", "2,8") == (2, 8)


def test_a_kept_search_cost_plan_is_reused_only_when_searched_with_todays_settings(tmp_path, monkeypatch):
    """benchmarks/search_cost.py states each plan as a PlanRequest and times the `mixsparse plan` command that
    asks for it: the CLI must parse that command back to the very request, and a plan searched with other
    generations, steps or precision than the request's is measured afresh."""
    import json
    from dataclasses import asdict, replace
    from pathlib import Path

    from mixsparse.pruner.core.levels import LevelGrid
    from mixsparse.pruner.core.precision import resolve
    from mixsparse.pruner.plans.request import PlanRequest, Research, SearchOptions
    from mixsparse.pruner.search.evolve import SearchSettings
    from mixsparse.serve.cli.plan import plan_request

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from search_cost import plan_args, searched_as_now

    plan = tmp_path / "plan.json"
    options = SearchOptions(SearchSettings(steps=(2, 8)))
    request = PlanRequest("m", str(plan), Research(0.7), allocator="msp", metric="wanda", search=options)
    args = plan_args(request)
    assert args == ["m", *"--allocator msp --target 0.7 --metric wanda --steps 2,8 --out".split(), str(plan)]
    assert plan_request(build_parser().parse_args(["plan", *args])) == request
    assert options.settings.steps == (2, 8) and options.settings.generations == 50
    grid = LevelGrid.around(0.7, options.delta, options.level_window, 0.0, 0.99).to_json()
    search = {
        "settings": json.loads(json.dumps(asdict(options.settings))),
        "precision": resolve(options.precision, "cpu"),
        "fitness_seqlen": options.fitness_seqlen,
        "fitness": options.fitness,
        "levels": {**grid, "stored": False},
    }
    assert not searched_as_now(request)  # nothing kept
    plan.write_text(json.dumps({"search": search}))
    assert searched_as_now(request)
    stale_values = [
        ("settings", {**search["settings"], "generations": 30}),
        ("precision", "other"),
        ("fitness", "loss"),
    ]
    for key, stale in stale_values:
        plan.write_text(json.dumps({"search": {**search, key: stale}}))
        assert not searched_as_now(request), key
    # a plan whose search was seeded by probing the blocks is another search than one without, either way
    probed = replace(request, search=replace(options, probe_seed=True))
    assert plan_request(build_parser().parse_args(["plan", *plan_args(probed)])) == probed
    plan.write_text(json.dumps({"search": {**search, "probed_seed": {"evaluations": 241}}}))
    assert not searched_as_now(request)
    assert searched_as_now(probed)
    plan.write_text(json.dumps({"search": search}))
    assert not searched_as_now(probed)


def error_line(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("mixsparse: error: "), err
    return err[0]


def random_bytes(path):
    path.write_bytes(bytes(range(128, 256)) * 8)  # never valid UTF-8
    return path


def test_deploy_over_an_artifact_whose_plan_json_is_random_bytes(tiny_llama, tmp_path, capsys):
    from serving_helpers import free_port

    out = tmp_path / "deployed"
    out.mkdir()
    (out / "config.json").write_text('{"quantization_config": {"quant_method": "mixsparse"}}')
    random_bytes(out / "plan.json")
    message = error_line(["deploy", str(tiny_llama), "--out", str(out), "--port", str(free_port())], capsys)
    assert f"{out} holds an artifact made with other settings" in message


@pytest.mark.parametrize(
    "argv, named",
    [
        (["prune", "{model}", "--metric", "wanda", "--plan", "{bad}", "--out", "{tmp}/o"], "plan file"),
        (
            [
                "prune",
                "{model}",
                "--metric",
                "wanda",
                "--sparsity",
                "2:4",
                "--calib",
                "{bad}",
                "--out",
                "{tmp}/o",
                "--samples",
                "2",
                "--seqlen",
                "16",
            ],
            "is not UTF-8 text",
        ),
        (
            [
                "plan",
                "{model}",
                "--allocator",
                "fisher",
                "--target",
                "0.5",
                "--sensitivity",
                "{bad}",
                "--out",
                "{tmp}/p.json",
            ],
            "sensitivity file",
        ),
    ],
)
def test_unreadable_input_files_are_one_line_errors(argv, named, tiny_llama, tmp_path, capsys):
    bad = random_bytes(tmp_path / "bad.json")
    argv = [a.format(model=tiny_llama, bad=bad, tmp=tmp_path) for a in argv]
    assert named in error_line(argv, capsys)


def refuse_loading(monkeypatch):
    from mixsparse.pruner.io import models

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the cheap checks")

    monkeypatch.setattr(models, "load", load)


def test_prune_out_under_a_file_fails_before_loading(tiny_llama, tmp_path, monkeypatch, capsys):
    refuse_loading(monkeypatch)
    (tmp_path / "a-file").write_text("")
    message = error_line(
        [
            "prune",
            str(tiny_llama),
            "--metric",
            "magnitude",
            "--sparsity",
            "0.5",
            "--out",
            str(tmp_path / "a-file" / "out"),
        ],
        capsys,
    )
    assert "a-file is not a directory" in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_prune_out_under_a_read_only_directory_fails_before_loading(tiny_llama, tmp_path, monkeypatch, capsys):
    refuse_loading(monkeypatch)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    try:
        message = error_line(
            [
                "prune",
                str(tiny_llama),
                "--metric",
                "magnitude",
                "--sparsity",
                "0.5",
                "--out",
                str(locked / "new" / "out"),
            ],
            capsys,
        )
    finally:
        locked.chmod(0o755)
    assert f"no permission to create entries in {locked}" in message


def test_an_infeasible_budget_fails_before_loading(tiny_llama, tmp_path, monkeypatch):
    from mixsparse.pruner.plans.make import make_plan
    from mixsparse.pruner.plans.request import Deployment, PlanRequest
    from mixsparse.runtime.errors import MixsparseError

    refuse_loading(monkeypatch)
    with pytest.raises(MixsparseError, match="--budget -1 is infeasible"):
        make_plan(
            PlanRequest(
                model=str(tiny_llama), out=str(tmp_path / "p.json"), goal=Deployment(budget=-1.0), allocator="fisher"
            )
        )


def test_a_killed_writer_leaves_a_temp_that_the_next_write_removes(tmp_path):
    from mixsparse.runtime.atomic import atomic_dir

    out = tmp_path / "artifact"
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            (
                "import os, signal\n"
                "from mixsparse.runtime.atomic import atomic_dir\n"
                f"with atomic_dir({str(out)!r}) as tmp:\n"
                "    (tmp / 'weights').write_bytes(bytes(1000))\n"
                "    os.kill(os.getpid(), signal.SIGKILL)\n"
            ),
        ]
    )
    assert killed.returncode == -signal.SIGKILL
    left = list(tmp_path.glob(".artifact.tmp-*"))
    assert len(left) == 1 and (left[0] / "weights").exists()
    alive = tmp_path / f".artifact.tmp-{socket.gethostname()}-{os.getpid()}-inflight"  # a writer still running
    alive.mkdir()
    with atomic_dir(out) as tmp:
        (tmp / "weights").write_bytes(b"done")
    assert (out / "weights").read_bytes() == b"done"
    assert sorted(tmp_path.iterdir()) == sorted([out, alive])


def test_an_encoder_is_refused_not_pruned(tiny_llama, tmp_path, capsys):
    from transformers import BertConfig, BertLMHeadModel

    bert = tmp_path / "bert"
    BertLMHeadModel(
        BertConfig(vocab_size=384, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    ).save_pretrained(bert)
    for file in tiny_llama.glob("tokenizer*"):
        (bert / file.name).write_bytes(file.read_bytes())
    message = error_line(
        ["prune", str(bert), "--metric", "magnitude", "--sparsity", "0.5", "--out", str(tmp_path / "out")], capsys
    )
    assert "(BertLMHeadModel) is not a causal decoder" in message
    assert not (tmp_path / "out").exists()


def test_export_of_an_artifact_without_tokenizer_files_fails(tiny_llama, tmp_path, capsys):
    art = tmp_path / "art"
    assert main(["prune", str(tiny_llama), "--metric", "magnitude", "--sparsity", "2:4", "--out", str(art)]) == 0
    capsys.readouterr()
    for file in art.glob("tokenizer*"):
        file.unlink()
    message = error_line(["export", "--dense", str(art), str(tmp_path / "plain")], capsys)
    assert f"{art} has no tokenizer files" in message and not (tmp_path / "plain").exists()


HUGE = "1000000000000"


@pytest.mark.parametrize(
    "argv, flag",
    [
        (
            ["prune", "{model}", "--metric", "wanda", "--sparsity", "0.5", "--samples", HUGE, "--out", "{out}"],
            "--samples",
        ),
        (["sensitivity", "{model}", "--samples", HUGE, "--out", "{out}"], "--samples"),
        (
            ["plan", "{model}", "--allocator", "fisher", "--target", "0.5", "--fisher-samples", HUGE, "--out", "{out}"],
            "--fisher-samples",
        ),
        (
            ["plan", "{model}", "--allocator", "owl", "--target", "0.5", "--samples", HUGE, "--out", "{out}"],
            "--samples",
        ),
    ],
)
def test_a_size_the_machine_cannot_hold_is_refused_before_loading(argv, flag, tiny_llama, tmp_path, capsys):
    argv = [a.format(model=tiny_llama, out=tmp_path / "out") for a in argv]
    message = error_line(argv, capsys)
    assert message.startswith(f"mixsparse: error: {flag} {HUGE}: ") and "this machine has" in message, message
    assert not (tmp_path / "out").exists()


def test_window_memory_counts_hidden_states_where_the_runner_holds_them():
    from mixsparse.pruner.io.sizes import check_windows
    from mixsparse.runtime.errors import MixsparseError

    need = 1000 * 512 * (8 + 2 * 4 * 576)  # ids + one block's float32 inputs and outputs
    check_windows("--samples", 1000, 512, 576, available=need)
    with pytest.raises(MixsparseError, match="hidden states"):
        check_windows("--samples", 1000, 512, 576, available=need - 1)
    check_windows("--fisher-samples", 1000, 512, available=1000 * 512 * 8)  # ids alone
