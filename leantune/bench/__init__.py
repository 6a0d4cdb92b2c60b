"""Benchmarks: speed and memory of leantune against HF PEFT and the bounds (``speed``)."""
