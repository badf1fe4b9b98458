"""How a plan is shown: a table for people, JSON for programs, a schedule picture."""

from __future__ import annotations

import dataclasses
import json

from tfpar.plan.cost import GIB
from tfpar.plan.search import Plan


def as_json(plan: Plan, top: int = 20) -> dict:
    best = plan.best
    recommended = None
    if best is not None:
        recommended = {**best.as_dict(), "schedule": plan.work.schedule,
                       "reasons": plan.reasons}
    return {"model": {**dataclasses.asdict(plan.work.model),
                      "parameters": plan.work.model.num_parameters},
            "workload": {k: v for k, v in dataclasses.asdict(plan.work).items() if k != "model"},
            "hardware": dataclasses.asdict(plan.hardware),
            "recommended": recommended,
            "reasons": plan.reasons,
            "candidates": [c.as_dict() for c in plan.candidates[:top]],
            "skipped": plan.skipped}


def table(plan: Plan, top: int = 12) -> str:
    w, hw = plan.work, plan.hardware
    lines = [f"GPT {w.model.layers} layers x {w.model.hidden} hidden x {w.model.heads} heads, "
             f"{w.model.num_parameters / 1e9:.2f}B parameters, context {w.model.seq_len}, "
             f"global batch {w.global_batch}, {w.precision}"
             f"{', full recomputation' if w.recompute else ''}",
             f"{hw.devices} devices ({hw.devices_per_node} per node, {hw.memory_gib:g} GiB, "
             f"{hw.peak_tflops:g} TFLOP/s peak at {hw.efficiency:.0%} efficiency, "
             f"{hw.intra_node_gbps:g} GB/s in a node, {hw.inter_node_gbps:g} GB/s between)", ""]
    header = (f"{'':2}{'data':>5} {'tensor':>6} {'pipe':>5} {'mbs':>4} {'M':>5} "
              f"{'state GiB':>9} {'act GiB':>8} {'total':>7} {'bubble':>7} {'comm GB':>8} "
              f"{'step s':>8} {'MFU':>6}  runs in tfpar")
    lines += [header, "-" * len(header)]
    shown = plan.candidates[:top]
    rejected = [c for c in plan.candidates if not c.fits]
    if rejected and all(c.fits for c in shown):
        shown = shown + rejected[:3]
    for c in shown:
        m, t, dims = c.memory, c.time, c.dims
        state = (m["weights"] + m["gradients"] + m["optimizer"]) / GIB
        mark = ">" if c is plan.best else ("x" if not c.fits else "")
        lines.append(
            f"{mark:2}{dims.dp:>5} {dims.tp:>6} {dims.pp:>5} {c.micro_batch:>4} "
            f"{c.microbatches:>5} {state:>9.1f} {m['activations'] / GIB:>8.1f} "
            f"{m['total'] / GIB:>7.1f} {t['bubble']:>7.1%} {t['comm_bytes'] / 1e9:>8.2f} "
            f"{t['step_s']:>8.3f} {t['mfu']:>6.1%}  "
            + ("does not fit" if not c.fits else (c.tfpar_flags or "-")))
    lines += ["", "> recommended; x does not fit in memory; state = weights + gradients + AdamW; "
              "M = micro-batches per replica;", "  - = tfpar cannot run it yet (tensor x "
              "pipeline, or a pipeline across hosts). Why this one:"]
    lines += [f"  - {r}" for r in plan.reasons]
    return "\n".join(lines)


def schedule_png(path: str, stages: int, microbatches: int, title: str = "") -> None:
    """GPipe and 1F1B timelines of one step, one row per stage (backward = 2 x forward)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tfpar.strategies.pipeline.schedules import BACKWARD, get

    shown = min(microbatches, 16)  # beyond 16 the boxes are too small to read
    fig, axes = plt.subplots(2, 1, figsize=(11, 1.2 + 0.9 * stages), dpi=100, sharex=True)
    colors = plt.get_cmap("tab20")
    for ax, name in zip(axes, ("gpipe", "1f1b")):
        schedule = get(name)
        result = schedule.simulate(stages, shown)
        for action, (start, end) in result["spans"].items():
            backward = action.kind == BACKWARD
            ax.barh(action.stage, end - start, left=start, height=0.8,
                    color=colors(action.microbatch % 20), alpha=0.55 if backward else 1.0,
                    edgecolor="black", linewidth=0.4, hatch="//" if backward else None)
            ax.text((start + end) / 2, action.stage, f"{action.kind}{action.microbatch}",
                    ha="center", va="center", fontsize=6)
        peak = schedule.peak_stash(stages, shown)
        ax.set_title(f"{name}: bubble {result['bubble_fraction']:.1%}, activations held "
                     f"per stage {peak}", fontsize=9)
        ax.set_yticks(range(stages), [f"stage {s}" for s in range(stages)])
        ax.invert_yaxis()
    axes[-1].set_xlabel("time (forward = 1, backward = 2)")
    suffix = f" (first {shown} of {microbatches} micro-batches)" if shown < microbatches else ""
    fig.suptitle((title or f"{stages} stages, {microbatches} micro-batches") + suffix, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def dumps(plan: Plan) -> str:
    return json.dumps(as_json(plan), indent=2, sort_keys=True)
