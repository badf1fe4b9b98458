"""What a training run leaves behind for people: the loss curve and the summary."""

from __future__ import annotations

import json
import os


def plot_loss(path: str, train_losses, val_losses, title: str) -> None:
    """A PNG of the training loss per optimizer step (raw and smoothed) and the
    validation loss at each evaluation."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    if train_losses:
        steps, losses = zip(*train_losses)
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8,
                label="training (per step)")
        smoothed, value = [], losses[0]
        for loss in losses:  # exponential moving average, as TensorBoard smooths
            value = 0.95 * value + 0.05 * loss
            smoothed.append(value)
        ax.plot(steps, smoothed, color="tab:blue", linewidth=1.8, label="training (smoothed)")
    if val_losses:
        steps, losses = zip(*val_losses)
        ax.plot(steps, losses, "o-", color="tab:orange", linewidth=1.8, label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_json(path: str, data: dict) -> None:
    """Writes atomically: readers never see half a file."""
    staging = f"{path}.tmp"
    with open(staging, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(staging, path)


def read_json(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)
