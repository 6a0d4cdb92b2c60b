"""Metrics as JSON lines (one record per log or evaluation step) and the numbers the progress bar shows."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any

import torch


class MetricsLog:
    """Append-only ``metrics.jsonl``; silent on ranks other than 0."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """Forget records past ``step``: a resumed run writes them again."""
        if self.enabled and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines() if line.strip()
                    and json.loads(line)["step"] <= step]
            self.path.write_text("".join(line + "\n" for line in kept))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every record of a metrics.jsonl file (``[]`` when there is none yet)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def memory_mb(device: torch.device) -> float:
    """Peak accelerator memory on CUDA, else the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux
