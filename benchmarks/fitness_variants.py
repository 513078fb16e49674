"""MSP's search fitness, varied one cell at a time against the allocator table's msp-loss row (allocators.py),
which searched with the defaults of its day (next-token loss on 128-token validation sequences, 4 then 16 per
selection step, no probed seed):

    kl     --fitness kl: KL(dense || pruned) on the same sequences (EvoPress's fitness)
    s512   --fitness-seqlen 512 --steps 1,4: a quarter as many sequences, four times as long (same tokens),
           nearer the 2048-token context of the test windows

Each variant names every flag it differs in from today's CLI defaults, so a rerun searches what it shows.
Each cell is one `mixsparse plan --allocator msp` and one `mixsparse prune --plan` in their own processes, kept
under --work (the allocator table's, so its Fisher traces are shared); the table's uniform, Fisher and MSP
numbers of the same cell are shown beside it from results/allocators.json. Cells of earlier runs are kept.

    python benchmarks/fitness_variants.py --cells 0.7:wanda:kl,0.6:sparsegpt:s512
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from allocators import make_research_plan, pruned_perplexity
from common import RESULTS, command_line, machine, machine_line, markdown_table, mixsparse, save

VARIANTS = {
    "kl": ["--fitness", "kl", "--no-probe-seed"],
    "s512": ["--fitness", "loss", "--no-probe-seed", "--fitness-seqlen", "512", "--steps", "1,4"],
}
TABLE_ROW = "msp-loss"  # the allocator table's search these vary


def parse_cells(text: str) -> list[tuple[float, str, str]]:
    cells = []
    for item in text.split(","):
        target, base, variant = item.split(":")
        if variant not in VARIANTS:
            raise SystemExit(f"unknown variant {variant!r}; one of {', '.join(VARIANTS)}")
        cells.append((float(target), base, variant))
    return cells


def table_cell(target: float, base: str) -> dict:
    """The allocator table's perplexities of this (target, base): uniform, fisher, msp."""
    path = RESULTS / "allocators.json"
    cells = json.loads(path.read_text())["data"]["research"] if path.exists() else []
    found = {c["allocator"]: c[base]["perplexity"] for c in cells if c["target"] == target and base in c}
    return {name: found.get(key) for name, key in (("uniform", "uniform"), ("fisher", "fisher"), ("msp", TABLE_ROW))}


def measure(args, work: Path, target: float, base: str, variant: str) -> dict:
    plan = make_research_plan(args, work, work / "sensitivity.json", "msp", target, base, (variant, VARIANTS[variant]))
    info = json.loads(plan.read_text())
    search = info["search"]
    measured = pruned_perplexity(args, work, plan.stem.removeprefix("plan-"), plan, base)
    return {
        "target": target,
        "base": base,
        "variant": variant,
        "flags": VARIANTS[variant],
        "perplexity": measured["perplexity"],
        "dense": measured["dense"],
        "table": table_cell(target, base),
        "held_out_check": search.get("held_out_check"),
        "search_seconds": search.get("seconds"),
        "plan_seconds": info.get("seconds"),
        "command": command_line(),
        "machine": machine(),
    }


def markdown(cells: list[dict]) -> str:
    def ratio(value, reference):
        return f"{value / reference:.2f}x" if reference else "n/a"

    rows = []
    for c in sorted(cells, key=lambda c: (c["target"], c["base"], c["variant"])):
        table = c["table"]
        rows.append(
            [
                f"{c['target']:g}",
                c["base"],
                f"{c['variant']} (`{' '.join(c['flags'])}`)",
                f"{c['perplexity']:.2f}",
                ratio(c["perplexity"], table["uniform"]),
                f"{table['msp']:.2f} ({ratio(table['msp'], table['uniform'])})" if table["msp"] else "n/a",
                f"{table['fisher']:.2f}" if table["fisher"] else "n/a",
                c["held_out_check"]["chosen"] if c["held_out_check"] else "n/a",
                f"{c['search_seconds']:.0f}",
            ]
        )
    header = ["target", "base", "fitness variant", "MSP", "vs uniform", "table msp-loss", "table Fisher"]
    lines = [
        "The allocator table's search with one setting changed; test perplexity on the first "
        f"{cells[0]['windows']} windows of 2048 tokens. One search each (search seed 0): another calibration seed "
        "alone moves a uniform 50% prune by up to 1.9% (the seed-spread table), so differences of that size are "
        "not told apart here.\n",
        markdown_table(header + ["held-out choice", "search (s)"], rows),
        "",
        "Cells measured by:",
        *sorted({f"- `{c['command']}` on {machine_line(c['machine'])}" for c in cells}),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", required=True, help="comma-separated target:base:variant, e.g. 0.7:wanda:kl")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--windows", default="10", help="test windows of 2048 tokens (the table's: 10)")
    parser.add_argument("--work", default="runs/bench-allocators", help="the allocator table's work directory")
    args = parser.parse_args()
    args.generations, args.msp_granularity = None, "module"  # the allocator table's search
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "sensitivity.json").exists():
        mixsparse("sensitivity", args.model, "--samples", "32", "--out", str(work / "sensitivity.json"))
    path = RESULTS / "fitness-variants.json"
    kept = json.loads(path.read_text())["data"]["cells"] if path.exists() else []
    measured = [measure(args, work, *cell) | {"windows": args.windows} for cell in parse_cells(args.cells)]
    keys = {(c["target"], c["base"], c["variant"]) for c in measured}
    cells = [c for c in kept if (c["target"], c["base"], c["variant"]) not in keys] + measured
    text = markdown(cells)
    print(text)
    save("fitness-variants", "MSP search fitness variants (one cell each)", text, {"cells": cells}, order=22)


if __name__ == "__main__":
    main()
