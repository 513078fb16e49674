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
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING

from common import markdown_table, save

if TYPE_CHECKING:
    from mixsparse.pruner.plans.request import PlanRequest

RUNS = Path(__file__).resolve().parent.parent / "runs"


def plans(work: Path) -> dict[str, PlanRequest]:
    from e2e_cpu import build_llama_1b

    from mixsparse.pruner.io.data import CalibrationProtocol
    from mixsparse.pruner.plans.request import FisherOptions, PlanRequest, Research, SearchOptions
    from mixsparse.pruner.search.evolve import SearchSettings

    return {
        "smollm2": PlanRequest(
            "smollm2-135m", str(work / "msp70-sgpt.json"), Research(0.7), allocator="msp", metric="sparsegpt"
        ),
        "llama-1b": PlanRequest(
            str(build_llama_1b(RUNS / "llama-1b-random")),
            str(work / "llama1b-msp70-wanda.json"),
            Research(0.7),
            allocator="msp",
            metric="wanda",
            calibration=CalibrationProtocol(samples=8),
            fisher=FisherOptions(samples=2),
            search=SearchOptions(SearchSettings(generations=2, population=2, offspring=2, survivors=1, steps=(1, 2))),
        ),
    }


# The `mixsparse plan` flags of the request fields these plans set, in the order the kept logs' commands name
# them (a log is reused only for the very same command): (flag, field path, named even at its default).
FLAGS = [
    ("--allocator", "allocator", True),
    ("--target", "goal.target", True),
    ("--metric", "metric", True),
    ("--fisher-samples", "fisher.samples", False),
    ("--samples", "calibration.samples", False),
    ("--generations", "search.settings.generations", False),
    ("--population", "search.settings.population", False),
    ("--offspring", "search.settings.offspring", False),
    ("--survivors", "search.settings.survivors", False),
    ("--steps", "search.settings.steps", False),
    ("--probe-seed", "search.probe_seed", False),
]


def _get(obj, path: str):
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def _with(obj, path: str, value):
    head, _, rest = path.partition(".")
    return replace(obj, **{head: _with(getattr(obj, head), rest, value) if rest else value})


def _flag_value(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def plan_args(request: PlanRequest) -> list[str]:
    """The `mixsparse plan` arguments that ask for ``request``: each plan is measured as its own process, as a
    user runs it. Refuses a request that differs from the defaults in a field FLAGS cannot name, which would
    otherwise be measured as another search than the one asked for."""
    from mixsparse.pruner.plans.request import PlanRequest, Research

    default = PlanRequest(request.model, request.out, Research())
    named = default
    args = [request.model]
    for flag, path, always in FLAGS:
        value = _get(request, path)
        named = _with(named, path, value)
        if not always and value == _get(default, path):
            continue
        if isinstance(value, bool):
            args.append(flag if value else f"--no-{flag[2:]}")
        else:
            args += [flag, _flag_value(value)]
    if named != request:
        raise SystemExit(f"search_cost.py cannot name every setting of {request} as a `mixsparse plan` flag")
    return [*args, "--out", request.out]


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


def searched_as_now(request: PlanRequest) -> bool:
    """Whether the plan kept at ``request.out`` was searched as ``request`` searches today: the same command
    means another search once a default (generations, level grid, precision, fitness, probed seed) has
    changed."""
    from mixsparse.pruner.core.levels import LevelGrid
    from mixsparse.pruner.core.precision import resolve

    plan = Path(request.out)
    if not plan.exists():
        return False
    options, goal = request.search, request.research
    search = json.loads(plan.read_text()).get("search", {})
    levels = search.get("levels", {})
    step = options.level_step if levels.get("stored") else options.delta
    grid = LevelGrid.around(goal.target, step, options.level_window, goal.min_ratio, goal.max_ratio).to_json()
    return (
        search.get("settings") == json.loads(json.dumps(asdict(options.settings)))
        and search.get("precision") == resolve(options.precision, request.device)
        and search.get("fitness_seqlen") == options.fitness_seqlen
        and search.get("fitness", "loss") == options.fitness
        and ("probed_seed" in search) == options.probe_seed
        and {k: levels.get(k) for k in grid} == grid
    )


def timed(log: Path, request: PlanRequest) -> str:
    """The GNU time report of the `mixsparse plan` command for ``request``, from ``log`` if it timed exactly
    that command, searched with today's defaults."""
    args = plan_args(request)
    command = f"mixsparse plan {shlex.join(args)}"
    if (
        log.exists()
        and (earlier := timed_args(log.read_text()))
        and normalised(earlier) == normalised(args)
        and searched_as_now(request)
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
    for name, request in chosen.items():
        log = work / {"smollm2": "msp70-sgpt.log", "llama-1b": "llama1b.log"}[name]
        report = timed(log, request)
        info = json.loads(Path(request.out).read_text())
        search = info["search"]
        point = {
            "command": f"mixsparse plan {shlex.join(plan_args(request))}".replace(f"{RUNS.parent}/", ""),
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
