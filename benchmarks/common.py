"""Shared by the benchmark scripts: what machine this is, and where results go.

Every script writes ``benchmarks/results/<name>.json`` holding its markdown table, the exact command,
and the machine it ran on; ``render.py`` assembles BENCHMARKS.md from those files.
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from mixsparse.runtime.atomic import atomic_file
from mixsparse.runtime.machine import machine, machine_line  # noqa: F401 (re-exported for the scripts)
from mixsparse.serve.report import markdown_table  # noqa: F401

RESULTS = Path(__file__).resolve().parent / "results"


def mixsparse(*args: str, json_out: bool = False):
    """Run `mixsparse ARGS` in its own process (so its time and peak memory are its own); with ``json_out``,
    its standard output parsed as JSON (the `--json` summary)."""
    print("$ mixsparse", " ".join(args), file=sys.stderr, flush=True)
    command = [sys.executable, "-m", "mixsparse.serve.cli", *args]
    result = subprocess.run(command, stdout=subprocess.PIPE if json_out else None, text=True)
    if result.returncode:
        raise SystemExit(f"`mixsparse {' '.join(args)}` failed with exit code {result.returncode}")
    return json.loads(result.stdout) if json_out else None


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0]), *sys.argv[1:]])


def save(name: str, title: str, markdown: str, data: dict, section: str = "cpu", order: int = 50) -> Path:
    """Write results/<name>.json (atomically) for render.py; ``section`` is 'cpu' or 'gpu'."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {
        "name": name,
        "title": title,
        "section": section,
        "order": order,
        "command": command_line(),
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "markdown": markdown,
        "data": data,
    }
    path = RESULTS / f"{name}.json"
    with atomic_file(path, overwrite=True) as tmp:
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
    return path
