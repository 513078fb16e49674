"""Bad input a new user types is refused up front, in one line, before any model is loaded."""

import argparse

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
            elif action.option_strings and action.type is not None and action.type not in (str,) \
                    and getattr(action.type, "__name__", "") in ("int", "float", "list"):
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
    assert numeric_flags() and not unchecked


def _subparser(parser, path):
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


@pytest.mark.parametrize("argv, flag", [
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
])
def test_out_of_range_numbers_are_usage_errors(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("mixsparse") and flag in lines[-1] and "Traceback" not in "\n".join(lines)


def test_lists_and_ranges_reach_the_commands_converted():
    args = build_parser().parse_args(["plan", "m", "--deploy", "--pareto", "--budgets", "0,0.5,1", "--out", "f",
                                      "--steps", "2,4"])
    assert args.budgets == (0.0, 0.5, 1.0) and args.steps == (2, 4)
    assert build_parser().parse_args(["bench", "--dense", "d", "--sparse", "s"]).concurrency == (1, 4, 16, 64)


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


@pytest.mark.parametrize("argv, named", [
    (["prune", "{model}", "--metric", "wanda", "--plan", "{bad}", "--out", "{tmp}/o"], "plan file"),
    (["prune", "{model}", "--metric", "wanda", "--sparsity", "2:4", "--calib", "{bad}", "--out", "{tmp}/o",
      "--samples", "2", "--seqlen", "16"], "is not UTF-8 text"),
    (["plan", "{model}", "--allocator", "fisher", "--target", "0.5", "--sensitivity", "{bad}",
      "--out", "{tmp}/p.json"], "sensitivity file"),
])
def test_unreadable_input_files_are_one_line_errors(argv, named, tiny_llama, tmp_path, capsys):
    bad = random_bytes(tmp_path / "bad.json")
    argv = [a.format(model=tiny_llama, bad=bad, tmp=tmp_path) for a in argv]
    assert named in error_line(argv, capsys)
