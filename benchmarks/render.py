"""Assemble BENCHMARKS.md from benchmarks/results/*.json (each written by one benchmark script).

Most results render as they were saved: a heading, the machine, the command and the script's markdown. A few
are reshaped here so the page stays easy to walk (the numbers are the saved ones, never recomputed):

- a contents list of every section follows the introduction;
- the soak runs (results/soak*.json) share one section: one table of the runs, one table of their RSS;
- a list of separately measured runs (the allocator table's) becomes a note under the table: the common
  command once, then what each run adds;
- the GPU GEMM table is summarised per shape (best graphed speedup per token count); the whole table is
  written to results/gemm-<section>-table.md beside the script's CSV, and linked.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from common import RESULTS, machine_line

ROOT = Path(__file__).resolve().parent.parent
INTRO = """# mixsparse benchmarks

Every table below was produced by the command shown above it, on the machine named there (where a table gathers
several runs, a note under it gives each run's command); rerun the command to refresh it, then
`python benchmarks/render.py` (or `make bench` for all of them). Timings on shared machines are noisy: compare
numbers within one table (same run), not across tables. CPU and GPU figures are kept apart.
"""


# --- headings and the contents list ------------------------------------------------------------------------


def slug(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped (hyphens and underscores kept), each
    space a hyphen."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def contents(sections: list[tuple[str, list[str]]]) -> str:
    seen: dict[str, int] = {}

    def link(heading: str) -> str:
        anchor = slug(heading)
        count = seen.get(anchor, 0)
        seen[anchor] = count + 1
        return f"[{heading}](#{anchor}{f'-{count}' if count else ''})"

    link("mixsparse benchmarks")
    link("Contents")
    lines = ["## Contents\n"]
    for heading, titles in sections:
        lines.append(f"- {link(heading)}")
        lines += [f"  - {link(title)}" for title in titles]
    return "\n".join(lines) + "\n"


def section_text(title: str, result: dict, body: str) -> str:
    return (
        f"### {title}\n\n"
        f"Machine: {machine_line(result['machine'])}. Date: {result['date']}.\n\n"
        f"```\n{result['command']}\n```\n\n{body}\n"
    )


# --- markdown helpers --------------------------------------------------------------------------------------


def table_spans(markdown: str) -> list[tuple[int, int]]:
    """(first, end) line indices of each markdown table in ``markdown``."""
    lines, spans, start = markdown.split("\n"), [], None
    for i, line in enumerate([*markdown.split("\n"), ""]):
        if line.startswith("|") and start is None:
            start = i
        elif not line.startswith("|") and start is not None:
            if i - start >= 2 and set(lines[start + 1].replace("|", "")) <= set("-: "):
                spans.append((start, i))
            start = None
    return spans


def table_rows(markdown: str) -> tuple[str, list[str]]:
    """The header and the body lines of the first markdown table in ``markdown``."""
    first, end = table_spans(markdown)[0]
    lines = markdown.split("\n")
    return lines[first], lines[first + 2 : end]


def parse_command(command: str) -> tuple[str, list[tuple[str, str | None]]]:
    """The program (everything before the first flag) and the (flag, value) pairs of a command line."""
    words = shlex.split(command)
    first = next((i for i, w in enumerate(words) if w.startswith("--")), len(words))
    pairs, i = [], first
    while i < len(words):
        value = words[i + 1] if i + 1 < len(words) and not words[i + 1].startswith("--") else None
        pairs.append((words[i], value))
        i += 2 if value is not None else 1
    return " ".join(words[:first]), pairs


def flags(pairs) -> str:
    return " ".join(shlex.quote(f) if v is None else f"{f} {shlex.quote(v)}" for f, v in pairs)


# --- a list of separately measured runs, folded into a note under the table --------------------------------

RUNS_BLOCK = re.compile(r"Measured in separate runs \(same protocol\):\n\n((?:- .*\n)+)\n")
RUN_LINE = re.compile(r"^- (?P<cells>.*?): `(?P<command>.*)` on (?P<machine>.*)$")


def fold_runs(markdown: str, result: dict) -> str:
    """Replace the 'Measured in separate runs' list above a table by a compact note below it: the command every
    run shares (its varying flags as placeholders), then per group of runs what they add and their values."""
    block = RUNS_BLOCK.search(markdown)
    if not block:
        return markdown
    runs = [RUN_LINE.match(line) for line in block.group(1).splitlines()]
    if not all(runs):
        return markdown
    parsed = [parse_command(run["command"]) for run in runs]
    if len({program for program, _ in parsed}) != 1:
        return markdown
    program = parsed[0][0]
    common = [pair for pair in parsed[0][1] if all(pair in pairs for _, pairs in parsed)]
    varying = [
        f for f, _ in parsed[0][1] if (f, _) not in common and all(f in dict(pairs) for _, pairs in parsed)
    ]  # flags every run sets, to different values: the per-run placeholders
    machines = {run["machine"] for run in runs}
    groups: dict[str, list[str]] = {}
    for run, (_, pairs) in zip(runs, parsed):
        extra = [pair for pair in pairs if pair not in common and pair[0] not in varying]
        values = dict(pairs)
        item = " ".join(values[f] for f in varying)
        product = {
            f"{float(t):g} {b}"
            for t in values.get("--targets", "").split(",")
            for b in values.get("--bases", "").split(",")
        }
        kept = {
            f"{cell.split(' ', 1)[0]} {base}"
            for cell in run["cells"].split("; ")
            for base in cell.split(" ", 1)[1].split(", ")
        }
        if kept != product:
            item += f" (kept: {run['cells']})"
        if len(machines) > 1:
            item += f" on {run['machine']}"
        groups.setdefault(f"`{flags(extra)}`" if extra else "no other flag", []).append(item)
    template = f"{program} {flags(common)} " + " ".join(f"{f} <{f.lstrip('-')}>" for f in varying)
    shown = (
        " (the command above the table is one of them)"
        if any(run["command"] == result["command"] for run in runs)
        else ""
    )
    note = (
        f"Runs: {len(runs)}, same protocol{shown}, "
        + (f"all on {machines.pop()}" if len(machines) == 1 else "machines as named")
        + f". Each is `{template.strip()}`; below, each run as its `"
        + " ".join(f"<{f.lstrip('-')}>" for f in varying)
        + "`, by the flags it adds:\n\n"
        + "\n".join(f"* {extra}: {'; '.join(items)}" for extra, items in groups.items())
        + "\n"
    )
    markdown = markdown[: block.start()] + markdown[block.end() :]
    spans = table_spans(markdown)
    if not spans:
        return markdown + "\n" + note
    lines = markdown.split("\n")
    end = spans[0][1]
    return "\n".join(lines[:end] + ["", note.rstrip("\n")] + lines[end:])


def fold_cells_measured_by(markdown: str, result: dict) -> str:
    """'Cells measured by:' naming only this result's own command and machine becomes one line."""
    own = f"Cells measured by:\n- `{result['command']}` on {machine_line(result['machine'])}\n"
    return markdown.replace(own, "All cells: the command above, on the machine above.\n")


# --- soak runs: one section ---------------------------------------------------------------------------------


def soak_section(results: list[dict]) -> tuple[str, str]:
    """One section for every soak run: their commands, a table of the runs, a table of their RSS."""
    data = [r["data"] for r in results]
    streams = {d["streams"] for d in data}
    common = {
        key: data[0][key]
        for key in ("streams", "max_tokens", "cancel_every", "interval_s")
        if len({d.get(key) for d in data}) == 1
    }
    title = "Soak: " + (f"{streams.pop()} streams, " if len(streams) == 1 else "") + "RSS per server process"
    title += f" ({len(results)} runs)"
    machines = {machine_line(r["machine"]) for r in results}
    dates = {r["date"] for r in results}
    head = [f"### {title}\n"]
    per_run_machine = len(machines) > 1  # then a column of the runs table names each run's machine and date
    if not per_run_machine:
        head.append(
            f"Machine (every run): {machines.pop()}. Date: "
            + (dates.pop() if len(dates) == 1 else ", ".join(sorted(dates)))
            + ".\n"
        )
    head.append("```\n" + "\n".join(r["command"] for r in results) + "\n```\n")
    head.append(
        "Each run: `mixsparse serve MODEL` (loopback), "
        + (f"{common['streams']} " if "streams" in common else "the run's number of ")
        + "streaming chat requests kept in flight for the measured time after the warm-up, under the same load; "
        "prompts of 8-200 words, max_tokens up to "
        + (f"{common['max_tokens']}" if "max_tokens" in common else "the run's")
        + " (EOS ignored), every "
        + (f"{common['cancel_every']}th" if "cancel_every" in common else "n-th")
        + " request dropped mid-stream. RSS sampled every "
        + (f"{common['interval_s']:g} s" if "interval_s" in common else "few seconds (per run)")
        + "; growth is the least-squares slope over the measured window. Runs in the order of the commands above "
        "(`run` is each command's `--name`):\n"
    )
    header = ["run", "varies", "model served", "server environment", "warm-up", "measured"]
    header += [k for k in ("streams", "max_tokens", "cancel_every", "interval_s") if k not in common]
    header += ["machine, date"] if per_run_machine else []
    header += ["requests completed / cancelled / failed", "streamed tokens/s", "server alive at the end", "plot"]
    rows = []
    for result, d in zip(results, data):
        rows.append(
            [
                f"`{result['name']}`",
                d.get("label") or "(reference run)",
                Path(d["model"]).name,
                " ".join(f"`{e}`" for e in d["env"]) or "as `serve` sets it",
                f"{d['warmup_s']:.0f} s",
                f"{d['measured_s'] / 60:.1f} min",
                *[str(d[k]) for k in ("streams", "max_tokens", "cancel_every", "interval_s") if k not in common],
                *([f"{machine_line(result['machine'])}, {result['date']}"] if per_run_machine else []),
                f"**{d['counts']['completed']} / {d['counts']['cancelled']} / {d['counts']['failed']}**",
                f"{d['streamed_tokens'] / d['measured_s']:.0f}",
                str(d["alive"]),
                f"[{result['name']}.png](benchmarks/results/{result['name']}.png)",
            ]
        )
    table = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    table += ["| " + " | ".join(row) + " |" for row in rows]
    rss_header, _ = table_rows(results[0]["markdown"])
    rss = ["| run " + rss_header, "|---" + "|---" * (rss_header.count("|") - 1) + "|"]
    errors = []
    for result in results:
        header_line, body = table_rows(result["markdown"])
        if header_line != rss_header:
            raise SystemExit(f"{result['name']}: its RSS table's columns differ from {results[0]['name']}'s")
        rss += [f"| `{result['name']}` {line}" for line in body]
        found = re.search(r"\nFirst errors: (.*)\n", result["markdown"])
        if found:
            errors.append(f"- `{result['name']}`: {found.group(1)}")
    body = "\n".join(table) + "\n\nRSS per server process, per run:\n\n" + "\n".join(rss) + "\n\n"
    if errors:
        body += "\nFirst errors:\n\n" + "\n".join(errors) + "\n"
    return title, "\n".join(head) + "\n" + body


# --- the GPU GEMM table: a per-shape summary here, the whole table beside its CSV ----------------------------


def gemm_summary(rows: list[dict]) -> str:
    """Per shape and token count M, the best CUDA-graphed 2:4/dense speedup over the backends measured (and
    which), plus each shape's best eager speedup."""
    tokens = sorted({r["tokens"] for r in rows})
    shapes: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        shapes.setdefault((r["model"], f"{r['gemm']} ({r['out']}x{r['in']})"), []).append(r)

    def tag(backend: str) -> str:
        found = re.search(r"searched alg (\d+)", backend)
        return f"searched {found.group(1)}" if found else ""

    def fmt(value: float, backend: str, *more: str) -> str:
        text = f"{value:.2f}"
        notes = ", ".join(n for n in (tag(backend), *more) if n)
        return (f"**{text}**" if value >= 1.0 else text) + (f" ({notes})" if notes else "")

    header = ["model", "GEMM (out x in)", *[f"M={m}" for m in tokens], "best eager (M)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (model, gemm), points in shapes.items():
        cells = []
        for m in tokens:
            graphed = [p for p in points if p["tokens"] == m and isinstance(p.get("graph_speedup"), (int, float))]
            best = max(graphed, key=lambda p: p["graph_speedup"], default=None)
            cells.append(fmt(best["graph_speedup"], best["backend"]) if best else "-")
        eager = max(points, key=lambda p: p["speedup"])
        cells.append(fmt(eager["speedup"], eager["backend"], f"M={eager['tokens']}"))
        lines.append("| " + " | ".join([model, gemm, *cells]) + " |")
    return "\n".join(lines)


def gemm_section(result: dict, full_name: str) -> str:
    """The GEMM markdown with its full table replaced by the per-shape summary and links to the full table."""
    rows, markdown = result["data"]["rows"], result["markdown"]
    spans = table_spans(markdown)
    if not spans:
        return markdown
    first, end = spans[0]
    lines = markdown.split("\n")
    csv = f"benchmarks/results/{result['name']}.csv"
    summary = [
        f"Summary, one row per shape: CUDA-graphed speedup (2:4 over dense time) at each M, the best of the "
        f"backends measured at that point (no note: the prepared op with alg_id 0, as served; `searched N`: "
        f"cuSPARSELt called directly with the searched algorithm N); the last column is the shape's best eager "
        f"speedup and its M. Bold: 1.00 or more (not slower than dense). "
        f"The whole table ({len(rows)} rows: eager and graphed times, host cost per call, error, weight bytes) is "
        f"[{full_name}](benchmarks/results/{full_name}); its data, unrounded: [{result['name']}.csv]({csv}).",
        "",
        gemm_summary(rows),
    ]
    text = "\n".join(lines[:first] + summary + lines[end:])
    return text.replace(
        "**What the table says** (computed from its rows)",
        "**What the table says** (computed from the whole table's rows)",
    )


def write_full_table(result: dict, name: str) -> None:
    """results/<name>: the section as the benchmark script wrote it, whole table included."""
    text = (
        f"# {result['title']}: the whole table\n\n"
        f"Summarised in [BENCHMARKS.md](../../BENCHMARKS.md#{slug(result['title'])}); written by "
        f"`benchmarks/render.py` from `{result['name']}.json`.\n\n"
        f"Machine: {machine_line(result['machine'])}. Date: {result['date']}.\n\n"
        f"```\n{result['command']}\n```\n\n" + result["markdown"].replace("](benchmarks/results/", "](") + "\n"
    )
    (RESULTS / name).write_text(text)


# --- the page ------------------------------------------------------------------------------------------------


def blocks(chosen: list[dict], write: bool) -> list[tuple[str, str]]:
    """(title, text) of each section, in order; the soak runs merged into one at the first one's place."""
    soaks = [r for r in chosen if r["name"] == "soak" or r["name"].startswith("soak-")]
    out, soak_done = [], False
    for result in chosen:
        if result in soaks and len(soaks) > 1:
            if not soak_done:
                out.append(soak_section(soaks))
                soak_done = True
            continue
        markdown = fold_cells_measured_by(fold_runs(result["markdown"], result), result)
        rows = result.get("data", {}).get("rows") if isinstance(result.get("data"), dict) else None
        if result["name"].startswith("gemm-") and rows and "graph_speedup" in rows[0]:
            full_name = f"{result['name']}-table.md"
            if write:
                write_full_table(result, full_name)
            markdown = gemm_section(result, full_name)
        out.append((result["title"], section_text(result["title"], result, markdown)))
    return out


def render(write: bool = False) -> str:
    results = [json.loads(p.read_text()) for p in sorted(RESULTS.glob("*.json"))]
    sections, parts = [], []
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
        made = blocks(chosen, write)
        sections.append((heading, [title for title, _ in made]))
        parts += [text for _, text in made]
    return "\n".join([INTRO, contents(sections), *parts])


if __name__ == "__main__":
    (ROOT / "BENCHMARKS.md").write_text(render(write=True))
    print(f"wrote {ROOT / 'BENCHMARKS.md'}")
