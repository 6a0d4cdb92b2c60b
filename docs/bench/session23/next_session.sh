#!/usr/bin/env bash
# Session 24's GPU plan (device log, session 23) as one background job: the CUDA tests, then
# the A/B of session 23's in-place adds (+copy is the old form) and of the stacked siblings,
# which now keep one output per sibling: 3B LoRA (profiled), 1B LoRA, 3B lean. Start it from the repository
# root on the device machine with a copy outside the tree (each call copies the tree again):
#   cp docs/bench/session23/next_session.sh /tmp/s24.sh; setsid nohup bash /tmp/s24.sh > /dev/null 2>&1 < /dev/null &
# and poll with calls that sleep, back to back (an idle machine is given back after 30 s), each
# bringing back what has been measured so far:
#   sleep 500; bash docs/bench/session23/next_session.sh collect
set -u
export PYTHONPATH=. PYTHONUNBUFFERED=1
out=/tmp/s24
if [ "${1:-}" = collect ]; then  # as session 22's plan collected, from this plan's folder
    exec env out="$out" bash docs/bench/session22/next_session.sh collect
fi
mkdir -p "$out"
{ nvidia-smi --query-gpu=name --format=csv,noheader; lscpu | grep "Model name"; git log --oneline -1; } > "$out/machine.txt" 2>&1
# (two compile tests read MiniLM's tokenizer, which the device image lacks: they fail there)
python -m pytest -q -p no:cacheprovider tests/test_stacked_linear.py tests/test_inplace.py tests/test_merge_kernel.py \
    tests/test_compile.py tests/test_custom_backwards_bf16.py -k "cuda or bf16 or in_place" > "$out/pytest.log" 2>&1
ab() { python docs/bench/session20/ab.py --size "$1" --steps 20 --warmup 3 --out "$out/$2" --modes "$3" "${@:4}" \
    > "$out/$2.log" 2>&1; }
# the top kernels of one step each: the copies (Memcpy DtoD) gone, the stack's rotary kernel back to 1.9 ms?
ab 3b lora3b peft_compile,lt_compile,lt_compile+copy,lt_compile+stack --profile
ab 1b lora1b peft_compile,lt_compile,lt_compile+copy,lt_compile+stack
ab 3b lean3b peft_gc_compile,lt_lean_compile,lt_lean_compile+stack
touch "$out/DONE"
