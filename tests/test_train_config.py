"""Run configs: overrides, and every kind of invalid config stopped with one clear error before training."""

from __future__ import annotations

import json
import sys

import pytest
import yaml

from leantune.cli import main
from leantune.train import data as data_mod
from leantune.train.config import ConfigError, load
from leantune.train.data import read_rows
from leantune.train.runner import train

from .train_helpers import sentiment_rows, seqcls_config, single_thread, write_jsonl


@pytest.fixture(autouse=True)
def _one_thread():
    yield from single_thread()


def problems(raw: dict, overrides: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as err:
        load(raw, overrides)
    return str(err.value)


def test_overrides_are_dotted_and_yaml_typed(tmp_path):
    cfg = load(seqcls_config(tmp_path / "run"), [
        "training.learning_rate=5e-4",          # YAML reads 5e-4 as a string; a float field takes it
        "method.targets=[query, key]",
        "method.r=2",
        "output.plots=false",
        f"model={tmp_path}",                    # shorthand: sets model.name, keeps the rest of the section
        "model.dtype=bfloat16",
    ])
    assert cfg.training.learning_rate == 5e-4 and isinstance(cfg.training.learning_rate, float)
    assert cfg.method == {"name": "lora", "r": 2, "alpha": 8.0, "targets": ["query", "key"]}
    assert cfg.output.plots is False
    assert (cfg.model.name, cfg.model.dtype) == (str(tmp_path), "bfloat16")
    assert cfg.method_config().task == "seq-cls", "the method trains the task's head unless told otherwise"


def test_every_problem_is_reported_at_once_with_the_nearest_key(tmp_path):
    raw = seqcls_config(tmp_path / "run")
    raw["training"]["learning_rat"] = 0.1
    raw["training"]["max_steps"] = "ten"
    raw["task"]["type"] = "seq-clss"
    raw["method"]["rr"] = 4
    raw["traning"] = {}
    message = problems(raw)
    assert "training.learning_rat: unknown key; did you mean 'training.learning_rate'?" in message
    assert "training.max_steps: expected an integer, got 'ten'" in message
    assert "task.type: 'seq-clss' is not one of seq-cls, causal-lm, token-cls; did you mean 'seq-cls'?" in message
    assert "method.rr: unknown key; did you mean 'method.r'?" in message
    assert "traning: unknown section; did you mean 'training'?" in message
    assert len(message.splitlines()) == 6  # a header and one line per problem


@pytest.mark.parametrize(("override", "expected"), [
    ("method.name=lorra", "method.name: unknown method 'lorra'. Did you mean 'lora'"),
    ("method.r=0", "lora: r must be a positive integer, got 0"),
    ("method.targets=7", "method.targets: expected a string or a list of strings or null, got 7"),
    ("training.precision=bf61", "did you mean 'bf16'?"),
    ("training.batch_size=0", "training.batch_size: must be at least 1, got 0"),
    ("data.train=/no/such/file.tsv", "data.train: file '/no/such/file.tsv' not found"),
    ("model.name=./no-such-model", "model.name: no model folder at './no-such-model'"),
    ("output.dir=", "output.dir: required"),
    ("task.packing=true", "task.packing: only causal-lm examples can be packed"),
    ("training.distributed=fsdp", "training.distributed: 'fsdp' is not one of auto, ddp, fsdp2; did you mean 'fsdp2'?"),
])
def test_single_problems_name_their_key(tmp_path, override, expected):
    assert expected in problems(seqcls_config(tmp_path / "run"), [override])


def test_fsdp2_refuses_fp16_and_overrides_leave_the_callers_mapping_alone(tmp_path):
    raw = seqcls_config(tmp_path / "run")
    message = problems(raw, ["training.distributed=fsdp2", "training.precision=fp16"])
    assert "training.precision: fp16 needs a grad scaler" in message and "use bf16" in message
    assert load(raw, ["training.distributed=fsdp2"]).training.distributed == "fsdp2"
    assert "distributed" not in raw["training"], "the override went into a copy"
    assert load(raw).training.distributed == "auto"


def test_bad_override_syntax(tmp_path):
    assert "--set expects key=value" in problems(seqcls_config(tmp_path), ["training.max_steps"])


def test_missing_data_column_stops_before_training(tmp_path):
    raw = seqcls_config(tmp_path / "run")
    raw["data"]["columns"] = {"text": "sentense"}
    with pytest.raises(ConfigError, match=r"data.columns.text: no column 'sentense' .* did you mean 'sentence'\?"):
        train(None, raw)
    raw["data"]["columns"] = {"txt": "sentence"}
    with pytest.raises(ConfigError, match=r"data.columns.txt: seq-cls reads the roles text, label, text_pair; "
                                          r"did you mean 'text'\?"):
        train(None, raw)
    assert not (tmp_path / "run").exists(), "nothing is written before the config is known to work"


def test_eval_labels_outside_the_training_labels_are_refused(tmp_path):
    raw = seqcls_config(tmp_path / "run")
    raw["data"]["eval"] = str(write_jsonl(tmp_path / "eval.jsonl", [{"sentence": "x", "label": 7}]))
    with pytest.raises(ConfigError, match=r"label 7 .* is not among the labels \[0, 1\]"):
        train(None, raw)


def test_cli_reports_config_errors_in_one_message_without_traceback(tmp_path, capsys):
    raw = seqcls_config(tmp_path / "run")
    raw["method"]["name"] = "loar"
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["train", str(path), "--set", "training.epochz=2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("leantune train: error: ") and "Traceback" not in err
    assert "method.name: unknown method 'loar'. Did you mean 'lora'" in err
    assert "training.epochz: unknown key; did you mean 'training.epochs'?" in err


def test_output_folder_of_another_run_needs_resume_or_overwrite(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(ConfigError, match="already holds a run .* pass --resume"):
        train(None, seqcls_config(tmp_path / "run"))
    with pytest.raises(ConfigError, match="--resume: no checkpoint in"):
        train(None, seqcls_config(tmp_path / "run"), resume=True)


def test_local_formats_read_the_same_rows(tmp_path):
    rows = sentiment_rows(5)
    write_jsonl(tmp_path / "d.jsonl", rows)
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "d.csv").write_text("sentence,label\n" + "".join(f'"{r["sentence"]}",{r["label"]}\n' for r in rows))
    (tmp_path / "d.tsv").write_text("sentence\tlabel\n" + "".join(f'{r["sentence"]}\t{r["label"]}\n' for r in rows))
    as_text = [{k: str(v) for k, v in r.items()} for r in rows]
    assert read_rows(str(tmp_path / "d.jsonl")) == rows == read_rows(str(tmp_path / "d.json"))
    assert read_rows(str(tmp_path / "d.csv")) == as_text == read_rows(str(tmp_path / "d.tsv"))
    assert read_rows(str(tmp_path / "d.jsonl"), limit=2) == rows[:2]
    with pytest.raises(ConfigError, match=r"unknown file type '.txt'"):
        read_rows(str(tmp_path / "d.txt"))


def test_optional_readers_say_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ConfigError, match="reading d.parquet needs the 'pandas' package: pip install pandas pyarrow"):
        read_rows(str(tmp_path / "d.parquet"))
    with pytest.raises(ConfigError, match="data set hf:glue needs the 'datasets' package: pip install datasets"):
        read_rows("hf:glue", "sst2")
    assert data_mod.SUFFIXES == (".jsonl", ".json", ".csv", ".tsv", ".parquet")
