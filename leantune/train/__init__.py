"""Training: configs, data, tasks, the loop, checkpoints and metrics.

``seqcls`` is the small self-contained sequence-classification path (tokenise, batch,
train, evaluate) that the demo and the quality benchmarks share.
"""
