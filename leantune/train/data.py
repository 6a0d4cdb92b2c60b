"""Reading examples: local jsonl / json / csv / tsv / parquet files and Hugging Face ``datasets``.

Every source becomes a plain list of row dicts, so tasks see one shape and the
column check (the config names columns that exist) runs before any model loads.
Optional readers (pandas for parquet, ``datasets`` for ``hf:`` names) are imported
only when used, with an error that says what to install.
"""

from __future__ import annotations

import csv
import difflib
import importlib
import json
from pathlib import Path
from typing import Any

from .config import ConfigError, DataSection

Row = dict[str, Any]
SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


def _optional(module: str, pip_name: str, why: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ConfigError(f"{why} needs the {module!r} package: pip install {pip_name}") from err


def _read_json(path: Path) -> list[Row]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        return json.loads(text)
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ConfigError(f"{path}:{number}: not a JSON object per line ({err})") from err
    return rows


def _read_delimited(path: Path) -> list[Row]:
    with path.open(encoding="utf-8", newline="") as f:
        # GLUE-style TSVs hold bare quotes inside sentences, so tabs alone delimit; CSV keeps its quoting.
        quoting = csv.QUOTE_NONE if path.suffix == ".tsv" else csv.QUOTE_MINIMAL
        return list(csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ",", quoting=quoting))


def _read_parquet(path: Path) -> list[Row]:
    pandas = _optional("pandas", "pandas pyarrow", f"reading {path.name}")
    _optional("pyarrow", "pyarrow", f"reading {path.name}")
    return pandas.read_parquet(path).to_dict(orient="records")


def _read_hub(name: str, subset: str | None, split: str) -> list[Row]:
    datasets = _optional("datasets", "datasets", f"data set hf:{name}")
    return [dict(r) for r in datasets.load_dataset(name, subset, split=split)]


def read_rows(source: str, subset: str | None = None, split: str = "train", limit: int | None = None) -> list[Row]:
    """Every row of ``source`` (a file, or ``hf:NAME``) as dicts; the first ``limit`` rows if given."""
    if source.startswith("hf:"):
        rows = _read_hub(source[3:], subset, split)
    else:
        path = Path(source).expanduser()
        readers = {".jsonl": _read_json, ".json": _read_json, ".csv": _read_delimited, ".tsv": _read_delimited,
                   ".parquet": _read_parquet}
        if path.suffix not in readers:
            raise ConfigError(f"{source}: unknown file type {path.suffix!r}; use {', '.join(SUFFIXES)} or hf:NAME")
        rows = readers[path.suffix](path)
    if not rows:
        raise ConfigError(f"{source} holds no rows")
    return rows[:limit] if limit else rows


def resolve_columns(mapping: dict[str, str], required: tuple[str, ...], optional: tuple[str, ...],
                    rows: list[Row], source: str, task: str) -> dict[str, str]:
    """Role -> column for this task; every required column must exist in every row.

    Roles left out of ``mapping`` read the column of the same name; an optional
    role is used when its column exists.
    """
    roles = required + optional
    problems = []
    for role in mapping:
        if role not in roles:
            near = difflib.get_close_matches(role, roles, n=1, cutoff=0.5)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            problems.append(f"data.columns.{role}: {task} reads the roles {', '.join(roles)}{hint}")
    header = list(rows[0])
    chosen = {role: mapping.get(role, role) for role in required}
    chosen.update({r: mapping.get(r, r) for r in optional if r in mapping or r in header})
    for role, column in chosen.items():
        missing_at = next((i for i, row in enumerate(rows) if column not in row), None)
        if missing_at is None:
            continue
        near = difflib.get_close_matches(column, header, n=1, cutoff=0.5)
        hint = f"; did you mean '{near[0]}'? (set data.columns.{role})" if near else f" (set data.columns.{role})"
        where = "" if missing_at == 0 else f" in row {missing_at + 1}"
        problems.append(f"data.columns.{role}: no column {column!r}{where} of {source}; its columns are "
                        f"{', '.join(header)}{hint}")
    if problems:
        raise ConfigError("the data does not fit the config:\n" + "\n".join(f"  - {p}" for p in problems))
    return chosen


def load_split(section: DataSection, which: str) -> list[Row] | None:
    """The ``train`` or ``eval`` rows the data section names (``None`` when it names none)."""
    source = section.train if which == "train" else section.eval
    if not source:
        return None
    split = section.train_split if which == "train" else section.eval_split
    limit = section.max_train_samples if which == "train" else section.max_eval_samples
    return read_rows(source, section.subset, split, limit)
