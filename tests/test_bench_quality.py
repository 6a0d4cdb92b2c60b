"""`leantune bench quality` on a tiny budget: the table and the plot come out of real runs."""

from __future__ import annotations

import json

import pytest

from leantune.bench import quality
from leantune.data import sst2


@pytest.mark.skipif(not sst2.default_dir().is_dir(), reason=f"SST-2 not found at {sst2.default_dir()}")
def test_quality_bench_writes_table_plot_and_picks_lr_on_dev(tmp_path):
    rows = quality.bench(["lora", "ia3"], tmp_path, steps=2, lrs=[1e-4, 1e-3], dev_size=16, test_size=16, seed=0)
    assert [r.method for r in rows] == ["lora", "ia3"]
    for r in rows:
        assert set(r.grid) == {"0.0001", "0.001"}
        assert r.dev_accuracy == max(r.grid.values()), "the reported run is the best one on dev"
        assert 0.0 <= r.test_accuracy <= 1.0 and r.trainable > 0 and r.seconds_per_step > 0
    text = quality.report(tmp_path)
    assert "| lora |" in text and "| ia3 |" in text
    assert (tmp_path / "quality.png").stat().st_size > 1000
    saved = json.loads((tmp_path / "results.json").read_text())
    assert {r["method"] for r in saved["rows"]} == {"lora", "ia3"}
    ia3 = next(r for r in rows if r.method == "ia3")
    lora = next(r for r in rows if r.method == "lora")
    assert ia3.trainable < lora.trainable


def test_unknown_method_fails_before_training(tmp_path):
    with pytest.raises(KeyError, match="Did you mean 'lora'"):
        quality.bench(["lroa"], tmp_path, steps=1, lrs=None, dev_size=4, test_size=4, seed=0)
