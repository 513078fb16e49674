"""Assemble BENCHMARKS.md from benchmarks/results/*.json (each written by one benchmark script)."""

from __future__ import annotations

import json
from pathlib import Path

from common import RESULTS, machine_line

ROOT = Path(__file__).resolve().parent.parent
INTRO = """# mixsparse benchmarks

Every table below was produced by the command shown above it, on the machine named there; rerun the
command to refresh it, then `python benchmarks/render.py` (or `make bench` for all of them). Timings on
shared machines are noisy: compare numbers within one table (same run), not across tables.
CPU and GPU figures are kept apart.
"""


def render() -> str:
    results = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
    parts = [INTRO]
    for section, heading in (("cpu", "CPU"), ("gpu", "GPU")):
        chosen = sorted((r for r in results if r["section"] == section), key=lambda r: (r["order"], r["name"]))
        parts.append(f"## {heading}\n")
        if not chosen:
            parts.append(
                "No results yet: the GPU tables are filled in by a session that has a CUDA machine "
                "(see the scripts in benchmarks/).\n"
                if section == "gpu"
                else "No results yet.\n"
            )
        for result in chosen:
            parts.append(
                f"### {result['title']}\n\n"
                f"Machine: {machine_line(result['machine'])}. Date: {result['date']}.\n\n"
                f"```\n{result['command']}\n```\n\n{result['markdown']}\n"
            )
    return "\n".join(parts)


if __name__ == "__main__":
    (ROOT / "BENCHMARKS.md").write_text(render())
    print(f"wrote {ROOT / 'BENCHMARKS.md'}")
