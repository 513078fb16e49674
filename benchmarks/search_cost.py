"""What an msp research search costs: wall time, peak resident memory and the level database on disk, for
the default model (the full search, SparseGPT levels) and a ~1B Llama-shaped model with random weights (a
short Wanda search: what it holds, not what it finds). Both with `mixsparse plan`'s defaults (KL fitness, no
probed seed): what a user's search costs.

Each plan runs as its own `mixsparse plan` process under GNU time (`/usr/bin/time -v`), which reports the
peak resident set; its log is kept under --work, and a log whose timed command is exactly the one this
script would run is read instead of running it again (delete --work to measure afresh).

    python benchmarks/search_cost.py
    python benchmarks/search_cost.py --only smollm2
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from common import markdown_table, save

RUNS = Path(__file__).resolve().parent.parent / "runs"


def plans(work: Path) -> dict[str, list[str]]:
    from e2e_cpu import build_llama_1b

    return {
        "smollm2": [
            "smollm2-135m",
            "--allocator",
            "msp",
            "--target",
            "0.7",
            "--metric",
            "sparsegpt",
            "--out",
            str(work / "msp70-sgpt.json"),
        ],
        "llama-1b": [
            str(build_llama_1b(RUNS / "llama-1b-random")),
            "--allocator",
            "msp",
            "--target",
            "0.7",
            "--metric",
            "wanda",
            "--fisher-samples",
            "2",
            "--samples",
            "8",
            "--generations",
            "2",
            "--population",
            "2",
            "--offspring",
            "2",
            "--survivors",
            "1",
            "--steps",
            "1,2",
            "--out",
            str(work / "llama1b-msp70-wanda.json"),
        ],
    }


def normalised(args: list[str]) -> list[str]:
    """Paths resolved against the repository root, so a log of the same command run from there matches."""
    root = RUNS.parent
    return [str((root / a).resolve()) if "/" in a and not a.startswith("-") else a for a in args]


def timed_args(report: str) -> list[str] | None:
    match = re.search(r'Command being timed: "(.+)"', report)
    if not match:
        return None
    words = shlex.split(match.group(1))
    return words[words.index("plan") + 1 :] if "plan" in words else None


def searched_as_now(args: list[str], plan: Path) -> bool:
    """Whether the kept plan was searched as `mixsparse plan args` searches today: the same command means
    another search once a default (generations, level grid, precision, fitness, probed seed) has changed."""
    from mixsparse.pruner.core.levels import LevelGrid
    from mixsparse.pruner.core.precision import resolve
    from mixsparse.serve.cli import build_parser, search_options_from

    if not plan.exists():
        return False
    ns = build_parser().parse_args(["plan", *args])
    options = search_options_from(ns)
    search = json.loads(plan.read_text()).get("search", {})
    levels = search.get("levels", {})
    step = options.level_step if levels.get("stored") else options.delta
    grid = LevelGrid.around(ns.target, step, options.level_window, ns.min_ratio, ns.max_ratio).to_json()
    return (
        search.get("settings") == json.loads(json.dumps(asdict(options.settings)))
        and search.get("precision") == resolve(options.precision, ns.device)
        and search.get("fitness_seqlen") == options.fitness_seqlen
        and search.get("fitness", "loss") == options.fitness
        and ("probed_seed" in search) == options.probe_seed
        and {k: levels.get(k) for k in grid} == grid
    )


def timed(log: Path, args: list[str]) -> str:
    """The GNU time report of `mixsparse plan args`, from ``log`` if it timed exactly that command, searched
    with today's defaults."""
    command = f"mixsparse plan {shlex.join(args)}"
    plan = Path(args[args.index("--out") + 1])
    if (
        log.exists()
        and (earlier := timed_args(log.read_text()))
        and normalised(earlier) == normalised(args)
        and searched_as_now(args, plan)
    ):
        print(f"reusing {log} ({command})", file=sys.stderr)
        return log.read_text()
    print(f"$ {command}", file=sys.stderr, flush=True)
    with open(log, "w") as handle:
        result = subprocess.run(["/usr/bin/time", "-v", "mixsparse", "plan", *args], stdout=handle, stderr=handle)
    if result.returncode:
        raise SystemExit(f"`{command}` failed; see {log}")
    return log.read_text()


def field(report: str, name: str) -> str:
    match = re.search(rf"^\s*{re.escape(name)}: (.+)$", report, re.MULTILINE)
    if not match:
        raise SystemExit(f"GNU time report lacks {name!r}")
    return match.group(1).strip()


def seconds(clock: str) -> float:
    parts = [float(p) for p in clock.split(":")]
    return round(sum(p * 60**i for i, p in enumerate(reversed(parts))), 2)  # GNU time reports centiseconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="comma-separated: smollm2, llama-1b")
    parser.add_argument("--work", default=str(RUNS / "i14"), help="plans and GNU time logs (kept)")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    chosen = plans(work)
    if args.only:
        chosen = {k: v for k, v in chosen.items() if k in args.only.split(",")}
    rows, data = [], {}
    for name, plan_args in chosen.items():
        log = work / {"smollm2": "msp70-sgpt.log", "llama-1b": "llama1b.log"}[name]
        report = timed(log, plan_args)
        info = json.loads(Path(plan_args[plan_args.index("--out") + 1]).read_text())
        search = info["search"]
        point = {
            "command": f"mixsparse plan {shlex.join(plan_args)}".replace(f"{RUNS.parent}/", ""),
            "wall_seconds": seconds(field(report, "Elapsed (wall clock) time (h:mm:ss or m:ss)")),
            "cpu_percent": field(report, "Percent of CPU this job got"),
            "peak_rss_bytes": int(field(report, "Maximum resident set size (kbytes)")) * 1024,
            "search_seconds": search["seconds"],
            "generations": search["generations"],
            "evaluations": search["evaluations"],
            "database_bytes": search["levels"]["database_bytes"],
            "levels": search["levels"]["levels"] if search["levels"]["stored"] else "score ranks (any ratio)",
        }
        data[name] = point
        rows.append(
            [
                name,
                info["metric"],
                f"{point['wall_seconds'] / 60:.1f}",
                f"{point['search_seconds'] / 60:.1f}",
                str(point["generations"]),
                point["cpu_percent"],
                f"{point['peak_rss_bytes'] / 2**30:.2f}",
                f"{point['database_bytes'] / 2**30:.2f}",
            ]
        )
    markdown = (
        "Each row is one `mixsparse plan` process under `/usr/bin/time -v` (commands in the data); the whole "
        "command includes the Fisher traces and the anchored calibration pass that builds the level database. "
        "llama-1b is a short search on random weights: it shows what the search holds for a model of that "
        "size, not what it finds.\n\n"
        + markdown_table(
            [
                "model",
                "metric",
                "whole command (min)",
                "search (min)",
                "generations",
                "CPU",
                "peak RSS (GiB)",
                "level database on disk (GiB)",
            ],
            rows,
        )
        + "\n\n"
        + "\n".join(f"- {name}: `{point['command']}`" for name, point in data.items())
    )
    print(markdown)
    save("search-cost", "What an msp search costs: time, memory, disk", markdown, data, order=23)


if __name__ == "__main__":
    main()
