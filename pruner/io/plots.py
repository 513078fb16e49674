"""PNG pictures of sensitivities, plans and Pareto fronts (matplotlib, no display needed)."""

from __future__ import annotations

import os

from mixsparse.runtime.atomic import atomic_file


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: str | os.PathLike, overwrite: bool) -> None:
    plt = _pyplot()
    with atomic_file(path, overwrite=overwrite) as tmp:
        figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(figure)


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def plot_sensitivity(sensitivity, path: str | os.PathLike, overwrite: bool = False) -> None:
    """Per-weight Fisher trace per block, and per module kind (q_proj, down_proj...) across blocks."""
    plt = _pyplot()
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    blocks = list(sensitivity.blocks)
    x = range(len(blocks))
    top.bar(x, [sensitivity.block_per_weight(b) for b in blocks], color="tab:blue")
    top.set_yscale("log")
    top.set_ylabel("Tr(F) per weight (block)")
    top.set_title(f"Empirical Fisher trace, {sensitivity.info.get('samples', '?')} samples")
    kinds: dict[str, list[float]] = {}
    for block in blocks:
        for name in sensitivity.blocks[block]:
            kinds.setdefault(_short(name), []).append(sensitivity.per_weight(name))
    for kind, values in kinds.items():
        bottom.plot(range(len(values)), values, marker=".", label=kind)
    bottom.set_yscale("log")
    bottom.set_ylabel("Tr(F) per weight (module)")
    bottom.set_xlabel("decoder block")
    bottom.legend(ncol=4, fontsize=8)
    _save(figure, path, overwrite)


def plot_plan(plan, path: str | os.PathLike, overwrite: bool = False) -> None:
    """Sparsity per gene (block or module) with the Fisher trace per weight on a second axis."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(10, 4.5))
    if plan.info.get("deploy"):
        groups = plan.info["groups"]
        values = [1.0 if g["format"] == "2:4" else 0.0 for g in groups]
        traces = [g["fisher_per_weight"] for g in groups]
        axis.bar(range(len(values)), values, color=["tab:orange" if v else "tab:gray" for v in values])
        axis.set_ylabel("2:4 (1) or dense (0)")
        axis.set_xlabel("fused group (q/k/v, o, gate/up, down per block)")
        axis.set_title(f"Deployment plan: 2:4 on {plan.info['achieved_fraction']:.1%} of decoder linear weights")
    else:
        genes = plan.info["genes"]
        values = [g["ratio"] for g in genes.values()]
        traces = [g.get("fisher_per_weight") for g in genes.values()]
        axis.plot(range(len(values)), values, marker="o", color="tab:orange", label="sparsity")
        axis.axhline(plan.info["target"], color="tab:orange", linestyle=":", linewidth=1, label="target")
        axis.set_ylabel("sparsity")
        axis.set_xlabel(plan.info.get("granularity", "block"))
        axis.set_title(f"{plan.info['allocator']} plan, target {plan.info['target']:g} ({plan.info['metric']})")
        axis.legend(loc="upper left")
    if all(t is not None for t in traces):
        twin = axis.twinx()
        twin.plot(range(len(traces)), traces, color="tab:blue", alpha=0.6, label="Tr(F) per weight")
        twin.set_yscale("log")
        twin.set_ylabel("Fisher trace per weight", color="tab:blue")
    _save(figure, path, overwrite)


def plot_front(front: list[dict], path: str | os.PathLike, fitness: str, allocator: str, metric: str) -> None:
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    memory = [p["weight_memory"] for p in front]
    quality = [p["perplexity"] if p["perplexity"] is not None else p["fitness"] for p in front]
    axis.plot(memory, quality, marker="o")
    for point, x, y in zip(front, memory, quality):
        axis.annotate(
            f"{point['achieved_fraction']:.2f}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8
        )
    axis.set_xlabel("weight memory (fraction of dense)")
    axis.set_ylabel("held-out perplexity" if fitness == "loss" else "KL to dense")
    axis.set_title(f"Deployment front ({allocator}, {metric} 2:4 masks); labels: 2:4 fraction")
    axis.invert_xaxis()
    _save(figure, path, overwrite=True)
