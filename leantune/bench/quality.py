"""``leantune bench quality``: every method on MiniLM + SST-2 under one protocol.

Same model, data, step budget, batch and schedule for every method; the
learning rate is picked per method from a small grid on a dev subset and the
chosen run is reported on the GLUE dev sentences (``test.tsv``). Results stream
to ``results.jsonl`` (a cut-short run keeps what it finished), then a table
(``results.md``) and a plot of accuracy against trainable parameters.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

import leantune as lt

from ..data import Split, sst2
from ..demo import MINILM_TARGETS, load_minilm, peak_memory_mb, write_json_atomically
from ..train import seqcls

# Prompt-style methods train a few vectors from scratch and want larger steps.
PROMPT_METHODS = {"prompt_tuning", "p_tuning_v2", "residual_prompt", "lopt"}
LOW_LRS = (5e-4, 3e-3)
HIGH_LRS = (3e-3, 3e-2)
# Prefix tuning trains a wide MLP whose every step moves all prefixes at once: at 3e-3 and
# above it swamps attention (majority-class accuracy), so its grid sits lower. DePT sets its
# prompt's and low-rank update's rates itself (its paper's); the grid is the head's rate.
METHOD_LRS = {"prefix_tuning": (1e-4, 5e-4), "dept": LOW_LRS}
# The same LoRA setting as the SST-2 parity test, so the tables agree.
PRESETS = {"lora": {"r": 8, "alpha": 16, "targets": MINILM_TARGETS}}
PRESETS["ist"] = {"wraps": {"method": "lora", **PRESETS["lora"]}}  # IST over that same LoRA
# The rank budget as AdaLoRA's paper runs it: budgeting after a warm-up, a final phase at the target
# rank (here 10 % and 20 % of the 150 steps), re-allocating every 10 steps.
BUDGET = {"tinit": 15, "tfinal": 30, "delta_t": 10}
PRESETS.update(adalora=BUDGET, increlora=BUDGET)
# DePT's prompt rate: its paper's 0.3 (for T5) barely moves MiniLM in 150 steps (dev 0.62 on CPU);
# 0.1 was the better of {0.3, 0.1} on the dev sentences.
PRESETS["dept"] = {"prompt_lr": 0.1}


@dataclass
class Row:
    """One method's chosen run."""

    method: str
    lr: float
    dev_accuracy: float
    test_accuracy: float
    test_macro_f1: float
    trainable: int
    total: int
    seconds_per_step: float
    peak_memory_mb: float
    grid: dict[str, float]
    device: str = "NVIDIA H100 80GB HBM3"


def learning_rates(method: str, override: Sequence[float] | None) -> Sequence[float]:
    return override or METHOD_LRS.get(method) or (HIGH_LRS if method in PROMPT_METHODS else LOW_LRS)


def subset(split: Split, n: int | None, seed: int) -> Split:
    """A seeded random subset (all of it when ``n`` is None or larger)."""
    if n is None or n >= len(split):
        return split
    idx = random.Random(seed).sample(range(len(split)), n)
    return Split([split.texts[i] for i in idx], [split.labels[i] for i in idx])


def calibration(tokenizer, data: Split, config: seqcls.TrainConfig) -> list[dict[str, torch.Tensor]]:
    ids = seqcls.encode(tokenizer, data.texts[: 2 * config.batch_size], config.max_length)
    half = config.batch_size
    return [seqcls.collate(ids[s : s + half], tokenizer.pad_token_id) for s in range(0, len(ids), half)]


def run_one(method: str, lr: float, data: dict[str, Split], config: seqcls.TrainConfig, device: torch.device):
    """Train ``method`` at ``lr``; return (dev metrics, test metrics, counts, s/step, peak MB)."""
    model, tokenizer = load_minilm(2, config.seed)
    model.to(device)
    cfg = lt.get_method(method)(task="seq-cls", **PRESETS.get(method, {}))
    lt.adapt(model, cfg, calibration=[{k: v.to(device) for k, v in b.items()}
                                      for b in calibration(tokenizer, data["train"], config)])
    trainable, total = lt.trainable_parameters(model)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    seqcls.train(model, tokenizer, data["train"], replace(config, lr=lr))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - start) / (config.steps or 1)
    peak = peak_memory_mb(device)
    dev = seqcls.evaluate(model, tokenizer, data["dev"], max_length=config.max_length)
    test = seqcls.evaluate(model, tokenizer, data["test"], max_length=config.max_length)
    return dev, test, (trainable, total), seconds, peak


def device_name(device: torch.device) -> str:
    """What the speed and memory columns were measured on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


def bench(methods: Sequence[str], out: Path, steps: int, lrs: Sequence[float] | None, dev_size: int | None,
          test_size: int | None, seed: int, data_dir: Path | None = None) -> list[Row]:
    """Run every method in ``methods``; append each chosen run to ``out/results.jsonl``."""
    for m in methods:
        lt.get_method(m)  # unknown names fail before any training
    out.mkdir(parents=True, exist_ok=True)
    raw = sst2.load(data_dir)
    data = {"train": raw["train"], "dev": subset(raw["dev"], dev_size, seed), "test": subset(raw["test"], test_size, seed)}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = seqcls.TrainConfig(batch_size=32, max_length=64, steps=steps, warmup_ratio=0.1, seed=seed, progress=False)
    rows = []
    for method in methods:
        try:
            runs = {lr: run_one(method, lr, data, config, device) for lr in learning_rates(method, lrs)}
        except Exception as err:  # one broken method must not cost the others their numbers
            print(f"{method:18s} FAILED: {type(err).__name__}: {err}", flush=True)
            with open(out / "failures.jsonl", "a") as f:
                f.write(json.dumps({"method": method, "error": f"{type(err).__name__}: {err}"}) + "\n")
            continue
        best = max(runs, key=lambda lr: runs[lr][0].accuracy)
        dev, test, (trainable, total), sec, peak = runs[best]
        row = Row(method, best, dev.accuracy, test.accuracy, test.macro_f1, trainable, total, round(sec, 4),
                  round(peak, 1), {str(lr): r[0].accuracy for lr, r in runs.items()}, device_name(device))
        rows.append(row)
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(asdict(row)) + "\n")
        print(f"{method:18s} lr={best:g} dev={dev.accuracy:.3f} test={test.accuracy:.3f} "
              f"trainable={trainable:,} {sec * 1000:.0f} ms/step peak={peak:.0f} MB", flush=True)
    return rows


def read_rows(path: Path) -> list[Row]:
    """Rows of a ``results.jsonl`` (the last run of each method wins)."""
    rows = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = Row(**json.loads(line))
            rows[row.method] = row
    return list(rows.values())


def table(rows: Sequence[Row], reference: str = "lora") -> str:
    """Markdown table, best test accuracy first, with accuracy per trainable parameter against LoRA."""
    ref = next((r for r in rows if r.method == reference), None)
    lines = ["| method | lr | test acc | macro-F1 | dev acc | trainable | ms/step | peak MB | device "
             "| beats LoRA per param |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | :---: |"]
    for r in sorted(rows, key=lambda r: -r.test_accuracy):
        better = "" if ref is None or r is ref else (
            "yes" if r.test_accuracy >= ref.test_accuracy and r.trainable <= ref.trainable else "no")
        lines.append(f"| {r.method} | {r.lr:g} | {r.test_accuracy:.3f} | {r.test_macro_f1:.3f} | {r.dev_accuracy:.3f} "
                     f"| {r.trainable:,} | {r.seconds_per_step * 1000:.0f} | {r.peak_memory_mb:.0f} | {r.device} | {better} |")
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[Row], path: Path) -> None:
    """Accuracy against trainable parameters (log scale), one labelled point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 6.5))
    for r in rows:
        ax.scatter(r.trainable, r.test_accuracy, color="tab:red" if r.method == "lora" else "tab:blue")
        ax.annotate(r.method, (r.trainable, r.test_accuracy), fontsize=7, xytext=(3, 2), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (incl. the 2-way head)")
    ax.set_ylabel("SST-2 accuracy (GLUE dev, 872 sentences)")
    ax.set_title("all-MiniLM-L6-v2 on SST-2: accuracy vs trainable parameters, same steps for every method")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(out: Path) -> str:
    """Write ``results.md`` and ``quality.png`` from ``results.jsonl``; return the table."""
    rows = read_rows(out / "results.jsonl")
    text = table(rows)
    (out / "results.md").write_text(text)
    plot(rows, out / "quality.png")
    write_json_atomically(out / "results.json", {"rows": [asdict(r) for r in rows]})
    return text


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", default="all", help="comma-separated method names, or 'all' (default)")
    p.add_argument("--out", default="leantune-bench-quality", help="output folder (default: %(default)s)")
    p.add_argument("--steps", type=int, default=250, help="optimizer steps per run (default: %(default)s)")
    p.add_argument("--lrs", default=None, help="comma-separated learning-rate grid (default: per method family)")
    p.add_argument("--dev-size", type=int, default=1000, help="dev sentences for picking the lr (default: %(default)s)")
    p.add_argument("--test-size", type=int, default=None, help="test sentences (default: all 872)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default=None, help="SST-2 folder (default: ../shared/data/sst2 or $LEANTUNE_SST2_DIR)")
    p.add_argument("--report-only", action="store_true", help="redraw the table and plot from results.jsonl")


def main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if not args.report_only:
        names = sorted(lt.methods()) if args.methods == "all" else [m.strip() for m in args.methods.split(",")]
        lrs = [float(x) for x in args.lrs.split(",")] if args.lrs else None
        bench(names, out, args.steps, lrs, args.dev_size, args.test_size, args.seed,
              Path(args.data) if args.data else None)
    print(report(out))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
