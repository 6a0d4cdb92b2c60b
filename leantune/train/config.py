"""The run config: one YAML file (model, task, data, method, training, output), typed and checked up front.

Every problem — an unknown key, a wrong type, a bad choice, a missing file, an
unknown method or method parameter — is collected and reported in one error
that names the key and suggests the nearest valid one, so a run never fails
an hour in on a typo. ``--set a.b=value`` overrides any key with a YAML value.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..config import MethodConfig
from ..registry import get_method, methods

TASK_TYPES = ("seq-cls", "causal-lm", "token-cls")
LOWER_IS_BETTER = ("loss", "perplexity")


class ConfigError(ValueError):
    """A run config that cannot work; the message lists every problem, one per line."""


def _choice(value: str, choices: tuple[str, ...], key: str) -> list[str]:
    if value in choices:
        return []
    near = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.5)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    return [f"{key}: {value!r} is not one of {', '.join(choices)}{hint}"]


def looks_local(name: str) -> bool:
    """A model name that can only be a folder (hub ids are ``org/name``, never ``./x`` or ``/x``)."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).exists()


@dataclass
class ModelSection:
    """What to fine-tune. ``name``: a Hugging Face model id or a local folder (read offline);
    ``tokenizer``: where the tokenizer lives when not beside the model; ``dtype``: ``auto`` keeps
    the checkpoint's dtype."""

    name: str = ""
    tokenizer: str | None = None
    dtype: str = "auto"

    def check(self, needs_name: bool) -> list[str]:
        problems = _choice(self.dtype, ("auto", "float32", "bfloat16", "float16"), "model.dtype")
        if needs_name and not self.name:
            problems.append("model.name: required (a Hugging Face model id or a local folder)")
        elif self.name and looks_local(self.name) and not Path(self.name).expanduser().is_dir():
            problems.append(f"model.name: no model folder at {self.name!r}")
        return problems


@dataclass
class TaskSection:
    """What the model learns. ``type``: seq-cls, causal-lm (prompt → response SFT) or token-cls;
    ``labels``: class names in id order (default: sorted values found in the training data);
    ``chat_template``: wrap causal-lm pairs in the tokenizer's chat template when it has one;
    ``packing``: concatenate causal-lm examples into full ``max_length`` rows."""

    type: str = ""
    max_length: int = 128
    labels: list[str | int] | None = None
    chat_template: bool = True
    packing: bool = False

    def check(self) -> list[str]:
        if not self.type:
            return [f"task.type: required, one of {', '.join(TASK_TYPES)}"]
        problems = _choice(self.type, TASK_TYPES, "task.type")
        if self.max_length < 2:
            problems.append(f"task.max_length: must be at least 2, got {self.max_length}")
        if self.packing and self.type != "causal-lm":
            problems.append("task.packing: only causal-lm examples can be packed")
        return problems


@dataclass
class DataSection:
    """Where examples come from. ``train``/``eval``: a .jsonl, .json, .csv, .tsv or .parquet file, or
    ``hf:NAME`` for a Hugging Face ``datasets`` data set (``subset``, ``train_split``, ``eval_split``);
    ``columns``: task role -> column name, e.g. ``{text: sentence}``; ``max_*_samples``: use the
    first N rows only."""

    train: str = ""
    eval: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    subset: str | None = None
    train_split: str = "train"
    eval_split: str = "validation"
    max_train_samples: int | None = None
    max_eval_samples: int | None = None

    def check(self) -> list[str]:
        problems = [] if self.train else ["data.train: required (a data file or hf:NAME)"]
        for key in ("train", "eval"):
            source = getattr(self, key)
            if source and not source.startswith("hf:") and not Path(source).expanduser().is_file():
                problems.append(f"data.{key}: file {source!r} not found")
        for key in ("max_train_samples", "max_eval_samples"):
            if getattr(self, key) is not None and getattr(self, key) < 1:
                problems.append(f"data.{key}: must be at least 1")
        return problems


# ``training.compile`` values beyond true/false: the ``torch.compile`` mode each stands for.
COMPILE_MODES = {"cuda_graphs": "reduce-overhead"}


@dataclass
class TrainingSection:
    """How to train. ``max_steps`` (optimizer steps) wins over ``epochs`` when > 0; ``batch_size``
    is per process; warm-up is ``warmup_steps`` or a ``warmup_ratio`` of all steps; ``eval_every``
    / ``save_every`` = 0 means at the end only; ``best_metric`` defaults to the task's main metric;
    ``distributed`` (under ``torchrun``): ``auto``/``ddp`` replicate the model, ``fsdp2`` shards it;
    ``optimizer: mezo`` trains with forward passes only (``mezo_eps``, ``mezo_samples``: engine/mezo.py);
    ``compile`` runs each training step's loss through ``lt.compile`` (engine/compiling.py);
    ``compile: cuda_graphs`` also replays each step from CUDA graphs (one process, CUDA; fixed batch
    shapes, as ``packing`` gives, record once; elsewhere it compiles without them);
    ``lean`` keeps only each layer's input for backward and recomputes the rest (engine/lean.py),
    ``lean_keep_attention`` also keeps attention's outputs (a little faster, a little more memory),
    ``lean_layers`` makes only the first n decoder layers lean (faster, more memory; default all)."""

    max_steps: int = 0
    epochs: int = 1
    batch_size: int = 16
    eval_batch_size: int | None = None
    grad_accum: int = 1
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    schedule: str = "linear"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    max_grad_norm: float | None = 1.0
    precision: str = "fp32"
    log_every: int = 10
    eval_every: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    best_metric: str | None = None
    seed: int = 0
    device: str = "auto"
    distributed: str = "auto"
    optimizer: str = "adamw"
    mezo_eps: float = 1e-3
    mezo_samples: int = 1
    compile: bool | str = False
    lean: bool = False
    lean_keep_attention: bool = False
    lean_layers: int | None = None

    def check(self) -> list[str]:
        problems = _choice(self.schedule, ("linear", "cosine", "constant"), "training.schedule")
        problems += _choice(self.precision, ("fp32", "bf16", "fp16"), "training.precision")
        problems += _choice(self.distributed, ("auto", "ddp", "fsdp2"), "training.distributed")
        problems += _choice(self.optimizer, ("adamw", "mezo"), "training.optimizer")
        if self.optimizer == "mezo" and (self.mezo_eps <= 0 or self.mezo_samples < 1):
            problems.append(f"training.mezo_eps, training.mezo_samples: need eps > 0 and at least 1 sample, "
                            f"got {self.mezo_eps} and {self.mezo_samples}")
        if self.distributed == "fsdp2" and self.precision == "fp16":
            problems.append("training.precision: fp16 needs a grad scaler, which leantune does not run on FSDP2 "
                            "shards; use bf16 (or fp32) with training.distributed: fsdp2")
        if isinstance(self.compile, str) and self.compile not in COMPILE_MODES:
            problems.append(f"training.compile: true, false or {', '.join(COMPILE_MODES)} (compiled, each step "
                            f"replayed from CUDA graphs), got {self.compile!r}")
        if self.compile and (self.optimizer == "mezo" or self.distributed == "fsdp2"):
            problems.append("training.compile: runs backprop steps in one process or under DDP; turn it off with "
                            "optimizer: mezo (forward passes only) or distributed: fsdp2")
        if self.lean and self.optimizer == "mezo":
            problems.append("training.lean: keeps less for backward, and optimizer: mezo runs no backward "
                            "(it already needs only inference memory); turn lean off")
        if self.lean and self.distributed == "fsdp2":
            problems.append("training.lean: not supported with distributed: fsdp2 yet (untested with sharded "
                            "layers); use ddp or one process")
        if self.lean_keep_attention and not self.lean:
            problems.append("training.lean_keep_attention: only means something with lean: true")
        if self.lean_layers is not None and (not self.lean or self.lean_layers < 1):
            problems.append(f"training.lean_layers: how many decoder layers lean mode checkpoints; needs lean: true "
                            f"and at least 1, got {self.lean_layers} (leave it out for all layers)")
        for key in ("epochs", "batch_size", "grad_accum", "log_every", "keep_checkpoints"):
            if getattr(self, key) < 1:
                problems.append(f"training.{key}: must be at least 1, got {getattr(self, key)}")
        for key in ("max_steps", "warmup_steps", "eval_every", "save_every"):
            if getattr(self, key) < 0:
                problems.append(f"training.{key}: must not be negative, got {getattr(self, key)}")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            problems.append("training.eval_batch_size: must be at least 1")
        if self.learning_rate <= 0:
            problems.append(f"training.learning_rate: must be positive, got {self.learning_rate}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            problems.append(f"training.warmup_ratio: must be in [0, 1), got {self.warmup_ratio}")
        if self.warmup_ratio and self.warmup_steps:
            problems.append("training.warmup_steps, training.warmup_ratio: set one of them, not both")
        return problems


@dataclass
class OutputSection:
    """Where the run goes: ``dir`` holds checkpoints, the final and best adapters, metrics.jsonl
    and curves.png; ``overwrite`` lets a new run replace an old one in the same folder."""

    dir: str = ""
    overwrite: bool = False
    progress: bool = True
    plots: bool = True

    def check(self) -> list[str]:
        return [] if self.dir else ["output.dir: required (the run's folder)"]


@dataclass
class RunConfig:
    """One training run. ``method`` is the method's name plus its parameters, as in
    ``{name: lora, r: 8, targets: [query, value]}``."""

    model: ModelSection = field(default_factory=ModelSection)
    task: TaskSection = field(default_factory=TaskSection)
    data: DataSection = field(default_factory=DataSection)
    method: dict[str, Any] = field(default_factory=lambda: {"name": "lora"})
    training: TrainingSection = field(default_factory=TrainingSection)
    output: OutputSection = field(default_factory=OutputSection)

    def method_config(self) -> MethodConfig:
        """The method's config object; its ``task`` defaults to the run's task so heads train."""
        params = {k: v for k, v in self.method.items() if k != "name"}
        params.setdefault("task", self.task.type)
        return get_method(self.method["name"])(**params)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS: dict[str, Any] = typing.get_type_hints(RunConfig)
# A section written as a bare value sets this key: ``model: gpt2`` is ``model: {name: gpt2}``.
SHORTHAND = {"model": "name", "task": "type", "method": "name", "output": "dir"}


# --- types -------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
    if tp in names:
        return names[tp]
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is dict:
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


_BAD = object()


def coerce(value: Any, tp: Any) -> Any:
    """``value`` as type ``tp`` (ints widen to floats; ``"5e-4"``, which YAML reads as a string,
    becomes a float), or ``_BAD``. Annotations this does not know accept anything."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if tp is type(None):
        return None if value is None else _BAD
    if origin in (typing.Union, types.UnionType):
        for arm in sorted(args, key=lambda a: a is float):  # exact types first: 3 stays an int in int | float
            out = coerce(value, arm)
            if out is not _BAD:
                return out
        return _BAD
    if tp is bool:
        return value if isinstance(value, bool) else _BAD
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _BAD
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:
            return float(value) if isinstance(value, str) else _BAD
        except ValueError:
            return _BAD
    if tp is str:
        return value if isinstance(value, str) else _BAD
    if origin is list:
        if not isinstance(value, list):
            return _BAD
        items = [coerce(v, args[0]) for v in value]
        return _BAD if any(i is _BAD for i in items) else items
    if origin is dict:
        if not isinstance(value, dict):
            return _BAD
        out = {k: coerce(v, args[1]) for k, v in value.items()}
        return _BAD if any(not isinstance(k, str) for k in out) or _BAD in out.values() else out
    return value


def _fields_of(cls: type, raw: dict[str, Any], prefix: str, problems: list[str]) -> dict[str, Any]:
    """Type-check ``raw`` against dataclass ``cls``; unknown keys get a nearest-name suggestion."""
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    out: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in known:
            near = difflib.get_close_matches(str(key), known, n=1, cutoff=0.5)
            hint = f"; did you mean '{prefix}{near[0]}'?" if near else f"; valid keys: {', '.join(known)}"
            problems.append(f"{prefix}{key}: unknown key{hint}")
            continue
        got = coerce(value, hints[key])
        if got is _BAD:
            problems.append(f"{prefix}{key}: expected {_type_name(hints[key])}, got {value!r}")
        else:
            out[key] = got
    return out


def _method(raw: dict[str, Any], problems: list[str]) -> dict[str, Any]:
    """Check the method's name and parameters against its config class."""
    name = raw.get("name")
    if not isinstance(name, str):
        problems.append(f"method.name: required, one of {', '.join(methods())}")
        return raw
    try:
        cls = get_method(name)
    except KeyError as err:
        problems.append(f"method.name: {err.args[0]}")
        return raw
    params = _fields_of(cls, {k: v for k, v in raw.items() if k != "name"}, "method.", problems)
    try:
        cls(**params)
    except (TypeError, ValueError) as err:
        problems.append(f"method: {err}")
    return {"name": cls.name, **params}


# --- building -----------------------------------------------------------------------------
def _expand(section: str, value: Any) -> Any:
    """A section given as a bare value means its shorthand key."""
    if section in SHORTHAND and value is not None and not isinstance(value, dict):
        return {SHORTHAND[section]: value}
    return value


def build(raw: dict[str, Any], source: str = "config", needs_model: bool = True) -> RunConfig:
    """A checked :class:`RunConfig` from a plain mapping, or one :class:`ConfigError` listing every problem."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections ({', '.join(SECTIONS)}), got {type(raw).__name__}")
    problems: list[str] = []
    parts: dict[str, Any] = {}
    for key, value in raw.items():
        value = _expand(key, value)
        if key not in SECTIONS:
            near = difflib.get_close_matches(str(key), list(SECTIONS), n=1, cutoff=0.5)
            hint = f"; did you mean '{near[0]}'?" if near else f"; sections are {', '.join(SECTIONS)}"
            problems.append(f"{key}: unknown section{hint}")
        elif not isinstance(value, dict):
            problems.append(f"{key}: expected a mapping, got {value!r}")
        elif key == "method":
            parts[key] = _method(value, problems)
        else:
            parts[key] = SECTIONS[key](**_fields_of(SECTIONS[key], value, f"{key}.", problems))
    if "method" not in raw:
        parts["method"] = _method({"name": "lora"}, problems)
    cfg = RunConfig(**parts)
    problems += cfg.model.check(needs_model) + cfg.task.check() + cfg.data.check()
    problems += cfg.training.check() + cfg.output.check()
    if problems:
        raise ConfigError(f"{source} is not a valid run config:\n" + "\n".join(f"  - {p}" for p in problems))
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"training.learning_rate=1e-3"`` -> (["training", "learning_rate"], value read as YAML)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set expects key=value (e.g. training.max_steps=100), got {text!r}")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {key}: value {value!r} is not valid YAML: {err}") from err
    return key.strip().split("."), parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """A copy of ``raw`` with every ``key=value`` override applied (dotted keys make nested sections);
    ``raw``'s nested sections are copied too, so the caller's mapping is never changed."""
    out = {k: _expand(k, copy.deepcopy(v)) for k, v in raw.items()}
    for text in overrides:
        path, value = parse_override(text)
        if len(path) == 1 and path[0] in SHORTHAND and isinstance(out.get(path[0]), dict) and not isinstance(value, dict):
            path = [path[0], SHORTHAND[path[0]]]  # --set model=x keeps the rest of the model section
        if len(path) == 1:
            out[path[0]] = _expand(path[0], value)
            continue
        node = out.setdefault(path[0], {})
        for part in path[1:-1]:
            if not isinstance(node, dict):
                break
            node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {text}: {'.'.join(path[:-1])} is not a section")
        node[path[-1]] = value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML file, with file and line in any syntax error."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        with path.open() as f:  # a stream, so errors name the file
            raw = yaml.safe_load(f)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    return raw if raw is not None else {}


def load(source: str | Path | dict[str, Any] | RunConfig, overrides: list[str] | None = None,
         needs_model: bool = True) -> RunConfig:
    """A checked config from a YAML path, a mapping or a :class:`RunConfig`, with ``--set`` overrides."""
    if isinstance(source, RunConfig):
        source = source.to_dict()
    name = str(source) if isinstance(source, (str, Path)) else "config"
    raw = read_yaml(source) if isinstance(source, (str, Path)) else dict(source)
    return build(apply_overrides(raw, list(overrides or [])), name, needs_model)


def higher_is_better(metric: str) -> bool:
    """Losses and perplexities shrink as a model improves; accuracies and F1 grow."""
    return not metric.endswith(LOWER_IS_BETTER)
