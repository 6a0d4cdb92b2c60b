#!/usr/bin/env bash
# Session 22's GPU plan (device log, session 21) as one background job, so that no stage waits
# on a call of ours: the LoRA A/B at 3B, then lean with CUDA graphs at 3B, then the trainer's
# `compile: cuda_graphs` test. Start it from the repository root on the device machine with a
# copy outside the tree (each call copies the tree again, and bash reads a script as it runs):
#   cp docs/bench/session21/next_session.sh /tmp/s22.sh; setsid nohup bash /tmp/s22.sh > /dev/null 2>&1 < /dev/null &
# and poll with calls that sleep, back to back (an idle machine is given back after 30 s), each
# bringing back what has been measured so far, so that a lease that ends mid-run loses nothing:
#   sleep 500; bash docs/bench/session21/next_session.sh collect
# Every stage writes /tmp/s22/<stage>/speed_3b.json after each mode.
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
out=/tmp/s22
if [ "${1:-}" = collect ]; then  # the modes measured so far, and copies under $OUT (at most 8 files)
    grep -ah '^{"mode' "$out"/*.log | cut -c1-330
    ls "$out"
    for f in "$out"/*/speed_3b.json; do [ -f "$f" ] && cp "$f" "$OUT/$(basename "$(dirname "$f")")_speed_3b.json"; done
    cp "$out"/machine.txt "$out"/pytest.log "$OUT"/ 2>/dev/null
    # what a second machine of this session could start from (comes back if under 16 MiB)
    [ -f "$out/compile-cache.bin" ] && ls -l "$out/compile-cache.bin" && cp "$out/compile-cache.bin" "$OUT"/
    exit 0
fi
mkdir -p "$out"
{ nvidia-smi --query-gpu=name --format=csv,noheader; lscpu | grep "Model name"; git log --oneline -1; } > "$out/machine.txt" 2>&1
ab() { python docs/bench/session20/ab.py --size 3b --steps 20 --warmup 3 --out "$out/$1" --modes "$2" \
    --compile-cache "$out/compile-cache.bin" > "$out/$1.log" 2>&1; }
ab lora3b peft_compile,lt_compile,lt_compile+keep+fg,peft_compile_cg,lt_compile_cg,lt_compile_cg+keep+fg
ab lean3b peft_gc_compile,peft_gc_compile_cg,lt_lean_compile_cg,lt_lean_compile_cg+keep
python -m pytest -q -p no:cacheprovider tests/test_compile.py -k cuda_graphs > "$out/pytest.log" 2>&1
touch "$out/DONE"
