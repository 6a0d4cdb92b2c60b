"""SST-2 (binary sentiment) read from tab-separated files kept outside the project.

The data is shared between checkouts and never copied in: the default folder is
``shared/data/sst2`` beside the repository, or ``$LEANTUNE_SST2_DIR``.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

from . import Dataset, Split

ENV_VAR = "LEANTUNE_SST2_DIR"
SPLITS = ("train", "dev", "test")
LABEL_NAMES = ["negative", "positive"]


def default_dir() -> Path:
    """``$LEANTUNE_SST2_DIR`` if set, else ``<repo>/../shared/data/sst2``."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    return Path(__file__).resolve().parents[2].parent / "shared" / "data" / "sst2"


def read_tsv(path: Path) -> Split:
    """One ``sentence<TAB>label`` file with a header row."""
    with path.open(encoding="utf-8", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(rows, None)
        if header is None or "sentence" not in header or "label" not in header:
            raise ValueError(f"{path}: expected a header with 'sentence' and 'label' columns, got {header}")
        text_col, label_col = header.index("sentence"), header.index("label")
        texts: list[str] = []
        labels: list[int] = []
        for line, row in enumerate(rows, start=2):
            if not row:
                continue
            try:
                label = int(row[label_col])
                texts.append(row[text_col].strip())
            except (IndexError, ValueError) as err:
                raise ValueError(f"{path}:{line}: expected '<sentence>\\t<0 or 1>', got {row!r}") from err
            if label not in (0, 1):
                raise ValueError(f"{path}:{line}: label must be 0 or 1, got {label}")
            labels.append(label)
    return Split(texts, labels)


def load(folder: Path | None = None) -> Dataset:
    """The train, dev and test splits found in ``folder`` (default: :func:`default_dir`)."""
    folder = Path(folder) if folder is not None else default_dir()
    missing = [f"{s}.tsv" for s in SPLITS if not (folder / f"{s}.tsv").is_file()]
    if missing:
        raise FileNotFoundError(
            f"SST-2 files {', '.join(missing)} not found in {folder}; point ${ENV_VAR} at a folder with "
            "train.tsv, dev.tsv and test.tsv (columns: sentence, label)"
        )
    return Dataset({s: read_tsv(folder / f"{s}.tsv") for s in SPLITS}, list(LABEL_NAMES))
