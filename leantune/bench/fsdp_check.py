"""FSDP2 against one device: the same ``leantune train`` run on 1 GPU and under ``torchrun`` on 2 with FSDP2.

::

    python -m leantune.bench.fsdp_check --out $OUT                       # 2 GPUs, about 2-3 minutes
    python -m leantune.bench.fsdp_check --out /tmp/fc --device cpu --size tiny   # smoke test (gloo)

Needs nothing beyond torch and transformers (no hub, no data folder): it builds
a Llama from its config (random fp32 weights; ``--size 100m`` is ~134M
parameters), an offline word-level tokenizer, and synthetic prompt/response
pairs of one fixed length, so each rank's mean loss over its half-batch is the
mean over the global batch. For each precision it trains LoRA (r 16, all
linear layers) once in one process with batch ``2B`` and once with
``--nproc`` processes under FSDP2 with batch ``B`` each, then compares.

``$OUT/fsdp_check.json`` holds, per precision and run: the first/last train
loss, the final eval loss, tokens/s (mean over the logged windows after the
first), rank 0's peak allocated memory, each GPU's peak memory as nvidia-smi
saw it, wall time; and the largest absolute difference between the two runs'
adapter tensors. For the first precision, an FSDP2 run resumed from its
mid-run checkpoint is compared with the uninterrupted one. The JSON is
rewritten after every run, so a failure leaves what finished; each run's
stderr is in ``$OUT/logs/``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1024),
    "100m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=4, vocab_size=32000),
}
WORDS = 512  # prompts draw from the first WORDS words, so the loss visibly falls within a few steps
REPO = Path(__file__).resolve().parents[2]


def say(text: str) -> None:
    print(f"[fsdp_check {time.strftime('%H:%M:%S')}] {text}", flush=True)


def build_model(folder: Path, size: str, prompt_len: int) -> None:
    """A random Llama and a word-level tokenizer (``w0``, ``w1``, ...) saved at ``folder``, offline."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    arch = SIZES[size]
    specials = ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
    vocab = {t: i for i, t in enumerate(specials)} | {f"w{i}": i + 4 for i in range(arch["vocab_size"] - 4)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]",
                                  eos_token="[EOS]")
    torch.manual_seed(0)
    cfg = LlamaConfig(**arch, max_position_embeddings=4 * prompt_len, pad_token_id=0, bos_token_id=2,
                      eos_token_id=3, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    say(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters in {folder}")


def write_data(folder: Path, n: int, length: int, seed: int) -> Path:
    """Pairs whose response is the prompt's first ``length`` words, each moved one word on."""
    rng = random.Random(seed)
    path = folder / f"pairs-{seed}.jsonl"
    with path.open("w") as f:
        for _ in range(n):
            prompt = [rng.randrange(WORDS) for _ in range(length)]
            response = [(w + 1) % WORDS for w in prompt]
            f.write(json.dumps({"prompt": " ".join(f"w{w}" for w in prompt),
                                "response": " ".join(f"w{w}" for w in response)}) + "\n")
    return path


class GpuPeaks:
    """Each GPU's peak used memory (MiB) while a run lasts, polled from nvidia-smi (empty without it)."""

    def __init__(self) -> None:
        self.peaks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.wait(0.25):
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=10).stdout
            except (OSError, subprocess.SubprocessError):
                return
            for line in out.splitlines():
                index, used = (int(x) for x in line.split(","))
                self.peaks[index] = max(self.peaks.get(index, 0), used)

    def __enter__(self) -> GpuPeaks:
        if shutil.which("nvidia-smi"):
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=15)


def run_train(name: str, config: Path, overrides: list[str], nproc: int, logs: Path, timeout: int,
              resume: bool = False) -> dict[str, Any]:
    """One ``leantune train`` (under torchrun when ``nproc`` > 1); its wall time, exit status and GPU peaks."""
    cli = ["-m", "leantune.cli", "train", str(config), *(["--resume"] if resume else [])]
    for o in overrides:
        cli += ["--set", o]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] \
        if nproc > 1 else [sys.executable]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "NO_COLOR": "1", "TOKENIZERS_PARALLELISM": "false"}
    say(f"{name}: {' '.join(launcher[1:] + cli)}")
    start = time.perf_counter()
    with GpuPeaks() as peaks, (logs / f"{name}.log").open("w") as log:
        try:
            proc = subprocess.run([*launcher, *cli], env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout,
                                  cwd=REPO)
            status: int | str = proc.returncode
        except subprocess.TimeoutExpired:
            status = f"timed out after {timeout} s"
    wall = time.perf_counter() - start
    say(f"{name}: exit {status} after {wall:.1f} s")
    if status != 0:
        tail = (logs / f"{name}.log").read_text(errors="replace")[-2500:]
        print(tail, flush=True)
    return {"exit": status, "wall_s": round(wall, 1), "gpu_peak_mib": {str(k): v for k, v in sorted(peaks.peaks.items())}}


def summarize(run_dir: Path) -> dict[str, Any]:
    """Loss, throughput and memory from a run's metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    steady = train[1:] or train
    return {"steps": train[-1]["step"], "first_loss": train[0]["loss"], "final_loss": train[-1]["loss"],
            "eval_loss": evals[-1]["loss"] if evals else None,
            "tokens_per_s": sum(r["tokens_per_s"] for r in steady) / len(steady),
            "rank0_peak_alloc_mib": max(r["mem_mb"] for r in train)}


def adapter_diff(a: Path, b: Path) -> dict[str, Any]:
    """Largest absolute difference between two adapter folders' tensors (and the largest entry, for scale)."""
    from safetensors.torch import load_file

    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    if x.keys() != y.keys():
        return {"error": f"different tensors: {sorted(set(x) ^ set(y))[:5]}"}
    worst = max((x[k].float() - y[k].float()).abs().max().item() for k in x)
    scale = max(x[k].float().abs().max().item() for k in x)
    return {"max_abs_diff": worst, "max_abs_entry": scale, "tensors": len(x),
            "same_files": sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "fsdp_check"), help="results folder (default $OUT)")
    parser.add_argument("--work", default=None, help="model and run folders (default: a temporary folder)")
    parser.add_argument("--size", choices=sorted(SIZES), default="100m")
    parser.add_argument("--device", default="cuda", help="cuda (NCCL) or cpu (gloo)")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=16, help="per process under FSDP2; the single run takes nproc x")
    parser.add_argument("--length", type=int, default=96, help="prompt words (the response has as many)")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per run")
    args = parser.parse_args(argv)

    out = Path(args.out)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="fsdp-check-"))
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"args": vars(args), "runs": {}, "errors": []}

    def save() -> None:
        (out / "fsdp_check.json").write_text(json.dumps(report, indent=2) + "\n")

    try:
        import torch
        import transformers

        report["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                              "python": sys.version.split()[0]}
        if shutil.which("nvidia-smi"):
            report["gpus"] = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                            capture_output=True, text=True).stdout.split("\n")[:-1]
        build_model(work / "model", args.size, args.length)
        train_file = write_data(work, 64 * args.batch * args.nproc, args.length, 0)
        eval_file = write_data(work, 4 * args.batch, args.length, 1)
    except Exception as err:  # noqa: BLE001 - the report says what broke
        report["errors"].append(f"setup: {type(err).__name__}: {err}")
        save()
        say(f"setup failed: {err}")
        return 1
    save()

    config = {
        "model": str(work / "model"),
        "task": {"type": "causal-lm", "max_length": 2 * args.length + 2},
        "data": {"train": str(train_file), "eval": str(eval_file), "columns": {"prompt": "prompt", "response": "response"}},
        "method": {"name": "lora", "r": 16, "alpha": 32, "targets": "all-linear"},
        "training": {"max_steps": args.steps, "learning_rate": 1e-3, "log_every": 5, "device": args.device},
        "output": {"dir": str(work / "unset"), "progress": False, "plots": False},
    }
    path = work / "run.yaml"
    import yaml

    path.write_text(yaml.safe_dump(config))
    for i, precision in enumerate(p.strip() for p in args.precisions.split(",") if p.strip()):
        entry: dict[str, Any] = report["runs"].setdefault(precision, {})
        common = [f"training.precision={precision}"]
        plans = [("single", 1, [f"training.batch_size={args.batch * args.nproc}", "training.distributed=auto"]),
                 ("fsdp2", args.nproc, [f"training.batch_size={args.batch}", "training.distributed=fsdp2",
                                        f"training.save_every={args.steps // 2}"])]
        for name, nproc, extra in plans:
            run_dir = work / f"{precision}-{name}"
            try:
                entry[name] = run_train(f"{precision}-{name}", path, [*common, *extra, f"output.dir={run_dir}"], nproc,
                                        logs, args.timeout)
                if entry[name]["exit"] == 0:
                    entry[name].update(summarize(run_dir))
            except Exception as err:  # noqa: BLE001
                report["errors"].append(f"{precision}-{name}: {type(err).__name__}: {err}")
            save()
        try:
            if all(entry.get(n, {}).get("exit") == 0 for n in ("single", "fsdp2")):
                entry["adapter_single_vs_fsdp2"] = adapter_diff(work / f"{precision}-single" / "adapter",
                                                                work / f"{precision}-fsdp2" / "adapter")
                say(f"{precision}: adapter single vs fsdp2 {entry['adapter_single_vs_fsdp2']}")
        except Exception as err:  # noqa: BLE001
            report["errors"].append(f"{precision} compare: {type(err).__name__}: {err}")
        save()
        if i == 0 and entry.get("fsdp2", {}).get("exit") == 0:
            try:  # resume the FSDP2 run from its mid-run checkpoint: the same final adapter
                full, resumed = work / f"{precision}-fsdp2", work / f"{precision}-fsdp2-resumed"
                shutil.copytree(full, resumed)
                checkpoints = sorted((resumed / "checkpoints").glob("step-*"))
                for later in checkpoints[1:]:
                    shutil.rmtree(later)
                shutil.rmtree(resumed / "adapter")
                entry["fsdp2_resumed"] = run_train(f"{precision}-fsdp2-resumed", path, [
                    *common, *plans[1][2], f"output.dir={resumed}"], args.nproc, logs, args.timeout, resume=True)
                entry["fsdp2_resumed"]["from"] = checkpoints[0].name
                if entry["fsdp2_resumed"]["exit"] == 0:
                    entry["adapter_fsdp2_vs_resumed"] = adapter_diff(full / "adapter", resumed / "adapter")
                    say(f"{precision}: adapter fsdp2 vs resumed {entry['adapter_fsdp2_vs_resumed']}")
            except Exception as err:  # noqa: BLE001
                report["errors"].append(f"{precision} resume: {type(err).__name__}: {err}")
            save()
    say(f"results in {out / 'fsdp_check.json'}")
    print(json.dumps(report["runs"], indent=2), flush=True)
    failed = report["errors"] or any(r.get("exit") != 0 for e in report["runs"].values() for r in e.values()
                                     if isinstance(r, dict) and "exit" in r)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
