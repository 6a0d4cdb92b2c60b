"""Loss and metric curves of a run, drawn from its metrics.jsonl at the end of every run."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def draw_curves(records: list[dict[str, Any]], path: Path) -> Path:
    """One PNG: training and evaluation loss, then one panel per evaluation metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    metrics = sorted({k for r in evals for k in r} - {"split", "step", "epoch", "loss"})
    fig, axes = plt.subplots(1, 1 + len(metrics), figsize=(5 * (1 + len(metrics)), 3.6), squeeze=False)
    loss_ax = axes[0][0]
    loss_ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train", lw=1)
    if evals:
        loss_ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="eval")
    loss_ax.set(title="loss", xlabel="step")
    loss_ax.legend()
    for ax, name in zip(axes[0][1:], metrics, strict=True):
        points = [(r["step"], r[name]) for r in evals if name in r]
        ax.plot([s for s, _ in points], [v for _, v in points], "o-")
        ax.set(title=f"eval {name}", xlabel="step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
