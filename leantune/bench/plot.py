"""Chart of a speed report: tokens/s and peak memory per mode, and the loss curves."""

from __future__ import annotations

from pathlib import Path

from .speed_table import row_labels


def draw(report: dict, path: Path) -> str:
    """Write ``path`` (PNG) from a ``leantune.bench.speed`` report; say what was done."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"matplotlib is not installed: no chart; draw it later with --plot on the JSON ({path.stem})"
    rows = [r for r in report["results"] if "tok_s" in r and "error" not in r]
    names = row_labels(rows)
    colors = ["tab:green" if r["mode"].startswith("lt") else "tab:blue" if r["mode"].startswith("peft")
              else "tab:gray" for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(18, 0.45 * len(rows) + 2.5))
    for ax, key, title in ((axes[0], "tok_s", "tokens / s"), (axes[1], "peak_gib", "peak GiB")):
        values = [r[key] or 0 for r in rows]
        ax.barh(range(len(rows)), values, color=colors)
        ax.set_yticks(range(len(rows)), names)
        ax.invert_yaxis()
        ax.set_title(title)
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:,}", va="center", fontsize=8)
    axes[0].xaxis.set_major_formatter(lambda v, _: f"{v / 1000:.0f}k")
    axes[1].set_yticklabels([])
    curves = [(r["losses"], name) for r, name in zip(rows, names, strict=True)
              if r["losses"] and r["mode"].startswith(("lt", "peft"))]
    for losses, name in curves:
        axes[2].plot(losses, label=name, lw=1)
    axes[2].set_title("training loss, same batches and initial weights")
    axes[2].set_xlabel("step")
    if curves:
        axes[2].legend(fontsize=7)
    fig.suptitle(f"LoRA r=16 on a {report['size']} Llama, {report['device']}, torch {report['torch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"wrote {path}"
