"""Is 4-bit memory real? LoRA on a bf16 base against QLoRA's NF4 base, same model and batch.

A Llama-1B-shaped model (hidden 2048, FFN 8192, 16 layers, 32 heads, 8 KV heads,
vocabulary 128,256, tied embeddings; random weights) trains LoRA on every
Linear of its blocks for a few AdamW steps at batch 1 × 512, once over the bf16
base and once over the NF4 base (``lt.QLoRA``: bitsandbytes' kernels on CUDA).
Each setting runs in a fresh process; peak memory counts from after the model
is built and adapted (base weights included), over the training steps.
Two protocols: ``plain`` (transformers' loss, every activation kept) and
``lean`` (gradient checkpointing + leantune's chunked loss, 32 rows a block), so the weights'
share of the peak shows. It also checks that the NF4 model's outputs agree with
the de-quantized reference (the pure-PyTorch path, ``QuantLinear.kernel =
"torch"``) and how the codes compare with bitsandbytes' own ``quantize_4bit``::

    python -m leantune.bench.quant_memory --out docs/bench/qlora_memory.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

import leantune as lt
from leantune.bench.speed import SIZES, batches, build
from leantune.core.quant import QuantLinear, nf4_dequantize, nf4_quantize
from leantune.engine import causal_lm_loss

# (protocol, LoRA rank): r=16 as in docs/BENCHMARKS.md's LoRA setup, r=8 is lt.LoRA's default.
SETTINGS = [("plain", 16), ("lean", 16), ("lean", 8)]
LOSS_CHUNK = 32  # rows per block of the chunked loss in the lean protocol


def adapted(base: str, size: str, r: int) -> torch.nn.Module:
    model = build(size, "cuda")
    config = lt.QLoRA(r=r, alpha=2 * r) if base == "nf4" else lt.LoRA(r=r, alpha=2 * r)
    return lt.adapt(model, config)


def measure(base: str, protocol: str, size: str, r: int, seq: int, steps: int) -> dict:
    """Peak memory of ``steps`` LoRA training steps (batch 1 × ``seq``) in this process."""
    model = adapted(base, size, r)
    model.train()
    if protocol == "lean":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    data = batches(size, steps, 1, seq, "cuda")
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    at_start = torch.cuda.memory_allocated()
    losses = []
    for ids in data:
        loss = causal_lm_loss(model, ids, ids, chunk=LOSS_CHUNK) if protocol == "lean" else model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
    torch.cuda.synchronize()
    return dict(base=base, protocol=protocol, r=r, model_gib=round(at_start / 2**30, 3),
                peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 3),
                peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 3),
                trainable=sum(p.numel() for p in params), losses=losses,
                quantized_modules=sum(isinstance(m, QuantLinear) for m in model.modules()))


def agreement(size: str, r: int, seq: int) -> dict:
    """NF4 model (bitsandbytes kernels) against the de-quantized reference, and against bf16."""
    import bitsandbytes
    import bitsandbytes.functional as bnbf

    reference = build(size, "cuda")
    model = lt.adapt(build(size, "cuda"), lt.QLoRA(r=r, alpha=2 * r, init="random"))
    ids = batches(size, 1, 1, seq, "cuda")[0]
    with torch.no_grad():
        fast = model(input_ids=ids).logits.float()
        QuantLinear.kernel = "torch"
        slow = model(input_ids=ids).logits.float()
        QuantLinear.kernel = "auto"
        with lt.disabled(model):
            quant_base = model(input_ids=ids).logits.float()
        dense = reference(input_ids=ids).logits.float()
    weight = reference.model.layers[0].mlp.down_proj.weight.detach()
    packed, absmax_codes, scales, offset = codes = nf4_quantize(weight)
    bnb_packed, state = bnbf.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
    bnb_back = bnbf.dequantize_4bit(bnb_packed, state).float()
    ours_back = nf4_dequantize(codes, tuple(weight.shape))
    return dict(
        bitsandbytes=bitsandbytes.__version__,
        logits_max_abs_diff_vs_dequantized_reference=(fast - slow).abs().max().item(),
        logits_max_abs_reference=slow.abs().max().item(),
        logits_argmax_agreement=(fast.argmax(-1) == slow.argmax(-1)).float().mean().item(),
        nf4_bytes_equal_to_bitsandbytes=(packed.view(-1) == bnb_packed.view(-1)).float().mean().item(),
        absmax_codes_equal_to_bitsandbytes=(absmax_codes == state.absmax).float().mean().item(),
        absmax_scales_equal_to_bitsandbytes=torch.equal(scales, state.state2.absmax),
        absmax_offset_diff_vs_bitsandbytes=(offset - state.offset).abs().item(),
        dequantized_max_abs_diff_vs_bitsandbytes=(ours_back - bnb_back).abs().max().item(),
        dequantized_max_abs_weight=weight.abs().max().item(),
        nf4_base_vs_bf16_base_logits_mean_abs_diff=(quant_base - dense).abs().mean().item(),
        bf16_logits_mean_abs=dense.abs().mean().item(),
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1b", choices=sorted(SIZES))
    ap.add_argument("--r", type=int, default=16, help="LoRA rank (with --one)")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--one", help="internal: measure one BASE,PROTOCOL in this process and print JSON")
    ap.add_argument("--out", type=Path, help="write the whole result as JSON here")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("quant_memory needs a CUDA GPU (bitsandbytes' 4-bit kernels)", file=sys.stderr)
        return 2
    if args.one:
        base, protocol = args.one.split(",")
        print(json.dumps(measure(base, protocol, args.size, args.r, args.seq, args.steps)))
        return 0
    runs = []
    for protocol, r in SETTINGS:
        for base in ("bf16", "nf4"):
            cmd = [sys.executable, "-m", "leantune.bench.quant_memory", "--one", f"{base},{protocol}",
                   "--size", args.size, "--r", str(r), "--seq", str(args.seq), "--steps", str(args.steps)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                print(done.stderr, file=sys.stderr)
                raise RuntimeError(f"{base},{protocol},r={r} failed (exit {done.returncode})")
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(json.dumps(runs[-1]), flush=True)
    peak = {(x["base"], x["protocol"], x["r"]): x["peak_gib"] for x in runs}
    result = dict(
        device=torch.cuda.get_device_name(), torch=torch.__version__, size=args.size, config=SIZES[args.size],
        tied_embeddings=True, batch=[1, args.seq], steps=args.steps, lean_loss_chunk=LOSS_CHUNK, runs=runs,
        peak_ratio_nf4_over_bf16={f"{p}_r{r}": round(peak["nf4", p, r] / peak["bf16", p, r], 3) for p, r in SETTINGS},
        agreement=agreement(args.size, 16, args.seq),
    )
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
