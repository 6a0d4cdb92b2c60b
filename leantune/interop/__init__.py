"""Formats of other libraries: HF PEFT adapter folders."""
