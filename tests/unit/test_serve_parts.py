"""Server pieces that need no running server: flags, port checks, preflight, metrics arithmetic."""

import socket

import pytest
from prometheus_client import CollectorRegistry, Counter

from mixsparse.runtime.errors import MixsparseError
from mixsparse.runtime.machine import cpu_serving_dtype
from mixsparse.serve.guard import GuardSettings
from mixsparse.serve.metrics import Rates, vllm_token_counters
from mixsparse.serve.server import ServeOptions, check_port, preflight, serve_command, vllm_argv


def test_cpu_defaults_are_added_unless_overridden(tmp_path):
    argv = vllm_argv(ServeOptions("m", port=9000), tmp_path, cuda=False)
    assert "--enforce-eager" in argv and "--no-enable-prefix-caching" in argv
    assert argv[argv.index("--dtype") + 1] == cpu_serving_dtype() and argv[argv.index("--port") + 1] == "9000"
    mine = vllm_argv(
        ServeOptions("m", vllm_args=["--dtype", "bfloat16", "--enable-prefix-caching"]), tmp_path, cuda=False
    )
    assert mine.count("--dtype") == 1 and "--no-enable-prefix-caching" not in mine
    assert "--enforce-eager" not in vllm_argv(ServeOptions("m"), tmp_path, cuda=True)


@pytest.mark.parametrize(
    "options",
    [
        ServeOptions("art"),
        ServeOptions(
            "/a/art",
            "0.0.0.0",
            9001,
            "s3cret",
            "mine",
            2.5,
            ["--max-num-seqs", "4", "--dtype=float32"],
            GuardSettings(3, 100, True),
            verbose=True,
            log_file="/tmp/x.log",
        ),
    ],
)
def test_the_serve_command_line_parses_back_to_its_options(options):
    from mixsparse.serve import cli

    command = serve_command(options)
    assert command[1:3] == ["-m", "mixsparse.serve.cli"]
    args, extra = cli.build_parser().parse_known_args(command[3:])
    args.vllm_args = extra
    assert args.verb == "serve" and cli.common.serve_options(args, args.model) == options


def test_port_in_use_is_a_clear_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(MixsparseError, match=f"port {port} on 127.0.0.1 is already in use"):
            check_port("127.0.0.1", port)


def test_preflight_rejects_what_is_not_a_model(tmp_path):
    with pytest.raises(MixsparseError, match="no config.json"):
        preflight(str(tmp_path))


def test_rates_over_a_sliding_window_decay_to_zero():
    rates = Rates(window=10)
    assert rates.add(0, 0, 0) == (0, 0)
    assert rates.add(1, 100, 20) == (100, 20)
    assert rates.add(2, 100, 40) == (50, 20)
    for t in range(3, 14):
        prompt, generation = rates.add(t, 100, 40)
    assert (prompt, generation) == (0, 0)


def test_token_counters_are_read_from_the_registry():
    registry = CollectorRegistry()
    prompt = Counter("vllm:prompt_tokens", "", ["engine"], registry=registry)
    generation = Counter("vllm:generation_tokens", "", ["engine"], registry=registry)
    prompt.labels("0").inc(5)
    prompt.labels("1").inc(2)
    generation.labels("0").inc(9)
    assert vllm_token_counters(registry) == (7, 9)
