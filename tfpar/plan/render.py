"""How a plan is shown: a table for people, JSON for programs, a schedule picture."""

from __future__ import annotations

import dataclasses
import json

from tfpar.plan import handoff
from tfpar.plan.cost import GIB
from tfpar.plan.search import Plan


def as_json(plan: Plan, top: int = 20) -> dict:
    best = plan.best
    recommended = None
    if best is not None:
        recommended = {**best.as_dict(), "schedule": plan.work.schedule,
                       "schedules": schedules_compared(best.dims.pp, best.microbatches),
                       "reasons": plan.reasons,
                       "train_flags": handoff.train_flags(best, plan.work)}
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
             f"{'' if w.recompute == 'none' else f', {w.recompute} recomputation'}",
             f"{hw.devices} devices ({hw.devices_per_node} per node, {hw.memory_gib:g} GiB at "
             f"{hw.memory_gbps:g} GB/s, {hw.peak_tflops:g} TFLOP/s peak, matmuls at "
             f"{hw.efficiency:.0%} of it, {hw.intra_node_gbps:g} GB/s in a node, "
             f"{hw.inter_node_gbps:g} GB/s between)", ""]
    header = (f"{'':2}{'data':>5} {'zero':>4} {'tensor':>6} {'pipe':>5} {'mbs':>4} {'M':>5} "
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
        zero = str(dims.zero_stage) if dims.fsdp_enabled else "-"
        lines.append(
            f"{mark:2}{dims.batch_shards:>5} {zero:>4} {dims.tp:>6} {dims.pp:>5} {c.micro_batch:>4} "
            f"{c.microbatches:>5} {state:>9.1f} {m['activations'] / GIB:>8.1f} "
            f"{m['total'] / GIB:>7.1f} {t['bubble']:>7.1%} {t['comm_bytes'] / 1e9:>8.2f} "
            f"{t['step_s']:>8.3f} {t['mfu']:>6.1%}  "
            + ("does not fit" if not c.fits else (c.tfpar_flags or "-")))
    lines += ["", "> recommended; x does not fit in memory; zero = the data devices shard "
              "(ZeRO stage: 1 optimizer state,", "  2 + gradients, 3 + weights) or - replicate; "
              "state = weights + gradients + AdamW; M = micro-batches per replica;", "  - = tfpar "
              "cannot run it yet (tensor-parallel or sharded pipeline stages across hosts). "
              "Why this one:"]
    lines += [f"  - {r}" for r in plan.reasons]
    if plan.best is not None and plan.best.dims.pp > 1:
        best = plan.best
        lines += ["", f"Schedules for pipeline={best.dims.pp}, M={best.microbatches} "
                      f"(--schedule={w.schedule} above; ideal bubble, peak activations held "
                      "per device in micro-batches):"]
        for row in schedules_compared(best.dims.pp, best.microbatches):
            if "refused" in row:
                lines.append(f"  {row['schedule']:<17} {row['refused']}")
            else:
                lines.append(f"  {row['schedule']:<17} bubble {row['bubble']:>6.1%}   "
                             f"stash {row['peak_stash']:g}")
    return "\n".join(lines)


def schedules_compared(stages: int, microbatches: int) -> list[dict]:
    """Every registered schedule at K stages and M micro-batches, least bubble first:
    {schedule, virtual_stages, bubble, peak_stash (micro-batches of a device's layers)}."""
    from tfpar.strategies.pipeline.schedules import SCHEDULES, get

    rows = []
    for name in SCHEDULES:
        schedule = get(name)
        reason = schedule.check(stages, microbatches)
        if reason:
            rows.append({"schedule": name, "refused": reason})
            continue
        v = schedule.virtual_stages
        rows.append({"schedule": name, "virtual_stages": v,
                     "bubble": round(schedule.bubble_fraction(stages, microbatches), 4),
                     "peak_stash": round(max(schedule.peak_stash(stages, microbatches)) / v, 2)})
    return sorted(rows, key=lambda r: (r.get("bubble", 2.0), r.get("peak_stash", 0)))


def schedule_png(path: str, stages: int, microbatches: int, title: str = "") -> None:
    """Every registered schedule's ideal timeline of one step, one row per device.

    Equal costs per device: forward = input gradient = weight gradient = 1
    (a full backward 2); a stage of V per device costs 1/V. Interleaving
    needs M % K == 0: it is drawn with M rounded up to a multiple of K.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tfpar.strategies.pipeline.schedules import SCHEDULES, get

    shown = min(microbatches, 16)  # beyond 16 the boxes are too small to read
    fig, axes = plt.subplots(len(SCHEDULES), 1, figsize=(12, 0.6 + len(SCHEDULES) * (0.5 + 0.4 * stages)),
                             dpi=100, sharex=True)
    for ax, name in zip(axes, SCHEDULES):
        schedule = get(name)
        m = shown if schedule.check(stages, shown) is None else -(-shown // stages) * stages
        draw_schedule(ax, schedule, stages, m, schedule.simulate(
            stages, m, *[1.0 / schedule.virtual_stages] * 3)["spans"],
            note="" if m == shown else f" (M={m})")
    axes[-1].set_xlabel("time (per device: forward = input gradient = weight gradient = 1)")
    suffix = f" (first {shown} of {microbatches} micro-batches)" if shown < microbatches else ""
    fig.suptitle((title or f"{stages} stages, {microbatches} micro-batches") + suffix, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


MESH_PNG_MAX_DEVICES = 128


def mesh_png(path: str, dims, devices_per_node: int, title: str = "") -> None:
    """Which device holds which pipeline stage, data replica and tensor shard.

    One row per node, one box per device, coloured by pipeline stage and
    labelled with its coordinates (`ParallelDims.coordinates`: the order
    tfpar places devices in). Up to 128 devices are drawn; a larger job is
    drawn as its first pipeline replica (data replica 0, sharded group 0),
    which shows every stage and shard.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    shown = list(range(dims.world_size))
    note = ""
    if len(shown) > MESH_PNG_MAX_DEVICES:
        shown = [i for i in shown if dims.coordinates(i)["dp"] == 0
                 and dims.coordinates(i)["fsdp"] == 0]
        note = f" (data replica 0 of {dims.dp}" + (f", group 0 of {dims.fsdp}" if dims.fsdp > 1
                                                     else "") + ")"
        if len(shown) > MESH_PNG_MAX_DEVICES:
            raise ValueError(f"--mesh_png draws up to {MESH_PNG_MAX_DEVICES} devices; one "
                             f"pipeline replica of {dims} has {len(shown)}. Plan a smaller "
                             "layout to draw it.")
    nodes = sorted({i // devices_per_node for i in shown})
    width = min(devices_per_node, dims.world_size)
    fig, ax = plt.subplots(figsize=(1.0 + 1.25 * width, 0.6 + 0.95 * len(nodes)), dpi=100)
    colors = plt.get_cmap("tab20" if dims.pp > 10 else "tab10")
    for row, node in enumerate(nodes):
        y = len(nodes) - 1 - row
        ax.text(-0.15, y + 0.45, f"node {node}", ha="right", va="center", fontsize=8)
        for i in (i for i in shown if i // devices_per_node == node):
            c = dims.coordinates(i)
            x = i % devices_per_node
            ax.add_patch(Rectangle((x, y), 0.92, 0.9, facecolor=colors(c["pp"] % colors.N),
                                   alpha=0.35 + 0.5 * (c["dp"] % 2), edgecolor="black"))
            lines = [f"device {i}", f"stage {c['pp']}", f"replica {c['dp']}"]
            if dims.fsdp > 1:
                lines.append(f"shard group {c['fsdp']}")
            lines.append(f"tensor {c['tp']}/{dims.tp}")
            ax.text(x + 0.46, y + 0.45, "\n".join(lines), ha="center", va="center", fontsize=7)
    ax.set_xlim(-1.1, width)
    ax.set_ylim(0, len(nodes))
    ax.axis("off")
    degrees = " x ".join(f"{name} {getattr(dims, k)}" for k, name in
                         (("pp", "pipeline"), ("dp", "data"), ("fsdp", "sharded data"),
                          ("tp", "tensor")) if getattr(dims, k) > 1) or "one device"
    fig.suptitle((title or degrees) + note + f"; {devices_per_node} devices per node",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def draw_schedule(ax, schedule, stages, microbatches, spans, note="", unit=1.0):
    """Draws `spans` ({Action: (start, end)}, e.g. `simulate()["spans"]` or measured ones)
    on `ax`: a row per device, colour per micro-batch; B hatched, W dotted."""
    import matplotlib.pyplot as plt

    from tfpar.strategies.pipeline.schedules import BACKWARD, WEIGHT

    colors = plt.get_cmap("tab20")
    busy = {}
    for action, (start, end) in spans.items():
        device = schedule.device_of(action.stage, stages)
        busy[device] = busy.get(device, 0.0) + end - start
        hatch = {BACKWARD: "//", WEIGHT: ".."}.get(action.kind)
        ax.barh(device, (end - start) / unit, left=start / unit, height=0.8,
                color=colors(action.microbatch % 20), alpha=1.0 if hatch is None else 0.55,
                edgecolor="black", linewidth=0.4, hatch=hatch)
        if (end - start) / unit >= 0.3:
            ax.text((start + end) / 2 / unit, device, f"{action.kind}{action.microbatch}",
                    ha="center", va="center", fontsize=5)
    step = max(e for _, e in spans.values()) - min(s for s, _ in spans.values())
    bubble = 1.0 - sum(busy.values()) / (stages * step)
    peak = [n / schedule.virtual_stages for n in schedule.peak_stash(stages, microbatches)]
    ax.set_title(f"{schedule.name}{note}: bubble {bubble:.1%}, activations held per device "
                 f"(micro-batches) {[round(p, 2) for p in peak]}", fontsize=8)
    ax.set_yticks(range(stages), [f"device {d}" for d in range(stages)])
    ax.set_ylim(stages - 0.5, -0.5)


def dumps(plan: Plan) -> str:
    return json.dumps(as_json(plan), indent=2, sort_keys=True)
