"""Server pieces that need no running server: flags, port checks, preflight, metrics arithmetic."""

import http.server
import json
import socket
import subprocess
import sys
import threading

import pytest
from prometheus_client import CollectorRegistry, Counter

from mixsparse.runtime.errors import MixsparseError
from mixsparse.runtime.machine import cpu_serving_dtype
from mixsparse.serve.guard import GuardSettings
from mixsparse.serve.metrics import Rates, vllm_token_counters
from mixsparse.serve.server import (
    ServeOptions,
    check_port,
    preflight,
    serve_command,
    serve_environment,
    vllm_argv,
)


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
def test_the_serve_command_line_parses_back_to_its_options(options, monkeypatch):
    from mixsparse.serve import cli

    command = serve_command(options)
    # the key travels in the child's environment, never on its command line (ps shows that to every user)
    assert options.api_key is None or options.api_key not in " ".join(command)
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    for key, value in serve_environment(options).items():
        monkeypatch.setenv(key, value)
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


def test_an_unwritable_log_file_is_one_line_before_vllm_starts(tiny_llama, tmp_path, capsys):
    from mixsparse.serve.cli import main

    (tmp_path / "a-file").write_text("")
    log = tmp_path / "a-file" / "serve.log"  # under a file: unwritable even for root
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert main(["serve", str(tiny_llama), "--port", str(port), "--log-file", str(log)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--log-file {log}: cannot write it" in err[0], err


class _Refusing(http.server.BaseHTTPRequestHandler):
    """Answers every POST as vLLM does a request over its limits."""

    def do_POST(self):
        body = json.dumps(
            {
                "error": {
                    "message": "max_tokens is too large: 1000000000000.\nsecond line",
                    "type": "BadRequestError",
                    "code": 400,
                }
            }
        ).encode()
        self.send_response(400)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_a_refused_request_relays_the_server_reason_in_one_line():
    from mixsparse.serve.deploy import ServerRefused, request

    server = http.server.HTTPServer(("127.0.0.1", 0), _Refusing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1/chat/completions"
        with pytest.raises(ServerRefused) as error:
            request(url, {"max_tokens": 10**12})
    finally:
        server.shutdown()
        server.server_close()
    assert str(error.value) == f"the server refused {url} (400): max_tokens is too large: 1000000000000."


def test_a_stopped_server_gets_ctrl_c_first(tmp_path):
    """deploy and bench stop their server as Ctrl-C would (vLLM then takes its helper processes with it)."""
    from mixsparse.serve.deploy import stop

    marker = tmp_path / "interrupted"
    script = (
        "import sys, time\n"
        "try:\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(60)\n"
        "except KeyboardInterrupt:\n"
        f"    open({str(marker)!r}, 'w').close()\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    stop(child, timeout=30)
    assert child.returncode == 0 and marker.exists()


def test_the_api_key_comes_from_a_file_or_the_environment(tmp_path, monkeypatch):
    from mixsparse.serve.cli import build_parser
    from mixsparse.serve.cli.common import serve_options

    monkeypatch.delenv("VLLM_API_KEY", raising=False)

    def key(*flags):
        args, extra = build_parser().parse_known_args(["serve", "m", *flags])
        args.vllm_args = extra
        return serve_options(args, "m").api_key

    (tmp_path / "key").write_text("from-file\nignored\n")
    assert key("--api-key-file", str(tmp_path / "key")) == "from-file"
    assert key() is None
    monkeypatch.setenv("VLLM_API_KEY", "from-env")
    assert key() == "from-env" and key("--api-key", "given") == "given"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(MixsparseError, match="its first line is empty"):
        key("--api-key-file", str(tmp_path / "empty"))
    with pytest.raises(MixsparseError, match="cannot read it"):
        key("--api-key-file", str(tmp_path / "missing"))
    with pytest.raises(SystemExit):
        key("--api-key", "a", "--api-key-file", str(tmp_path / "key"))


def test_an_untested_vllm_is_refused_in_one_line_unless_allowed(monkeypatch):
    from mixsparse.serve import vllm_version

    monkeypatch.delenv(vllm_version.ALLOW_UNTESTED, raising=False)
    vllm_version.check("0.32.0")
    vllm_version.check("0.32.3+cpu")
    vllm_version.check()  # what CI installs
    with pytest.raises(MixsparseError, match=r"vLLM 0\.33\.1 is installed, but mixsparse is tested with vLLM 0\.32"):
        vllm_version.check("0.33.1")
    with pytest.raises(MixsparseError, match="vLLM 0.3.0 is installed"):
        vllm_version.check("0.3.0")
    monkeypatch.setenv(vllm_version.ALLOW_UNTESTED, "1")
    vllm_version.check("0.33.1")
