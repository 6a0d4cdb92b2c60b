"""Training helpers: data in, trained adapter and metrics out (``seqcls`` for sequence classification)."""
