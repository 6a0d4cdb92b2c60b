"""LoRA training speed and memory: leantune against HF PEFT and the bounds, in one process.

Every mode trains the same Llama-architecture model (built from its config,
random weights, bf16, SDPA) on the same batches with fused AdamW, so the
ratios between modes hold on the machine they ran on. Each mode prints one
JSON line; the whole run is written as JSON, as Markdown tables (every mode, the
ratios against the issue's targets, the loss match) and drawn as a chart::

    python -m leantune.bench.speed --size 1b --modes peft_compile,lt_compile --out docs/bench
    python -m leantune.bench.speed --plot docs/bench/speed_1b.json

Peak memory is counted from after the model is built (weights included), so
it measures training, not construction.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

import leantune as lt
from leantune.demo import write_json_atomically, write_text_atomically
from leantune.engine import MeZO, causal_lm_loss, configure

from . import compile_cache
from .speed_table import markdown

SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=1024),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
               num_attention_heads=24, num_key_value_heads=8, vocab_size=128256),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 16, 32
DEFAULT_MODES = ["full_compile", "peft", "peft_compile", "peft_gc_compile", "frozen_compile", "fwd",
                 "fwd_loss_compile", "lt", "lt_compile", "lt_lean_compile", "lt_lst_compile", "lt_mezo_compile"]
PEFT_BEST = "peft_best"  # the faster of peft_compile and peft_compile_cg, whichever ran
PEFT_GC_BEST = "peft_gc_best"  # the same for PEFT with gradient checkpointing
# PEFT at its best, with or without CUDA graphs: what leantune's CUDA-graph modes are compared with.
BEST_OF = {PEFT_BEST: ("peft_compile", "peft_compile_cg"), PEFT_GC_BEST: ("peft_gc_compile", "peft_gc_compile_cg")}
# The issue's acceptance ratios: (name, ours, theirs, what is compared).
RATIOS = [
    ("lt_vs_peft", "lt_compile", "peft_compile", "tok_s"), ("lt_vs_peft", "lt_compile", "peft_compile", "peak_gib"),
    ("lt_vs_full", "lt_compile", "full_compile", "tok_s"), ("lt_vs_bound", "lt_compile", "frozen_compile", "tok_s"),
    ("lean_vs_peft_gc", "lt_lean_compile", "peft_gc_compile", "tok_s"),
    ("lean_vs_peft_gc", "lt_lean_compile", "peft_gc_compile", "peak_gib"),
    ("lean_keep_vs_peft_gc", "lt_lean_keep_compile", "peft_gc_compile", "tok_s"),
    ("lean_keep_vs_peft_gc", "lt_lean_keep_compile", "peft_gc_compile", "peak_gib"),
    ("lst_vs_peft", "lt_lst_compile", "peft_compile", "tok_s"), ("lst_vs_full", "lt_lst_compile", "full_compile", "peak_gib"),
    # With CUDA graphs, against PEFT at its best: the faster of PEFT compiled with and without them.
    ("lt_cg_vs_peft_best", "lt_compile_cg", PEFT_BEST, "tok_s"), ("lt_cg_vs_peft_best", "lt_compile_cg", PEFT_BEST, "peak_gib"),
    ("lean_cg_vs_peft_gc_best", "lt_lean_compile_cg", PEFT_GC_BEST, "tok_s"),
    ("lean_cg_vs_peft_gc_best", "lt_lean_compile_cg", PEFT_GC_BEST, "peak_gib"),
    ("lst_cg_vs_peft_best", "lt_lst_compile_cg", PEFT_BEST, "tok_s"),
    ("lst_cg_vs_full", "lt_lst_compile_cg", "full_compile", "peak_gib"),
    ("lst_int8_vs_peft", "lt_lst_int8_compile", "peft_compile", "tok_s"),
    ("lst_int8_vs_full", "lt_lst_int8_compile", "full_compile", "peak_gib"),
    ("mezo_vs_fwd_loss", "lt_mezo_compile", "fwd_loss_compile", "peak_gib"),
    ("lt_eager_vs_peft_eager", "lt", "peft", "tok_s"),
    # What lt.compile alone does for the others (label suffix "@lt"): the bound and PEFT through it.
    ("lt_vs_bound_lt", "lt_compile", "frozen_compile@lt", "tok_s"),
    ("peft_lt_vs_peft", "peft_compile@lt", "peft_compile", "tok_s"),
    ("peft_lt_vs_peft", "peft_compile@lt", "peft_compile", "peak_gib"),
]
LABELS = {
    "full": "full fine-tuning", "peft": "HF PEFT LoRA", "peft_gc": "HF PEFT LoRA + grad. ckpt",
    "frozen": "frozen backbone (bound)", "fwd": "forward only", "lt": "leantune LoRA",
    "lt_lean": "leantune LoRA, lean", "lt_lean_keep": "leantune LoRA, lean, attention kept",
    "lt_hfloss": "leantune LoRA, HF loss",
    "lt_lst": "leantune LST (side network, width / 8)",
    "lt_lst_int8": "leantune LST, int8-kept ladder inputs",
    "lt_lst_narrow": "leantune LST, narrowed heads",
    "fwd_loss": "forward + chunked loss (MeZO memory bound)", "lt_mezo": "leantune LoRA, MeZO (2 forwards)",
}
# "lt_lean<n>": lean mode on the first n decoder layers only (selective checkpointing).
LEAN_LAYERS = re.compile(r"lt_lean(\d+)")
# MeZO's step size and perturbation (the paper's LoRA range; --lr is AdamW's).
MEZO_LR, MEZO_EPS = 1e-4, 1e-2
# Batch tokens come from a small sub-vocabulary, so the loss visibly falls within a few steps.
TOKEN_RANGE = 2048


# Label suffix -> torch.compile mode; "_compile_cg" adds CUDA graphs (mode "reduce-overhead").
COMPILE_SUFFIXES = {"_compile_cg": "reduce-overhead", "_compile": "default"}
COMPILE_LABELS = {None: "", "default": ", compiled", "reduce-overhead": ", compiled + CUDA graphs"}
# Label suffix: compile a mode that is not leantune's (PEFT, the bound) through lt.compile.
THROUGH_LT = "@lt"


def mode_name(mode: str) -> str:
    """The chart's and the report's name for ``mode`` (a label without its compile suffix)."""
    lean = LEAN_LAYERS.fullmatch(mode)
    if not lean:
        return LABELS[mode]
    return "leantune LoRA, lean on the first " + ("layer only" if lean[1] == "1" else f"{lean[1]} layers")


def split_label(label: str) -> tuple[str, str | None]:
    """``"peft_gc_compile"`` -> ``("peft_gc", "default")``; no suffix: not compiled."""
    for suffix, compile_mode in COMPILE_SUFFIXES.items():
        if label.endswith(suffix):
            return label.removesuffix(suffix), compile_mode
    return label, None


@dataclass
class Setup:
    """What a mode trains: a loss function of (input_ids, labels) and its parameters."""

    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None  # None: forward only
    params: list[nn.Parameter]
    model: nn.Module
    flops_factor: int  # FLOPs per token per parameter: 6 full, 4 frozen base, 2 forward
    optimizer: str = "adamw"  # "adamw" (backward), "mezo" (forward-only steps) or "none" (loss under no_grad)


def build(size: str, device: str) -> nn.Module:
    """A Llama-architecture model with random weights, in bf16 (fp32 on CPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SIZES[size], max_position_embeddings=4096, tie_word_embeddings=True,
                      attn_implementation="sdpa")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)


def seed_lora_a(pairs: list[tuple[str, torch.Tensor]], seed: int = 1) -> None:
    """Fill every LoRA ``A`` from one generator in path order, so PEFT and leantune start equal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, a in sorted(pairs, key=lambda p: p[0]):
            bound = a.shape[1] ** -0.5
            a.copy_(torch.rand(a.shape, generator=g, dtype=torch.float32).mul_(2 * bound).sub_(bound))


def _hf_loss(model: nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=labels).loss


def setup(mode: str, model: nn.Module) -> Setup:
    """Prepare ``model`` for ``mode`` (a label without its compile suffix)."""
    if mode == "fwd":
        model.requires_grad_(False)
        return Setup(None, [], model, 2)
    if mode == "fwd_loss":  # what MeZO's memory is measured against: one forward with the chunked loss
        model.requires_grad_(False)
        return Setup(partial(causal_lm_loss, model), [], model, 2, optimizer="none")
    if mode in ("full", "frozen"):
        if mode == "frozen":  # backprop through a frozen backbone, no adapter: the bound
            model.requires_grad_(False)
            model.enable_input_require_grads()
        return Setup(partial(_hf_loss, model), [p for p in model.parameters() if p.requires_grad],
                     model, 6 if mode == "full" else 4)
    if mode.startswith("peft"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS))
        seed_lora_a([(n.removeprefix("base_model.model."), m.lora_A["default"].weight)
                     for n, m in model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A])
        if mode == "peft_gc":
            model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.base_model.model.enable_input_require_grads()
        return Setup(partial(_hf_loss, model), [p for p in model.parameters() if p.requires_grad], model, 4)
    if mode in ("lt_lst", "lt_lst_int8", "lt_lst_narrow"):
        # The backbone runs without autograd: 2 FLOPs per token per base parameter. The side
        # network (width / 8, about 1/64 of the backbone's matrix work, trained) is not counted.
        lt.adapt(model, lt.LST(ladder_bits=8 if mode == "lt_lst_int8" else None,
                               heads="narrow" if mode == "lt_lst_narrow" else "auto"))
        return Setup(partial(causal_lm_loss, model), [p for p in model.parameters() if p.requires_grad], model, 2)
    if mode.startswith("lt"):
        lt.adapt(model, lt.LoRA(r=RANK, alpha=ALPHA, targets=TARGETS))
        seed_lora_a([(path, d.A) for path, _, d in lt.api.adapter_paths(model, "default")])
        lean_layers = LEAN_LAYERS.fullmatch(mode)
        if mode in ("lt_lean", "lt_lean_keep") or lean_layers:
            configure(model, lean=True, keep_attention=mode == "lt_lean_keep",
                      layers=int(lean_layers[1]) if lean_layers else None)
        loss = partial(_hf_loss, model) if mode == "lt_hfloss" else partial(causal_lm_loss, model)
        params = [p for p in model.parameters() if p.requires_grad]
        if mode == "lt_mezo":
            # A MeZO step is two forward passes (at θ+εz and θ-εz), 2 FLOPs per token per
            # parameter each: 4 in all, as much as a backprop step over a frozen base, counted
            # on the same base-parameter total (the perturb/update passes over the LoRA
            # parameters are not counted: they are tiny and not matrix products).
            return Setup(loss, params, model, 4, optimizer="mezo")
        return Setup(loss, params, model, 4)
    raise ValueError(f"unknown mode {mode!r}; known: {', '.join(LABELS)}, lt_lean<n> (lean on the first n layers); "
                     "each also with _compile or _compile_cg")


def batches(size: str, count: int, bs: int, seq: int, device: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    vocab = min(TOKEN_RANGE, SIZES[size]["vocab_size"])
    return [torch.randint(0, vocab, (bs, seq), generator=g).to(device) for _ in range(count)]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _one_step(s: Setup, loss_fn: Callable, opt: torch.optim.Optimizer | None, ids: torch.Tensor) -> None:
    if s.loss is None:
        with torch.no_grad():
            loss_fn(input_ids=ids)
        return
    if s.optimizer == "none":
        with torch.no_grad():
            loss_fn(ids, ids)
        return
    if s.optimizer == "mezo":
        opt.step(partial(loss_fn, ids, ids))
        return
    loss_fn(ids, ids).backward()
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)


def _profile(label: str, step: Callable[[], None], path: Path) -> None:
    """Append the GPU kernels of one step, most time first, to ``path``, and where the GPU
    waited (:func:`~leantune.bench.timeline.gap_summary`) to ``timeline_<size>.json`` beside it."""
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    from .timeline import gap_summary

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=70)
    with path.open("a") as f:
        f.write(f"== {label}\n{table}\n")
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        summary = gap_summary(json.loads(trace.read_text()))
    timeline = path.with_name(path.name.replace("profile_", "timeline_").replace(".txt", ".json"))
    report = json.loads(timeline.read_text()) if timeline.is_file() else {}
    report[label] = summary
    write_json_atomically(timeline, report)
    print(json.dumps({"timeline": label, **{k: v for k, v in summary.items() if k.endswith("_us") or k == "kernels"}}),
          flush=True)


def run_mode(label: str, size: str, data: list[torch.Tensor], steps: int, warmup: int, lr: float,
             device: str, profile_to: Path | None = None) -> dict:
    """Train one mode for ``warmup + steps`` steps; time the median step after warm-up."""
    through_lt = label.endswith(THROUGH_LT)
    mode, compile_mode = split_label(label.removesuffix(THROUGH_LT))
    if through_lt and compile_mode is None:
        raise ValueError(f"{label!r}: {THROUGH_LT} names a compiler, so the mode must be compiled "
                         f"(e.g. frozen_compile{THROUGH_LT})")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    s = setup(mode, build(size, device))
    loss_fn = s.loss if s.loss is not None else s.model
    if compile_mode is not None:  # leantune's modes through lt.compile, the others as their users would
        loss_fn = (lt.compile if mode.startswith("lt") or through_lt else torch.compile)(loss_fn, mode=compile_mode)
    opt = torch.optim.AdamW(s.params, lr=lr, fused=device == "cuda") if s.params else None
    if s.optimizer == "mezo":
        opt = MeZO(s.params, lr=MEZO_LR, eps=MEZO_EPS, seed=0)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    times, issued, phases, losses, peak_fwd = [], [], [], [], 0
    for i in range(warmup + steps):
        ids = data[i % len(data)]
        _sync(device)
        t = time.perf_counter()
        if s.loss is None:
            with torch.no_grad():
                loss_fn(input_ids=ids)
        elif s.optimizer == "none":
            with torch.no_grad():
                loss = loss_fn(ids, ids)
        elif s.optimizer == "mezo":  # both forwards run inside the step, under no_grad
            loss = opt.step(partial(loss_fn, ids, ids))
        else:
            loss = loss_fn(ids, ids)
            forward_issued = time.perf_counter()
            if device == "cuda":  # where the peak falls: end of forward, or later
                peak_fwd = max(peak_fwd, torch.cuda.max_memory_allocated())
            loss.backward()
            backward_issued = time.perf_counter()
            if opt is not None:
                opt.step()
                opt.zero_grad(set_to_none=True)
            phases.append((forward_issued - t, backward_issued - forward_issued, time.perf_counter() - backward_issued))
        issued.append(time.perf_counter() - t)
        _sync(device)
        times.append(time.perf_counter() - t)
        if s.loss is not None:
            losses.append(loss.item())
    if profile_to is not None:
        _profile(label, partial(_one_step, s, loss_fn, opt, data[0]), profile_to)
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    step_s = statistics.median(times[warmup:])
    diverged = next((i for i, x in enumerate(losses) if not math.isfinite(x)), None)
    tokens = data[0].numel()
    n_base = sum(p.numel() for n, p in s.model.named_parameters() if "lora_" not in n and ".deltas." not in n)
    return dict(
        mode=label, name=mode_name(mode) + COMPILE_LABELS[compile_mode] + (" through lt.compile" if through_lt else ""),
        size=size,
        bs=data[0].shape[0], seq=data[0].shape[1], step_s=round(step_s, 4), tok_s=round(tokens / step_s),
        peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None,
        peak_fwd_gib=(round(peak_fwd / 2**30, 2)
                      if device == "cuda" and s.loss is not None and s.optimizer == "adamw" else None),
        first_step_s=round(times[0], 1), n_train=sum(p.numel() for p in s.params),
        **host_issue(issued[warmup:], phases[warmup:]),
        tflops=round(s.flops_factor * n_base * tokens / step_s / 1e12, 1), graph_breaks=breaks, losses=losses,
        # a run that computes garbage is no result, however fast: kept for diagnosis, out of every ratio
        **({} if diverged is None else {"error": f"loss not finite from step {diverged} on: not a result"}),
    )


def host_issue(issued: list[float], phases: list[tuple[float, float, float]]) -> dict:
    """How long the host took to issue a step (median, ms), and its forward, backward and
    optimizer shares where the mode has them. Kernels run asynchronously, so a GPU-bound step
    is issued well before it ends, while one issued in about its whole time is host-bound: the
    GPU waited on launches, and fewer launches or CUDA graphs (``_compile_cg``) would speed it
    up. (On a CPU, issuing is running: the two are equal.)"""
    report = dict(host_issue_ms=round(statistics.median(issued) * 1e3, 2))
    if phases:
        medians = [round(statistics.median(p) * 1e3, 2) for p in zip(*phases, strict=True)]
        report["host_phases_ms"] = dict(zip(("forward", "backward", "optimizer"), medians, strict=True))
    return report


def rival_pairs(results: list[dict]) -> list[tuple[str, str]]:
    """(leantune mode, its PEFT rival) for every leantune mode run, plus PEFT eager vs
    compiled: the spread that bf16 arithmetic alone gives, to read the others against."""
    pairs = [("peft", "peft_compile")]
    for r in results:
        mode = r["mode"]
        base, _ = split_label(mode)
        suffix = mode.removeprefix(base)
        if base.startswith("lt_lean"):
            pairs.append((mode, "peft_gc" + suffix))
        elif base == "lt":
            pairs.append((mode, "peft" + suffix))
    return pairs


def loss_match(results: list[dict], ours: str, theirs: str) -> dict | None:
    """How far leantune's loss curve is from PEFT's on the same batches and initial weights."""
    by = {r["mode"]: r for r in results if "losses" in r and "error" not in r}
    if ours not in by or theirs not in by:
        return None
    a, b = by[ours]["losses"], by[theirs]["losses"]
    rel = [abs(x - y) / abs(y) for x, y in zip(a, b, strict=True)]
    return dict(ours=ours, theirs=theirs, steps=len(rel), max_rel_diff=max(rel), mean_rel_diff=sum(rel) / len(rel),
                first=(a[0], b[0]), last=(a[-1], b[-1]))


def ratios(results: list[dict]) -> list[dict]:
    """Every acceptance ratio whose two modes both ran (throughput: higher is better; memory: lower)."""
    by = {r["mode"]: r for r in results if "error" not in r}
    for best, modes in BEST_OF.items():
        if ran := [by[m] for m in modes if m in by]:
            by[best] = max(ran, key=lambda r: r["tok_s"])
    out, extra = [], []
    for r in results:  # lean on the first n layers against PEFT + ckpt, compiled alike
        base, _ = split_label(r["mode"])
        if lean := LEAN_LAYERS.fullmatch(base):
            suffix = r["mode"].removeprefix(base)
            extra.extend((f"lean{lean[1]}_vs_peft_gc", r["mode"], "peft_gc" + suffix, key) for key in ("tok_s", "peak_gib"))
    for name, ours, theirs, key in [*RATIOS, *extra]:
        if ours in by and theirs in by and by[ours].get(key) and by[theirs].get(key):
            out.append(dict(name=name, ours=ours, theirs=by[theirs]["mode"], metric=key,
                            ratio=round(by[ours][key] / by[theirs][key], 3)))
    return out


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The benchmark's options, shared by ``python -m leantune.bench.speed`` and ``leantune bench speed``."""
    ap.add_argument("--size", default="1b", choices=sorted(SIZES))
    ap.add_argument("--modes", default=",".join(DEFAULT_MODES),
                    help="comma-separated; append _compile to compile, _compile_cg to add CUDA graphs, "
                         f"then {THROUGH_LT} to compile PEFT or the bound through lt.compile; "
                         "lt_lean<n>: lean mode on the first n decoder layers only")
    ap.add_argument("--steps", type=int, default=50, help="timed steps per mode (all on the loss curve)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--distinct-batches", type=int, default=4, help="batches cycled through")
    ap.add_argument("--out", default=None, help="folder for speed_<size>.json, .md (tables) and .png (chart)")
    ap.add_argument("--plot", default=None, help="only draw the chart and write the tables of an existing JSON file")
    ap.add_argument("--profile", action="store_true", help="write each mode's top GPU kernels to profile_<size>.txt")
    ap.add_argument("--compile-cache", default=None, metavar="FILE",
                    help="load torch.compile's cache artifacts from FILE first (if it exists) and save them there "
                         "after each mode: a later run, on this or a like machine with the same code and "
                         "software, skips most of compiling (each mode's JSON says how many graphs it found)")


def host_cpu() -> str:
    """The host's CPU model and core count. Compiled steps without CUDA graphs that launch many
    small kernels (LST's side network) run at the speed of the CPU that launches them, so runs
    from different hosts compare only with this in view."""
    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    return f"{model}, {os.cpu_count()} cores"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(ap)
    return run(ap.parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Run the modes named in ``args`` (or only draw ``args.plot``)."""
    from .plot import draw

    if args.plot:
        path = Path(args.plot)
        report = json.loads(path.read_text())
        print(draw(report, path.with_suffix(".png")))
        write_text_atomically(path.with_suffix(".md"), markdown(report))
        print(f"table: {path.with_suffix('.md')}")
        return 0
    labels = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not labels:
        raise SystemExit("--modes names no mode: give a comma-separated list, e.g. peft_compile,lt_compile")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch._dynamo.config.recompile_limit = 64
    data = batches(args.size, args.distinct_batches, args.batch, args.seq, device)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    cache = Path(args.compile_cache) if args.compile_cache else None
    if cache is not None and (loaded := compile_cache.load(cache)):
        print(f"compile cache: loaded {loaded / 2**20:.1f} MiB from {cache}", flush=True)
    results = []
    for label in labels:
        error = None
        before = compile_cache.graph_lookups()
        try:
            res = run_mode(label, args.size, data, args.steps, args.warmup, args.lr, device,
                           Path(args.out or ".") / f"profile_{args.size}.txt" if args.profile else None)
        except torch.OutOfMemoryError:
            error = "OOM"
        except Exception as err:  # one failing mode must not cost the others their numbers
            error = f"{type(err).__name__}: {err}"
        if error is not None:
            res = dict(mode=label, size=args.size, error=error)
        if cache is not None:
            res["compiled_graphs"] = {k: v - before[k] for k, v in compile_cache.graph_lookups().items()}
            compile_cache.save(cache)
        torch._dynamo.reset()
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        results.append(res)
        print(json.dumps({k: v for k, v in res.items() if k != "losses"}), flush=True)
        report = dict(
            size=args.size, device=torch.cuda.get_device_name() if device == "cuda" else "cpu",
            host_cpu=host_cpu(), torch=torch.__version__, steps=args.steps, warmup=args.warmup, lr=args.lr, argv=sys.argv[1:],
            results=results, ratios=ratios(results), loss_match=[m for m in (loss_match(results, a, b) for a, b in rival_pairs(results)) if m],
        )
        if args.out:  # after every mode, so a run cut short still leaves its numbers
            write_json_atomically(Path(args.out) / f"speed_{args.size}.json", report)
    for m in [*report["ratios"], *report["loss_match"]]:
        print(json.dumps(m), flush=True)
    tables = markdown(report)
    print(tables, flush=True)
    if args.out:
        write_text_atomically(Path(args.out) / f"speed_{args.size}.md", tables)
        print(draw(report, Path(args.out) / f"speed_{args.size}.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
