"""The walk-through in docs/training.md, as a new user runs it: MiniLM on SST-2 with train, eval, merge."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import leantune as lt
from leantune.cli import main
from leantune.train.data import read_rows

from .train_helpers import REPO, minilm_dir, single_thread

SST2 = REPO.parent / "shared" / "data" / "sst2"
pytestmark = pytest.mark.skipif(not (SST2 / "train.tsv").is_file(),
                                reason=f"SST-2 is not at {SST2} (the data is shared, never copied into the project)")


@pytest.fixture(autouse=True)
def _one_thread():
    yield from single_thread()


def readme_config() -> str:
    """The first YAML block of docs/training.md: the config the reader copies."""
    return re.search(r"```yaml\n(.*?)```", (REPO / "docs" / "training.md").read_text(), re.S).group(1)


def test_readme_config_trains_evaluates_and_merges_minilm_on_sst2(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(REPO)  # the walk-through's data paths are relative to the repository
    config = tmp_path / "sst2.yaml"
    config.write_text(readme_config())
    assert len(config.read_text().splitlines()) <= 10
    run = tmp_path / "run"
    small = ["--set", f"model={minilm_dir()}", "--set", f"output={run}", "--set", "training.max_steps=30",
             "--set", "task.max_length=32", "--set", "training.batch_size=16", "--set", "data.max_eval_samples=200"]

    assert main(["train", str(config), *small]) == 0
    err = capfd.readouterr().err
    assert re.search(r"train: 100%.*30/30.*loss=\d\.\d+.*mem=\d+MB.*samples_s=", err), err[-2000:]
    assert (run / "curves.png").stat().st_size > 10_000
    final = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert final["split"] == "eval" and final["step"] == 30 and final["accuracy"] > 0.6, final

    assert main(["eval", str(config), "--adapter", str(run / "adapter"), *small]) == 0
    metrics = json.loads(capfd.readouterr().out)
    assert metrics == {k: final[k] for k in ("loss", "accuracy", "macro_f1")}

    merged = tmp_path / "merged"
    assert main(["merge", "--base", str(minilm_dir()), "--adapter", str(run / "adapter"), "--out", str(merged)]) == 0
    plain = AutoModelForSequenceClassification.from_pretrained(merged).eval()
    adapted = lt.load_adapter(AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=2),
                              run / "adapter").eval()
    sentences = [row["sentence"] for row in read_rows(str(SST2 / "dev.tsv"), limit=64)]
    inputs = AutoTokenizer.from_pretrained(merged)(sentences, padding=True, truncation=True, max_length=32,
                                                   return_tensors="pt")
    with torch.no_grad():
        want, got = adapted(**inputs).logits, plain(**inputs).logits
    assert torch.equal(want.argmax(-1), got.argmax(-1))
    assert (want - got).abs().max() < 1e-4
    assert plain.config.id2label == {0: "0", 1: "1"}
