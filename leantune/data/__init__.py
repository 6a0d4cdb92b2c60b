"""Small text-classification data sets that ship with (or beside) leantune, as plain lists."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Split:
    """Texts and their integer labels, index-aligned."""

    texts: list[str]
    labels: list[int]

    def __post_init__(self) -> None:
        if len(self.texts) != len(self.labels):
            raise ValueError(f"split has {len(self.texts)} texts but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True)
class Dataset:
    """Named splits plus the label names (label ``i`` is ``label_names[i]``)."""

    splits: dict[str, Split]
    label_names: list[str]

    def __getitem__(self, name: str) -> Split:
        if name not in self.splits:
            raise KeyError(f"no split {name!r}; this data set has {sorted(self.splits)}")
        return self.splits[name]


def package_dir(module: str, pip_name: str) -> Path:
    """Folder of an installed package that carries data, or an error that says how to install it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the package {module!r} is not installed; run `pip install {pip_name}` "
            "(or `make demo`, which installs the demo extras)"
        )
    return Path(next(iter(spec.submodule_search_locations)))
