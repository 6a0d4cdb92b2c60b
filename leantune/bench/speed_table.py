"""A speed report as Markdown: every mode's numbers, the ratios against the issue's targets, the loss match.

The JSON holds everything, but a closing note or a README quotes a table; building it from
the report, not by hand, keeps the quoted numbers the measured ones and says plainly which
target a run met and which it missed.
"""

from __future__ import annotations

import re
from collections import Counter

# The acceptance targets of the speed-and-memory issue, by ratio name and metric:
# (">=" or "<=", bound). Lean on the first n layers answers to lean mode's targets.
TARGETS: dict[tuple[str, str], tuple[str, float]] = {
    ("lt_vs_peft", "tok_s"): (">=", 1.5), ("lt_vs_peft", "peak_gib"): ("<=", 0.75),
    ("lean_vs_peft_gc", "tok_s"): (">=", 1.5), ("lean_vs_peft_gc", "peak_gib"): ("<=", 0.8),
    ("lst_vs_peft", "tok_s"): (">=", 2.5), ("lst_vs_full", "peak_gib"): ("<=", 0.3),
    ("mezo_vs_fwd_loss", "peak_gib"): ("<=", 1.1),
}
# With CUDA graphs, against PEFT at its best (with or without them): the same targets.
TARGETS |= {(cg, metric): TARGETS[(plain, metric)] for cg, plain in (
    ("lt_cg_vs_peft_best", "lt_vs_peft"), ("lean_cg_vs_peft_gc_best", "lean_vs_peft_gc"), ("lst_cg_vs_peft_best", "lst_vs_peft"))
    for metric in ("tok_s", "peak_gib") if (plain, metric) in TARGETS}
_LEAN_ON_LAYERS = re.compile(r"lean\d+_vs_peft_gc")
_METRICS = {"tok_s": "tokens/s", "peak_gib": "peak memory"}


def target(name: str, metric: str) -> tuple[str, float] | None:
    """The issue's bound for ratio ``name`` on ``metric``, or ``None`` where it sets none."""
    if _LEAN_ON_LAYERS.fullmatch(name):
        name = "lean_vs_peft_gc"
    return TARGETS.get((name, metric))


def verdict(ratio: float, bound: tuple[str, float] | None) -> str:
    """"met" or "missed" against ``bound``; empty where there is no target."""
    if bound is None:
        return ""
    op, value = bound
    return "met" if (ratio >= value if op == ">=" else ratio <= value) else "**missed**"


def row_labels(rows: list[dict]) -> list[str]:
    """Each row's mode name; a mode that ran more than once gets " (run k)" from its second run,
    so that every run keeps a row and a bar of its own (a chart's categorical axis would stack
    repeats on one)."""
    seen: Counter[str] = Counter()
    labels = []
    for r in rows:
        seen[r["name"]] += 1
        labels.append(r["name"] if seen[r["name"]] == 1 else f"{r['name']} (run {seen[r['name']]})")
    return labels


def markdown(report: dict) -> str:
    """The report of ``leantune.bench.speed`` as Markdown tables."""
    lines = [
        f"LoRA r=16 on a {report['size'].upper()} Llama, {report['device']}"
        + (f" (host: {report['host_cpu']})" if report.get("host_cpu") else "") + f", torch {report['torch']}; "
        f"{report['steps']} timed steps after {report['warmup']} warm-up steps, median step.",
        "",
        f"Command: `python -m leantune.bench.speed {' '.join(report.get('argv', []))}`",
        "",
        "| mode | tokens/s | peak GiB | TFLOP/s | step ms | host issued it in ms | first step s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    labels = iter(row_labels([r for r in report["results"] if "tok_s" in r]))
    for r in report["results"]:
        if "tok_s" not in r:
            lines.append(f"| {r['mode']} | failed: {r.get('error', '?')} | | | | | |")
            continue
        name = next(labels) + (f" (not a result: {r['error']})" if "error" in r else "")
        peak = "—" if r.get("peak_gib") is None else f"{r['peak_gib']:.2f}"
        step = f"{r['step_s'] * 1e3:.1f}" if "step_s" in r else "—"
        issue = f"{r['host_issue_ms']:.1f}" if "host_issue_ms" in r else "—"  # runs before session 20 lack it
        lines.append(f"| {name} | {r['tok_s']:,} | {peak} | {r['tflops']} | {step} | {issue} | {r['first_step_s']} |")
    if report.get("ratios"):
        lines += ["", "| comparison | ours | against | metric | ratio | target | |", "|---|---|---|---|---:|---|---|"]
        for q in report["ratios"]:
            bound = target(q["name"], q["metric"])
            shown = "" if bound is None else f"{bound[0]} {bound[1]}"
            lines.append(f"| {q['name']} | {q['ours']} | {q['theirs']} | {_METRICS.get(q['metric'], q['metric'])} "
                         f"| {q['ratio']:.3f} | {shown} | {verdict(q['ratio'], bound)} |")
    if report.get("loss_match"):
        lines += ["", "| loss of | against | steps | max relative difference | mean |", "|---|---|---:|---:|---:|"]
        for m in report["loss_match"]:
            lines.append(f"| {m['ours']} | {m['theirs']} | {m['steps']} | {m['max_rel_diff']:.2%} "
                         f"| {m['mean_rel_diff']:.2%} |")
    return "\n".join(lines) + "\n"
