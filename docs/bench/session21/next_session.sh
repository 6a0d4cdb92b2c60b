#!/usr/bin/env bash
# Session 22's GPU plan (device log, session 21) as one background job, so that no stage waits
# on a call of ours: the LoRA A/B at 3B, then lean with CUDA graphs at 3B, then the trainer's
# `compile: cuda_graphs` test. Start it from the repository root on the device machine with
#   setsid nohup bash docs/bench/session21/next_session.sh > /dev/null 2>&1 < /dev/null &
# and poll with calls that sleep, back to back (an idle machine is given back after 30 s):
#   sleep 500; grep -ah '^{"mode' /tmp/s22/*.log | cut -c1-330; ls /tmp/s22
# Every stage writes /tmp/s22/<stage>/speed_3b.json after each mode, so a stage cut short keeps
# what it measured; copy them under $OUT to bring them back.
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
out=/tmp/s22
mkdir -p "$out"
{ nvidia-smi --query-gpu=name --format=csv,noheader; lscpu | grep "Model name"; git log --oneline -1; } > "$out/machine.txt" 2>&1
ab() { python docs/bench/session20/ab.py --size 3b --steps 20 --warmup 3 --out "$out/$1" --modes "$2" > "$out/$1.log" 2>&1; }
ab lora3b peft_compile,lt_compile,lt_compile+keep+fg,peft_compile_cg,lt_compile_cg,lt_compile_cg+keep+fg
ab lean3b peft_gc_compile,peft_gc_compile_cg,lt_lean_compile_cg,lt_lean_compile_cg+keep
python -m pytest -q -p no:cacheprovider tests/test_compile.py -k cuda_graphs > "$out/pytest.log" 2>&1
touch "$out/DONE"
