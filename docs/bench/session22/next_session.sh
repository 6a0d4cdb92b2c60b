#!/usr/bin/env bash
# Session 23's GPU plan (device log, session 22) as one background job: the stacked siblings'
# CUDA tests, then their A/B: 3B LoRA, 1B LoRA, 3B lean. Start it from the repository
# root on the device machine with a copy outside the tree (each call copies the tree again):
#   cp docs/bench/session22/next_session.sh /tmp/s23.sh; setsid nohup bash /tmp/s23.sh > /dev/null 2>&1 < /dev/null &
# and poll with calls that sleep, back to back (an idle machine is given back after 30 s), each
# bringing back what has been measured so far:
#   sleep 500; bash docs/bench/session22/next_session.sh collect
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
out=${out:-/tmp/s23}  # session 23's plan collects through this script with its own folder
if [ "${1:-}" = collect ]; then  # the modes measured so far, and copies under $OUT
    tail -n 3 "$out"/pytest.log 2>/dev/null
    grep -ah '^{"mode' "$out"/*.log | cut -c1-330
    ls "$out"
    for f in "$out"/*/speed_*.json "$out"/*/profile_*.txt; do
        [ -f "$f" ] && cp "$f" "$OUT/$(basename "$(dirname "$f")")_$(basename "$f")"
    done
    cp "$out"/machine.txt "$out"/pytest.log "$OUT"/ 2>/dev/null
    exit 0
fi
mkdir -p "$out"
{ nvidia-smi --query-gpu=name --format=csv,noheader; lscpu | grep "Model name"; git log --oneline -1; } > "$out/machine.txt" 2>&1
python -m pytest -q -p no:cacheprovider tests/test_stacked_linear.py tests/test_merge_kernel.py \
    tests/test_compile.py -k "cuda" > "$out/pytest.log" 2>&1
ab() { python docs/bench/session20/ab.py --size "$1" --steps 20 --warmup 3 --out "$out/$2" --modes "$3" "${@:4}" \
    > "$out/$2.log" 2>&1; }
# the top kernels of one step each (where the stack's time goes, if it does not win)
ab 3b lora3b peft_compile,lt_compile,lt_compile+stack,lt_compile_cg+stack --profile
ab 1b lora1b peft_compile,lt_compile,lt_compile+stack
ab 3b lean3b peft_gc_compile,lt_lean_compile,lt_lean_compile+stack
touch "$out/DONE"
