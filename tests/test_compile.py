"""``lt.compile``: same loss and gradients as eager, fewer bytes kept for backward."""

from __future__ import annotations

import functools
import math
from functools import partial

import pytest
import torch
from torch._functorch import config as partitioner_config

import leantune as lt
from leantune.engine import causal_lm_loss

from .models import VOCAB, tiny_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# aot_eager with inductor's decompositions and its min-cut partitioner: the same choice of
# what to keep for backward as inductor, without generating kernels (seconds on a CPU).
BACKEND = "aot_eager_decomp_partition"
BATCH, SEQ = 2, 24


def _step(compiler) -> tuple[int, float, list[torch.Tensor]]:
    """(activation elements kept for backward, loss, LoRA gradients) of one training step."""
    model = tiny_llama()
    lt.adapt(model, lt.LoRA(r=4, targets=TARGETS, init="random"))
    torch._dynamo.reset()
    loss_fn = partial(causal_lm_loss, model) if compiler is None else compiler(partial(causal_lm_loss, model),
                                                                              backend=BACKEND)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    kept = [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.dim() and t.shape[0] in (BATCH, BATCH * SEQ):  # activations, not weights
            kept[0] += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(ids, ids)
    loss.backward()
    return kept[0], loss.item(), [p.grad for p in model.parameters() if p.requires_grad]


@pytest.fixture(scope="module")
def steps() -> dict[str, tuple[int, float, list[torch.Tensor]]]:
    return {"eager": _step(None), "torch": _step(torch.compile), "lt": _step(lt.compile),
            "lt_plain": _step(partial(lt.compile, recompute_cheap=False, skip_causal_mask=False)),
            "lt_unmasked": _step(partial(lt.compile, recompute_cheap=False))}


def test_lt_compile_keeps_less_for_backward_than_torch_compile(steps):
    # The norm outputs and SiLU(gate)·up that LoRA's A-gradients read are rebuilt instead.
    assert steps["lt"][0] < 0.85 * steps["torch"][0], (steps["lt"][0], steps["torch"][0])


def test_lt_compile_gives_the_eager_loss_and_gradients(steps):
    _, eager_loss, eager_grads = steps["eager"]
    _, loss, grads = steps["lt"]
    assert loss == pytest.approx(eager_loss, rel=1e-5)
    assert len(grads) == len(eager_grads) == 2 * len(TARGETS) * 2
    for got, want in zip(grads, eager_grads, strict=True):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)


def test_lt_compile_leaves_the_global_partitioner_setting_alone(steps):
    assert partitioner_config.ban_recompute_materialized_backward is True


def test_recompute_cheap_false_keeps_what_torch_compile_keeps(steps):
    assert steps["lt_plain"][0] == steps["torch"][0]
    assert steps["lt_plain"][1] == pytest.approx(steps["eager"][1], rel=1e-5)


def test_skipping_the_causal_mask_keeps_less_for_backward(steps):
    mask = BATCH * SEQ * SEQ  # the (batch, 1, S, S) mask, which SDPA's backward reads again
    assert steps["torch"][0] - steps["lt_unmasked"][0] >= mask
    assert steps["lt_unmasked"][1] == pytest.approx(steps["eager"][1], rel=1e-5)


def _sft_losses(out, model: torch.nn.Module | None = None, **training) -> list[float]:
    """Training losses of 4 steps of a LoRA causal-LM run on the tiny GPT-2 (``model``: given, else loaded)."""
    from leantune.train.logs import read_metrics
    from leantune.train.runner import train

    from .test_train_tasks import sft_rows
    from .train_helpers import tiny_gpt2_dir, write_jsonl

    out.mkdir(parents=True, exist_ok=True)
    train_file = write_jsonl(out / "sft.jsonl", sft_rows(24))
    train(model, {
        "model": str(tiny_gpt2_dir(chat=True)), "task": {"type": "causal-lm", "max_length": 32},
        "data": {"train": str(train_file)},
        "method": {"name": "lora", "r": 4, "targets": ["c_attn", "c_fc"]},
        "training": {"max_steps": 4, "batch_size": 8, "learning_rate": 5e-2, "log_every": 1, **training},
        "output": {"dir": str(out / "run"), "progress": False},
    })
    return [r["loss"] for r in read_metrics(out / "run" / "metrics.jsonl") if r["split"] == "train"]


@pytest.mark.parametrize(("setting", "mode"), [(True, None), ("cuda_graphs", "reduce-overhead")])
def test_training_compile_gives_the_eager_runs_losses(tmp_path, monkeypatch, setting, mode):
    import leantune.train.loop as loop_module

    traced = []

    def fast_compile(fn, **kwargs):  # the test's backend: the same partitioner, no kernel generation
        traced.append(kwargs.pop("mode", None))  # a mode is inductor's: this backend takes none
        return lt.compile(fn, backend=BACKEND, **kwargs)

    monkeypatch.setattr(loop_module, "compile_function", fast_compile)
    eager, compiled = _sft_losses(tmp_path / "eager"), _sft_losses(tmp_path / "compiled", compile=setting)
    assert traced == [mode] and len(eager) == len(compiled) == 4
    assert compiled == pytest.approx(eager, rel=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (runs on the lent GPU)")
def test_training_with_cuda_graphs_replays_the_compiled_runs_losses_on_cuda(tmp_path):
    compiled = _sft_losses(tmp_path / "compiled", compile=True)
    graphs = _sft_losses(tmp_path / "graphs", compile="cuda_graphs")
    assert len(graphs) == 4 and all(math.isfinite(x) for x in graphs)
    assert graphs == pytest.approx(compiled, rel=1e-3)


def test_training_compile_takes_cuda_graphs_in_one_process_only(tmp_path):
    from leantune.train.config import ConfigError, TrainingSection, build
    from leantune.train.distributed import Dist
    from leantune.train.loop import Loop

    assert TrainingSection(compile="cuda_graphs").check() == []
    problems = TrainingSection(compile="graphs").check()
    assert any("training.compile" in p and "cuda_graphs" in p and "'graphs'" in p for p in problems)
    with pytest.raises(ConfigError, match="training.compile"):
        build({"model": "m", "method": {"name": "lora"}, "training": {"compile": 3}})
    loop = Loop.__new__(Loop)  # only what _compiled reads: the setting and the world size
    loop.cfg, loop.dist = TrainingSection(compile="cuda_graphs"), Dist(rank=0, world=2, mode="ddp")
    with pytest.raises(ValueError, match="one process"):
        loop._compiled(lambda: None)


def test_training_lean_gives_the_same_losses_and_checkpoints_every_layer(tmp_path):
    from transformers import AutoModelForCausalLM

    from .train_helpers import tiny_gpt2_dir

    plain = _sft_losses(tmp_path / "plain")
    for keep_attention in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir(chat=True))
        lean = _sft_losses(tmp_path / f"lean-{keep_attention}", model, lean=True, lean_keep_attention=keep_attention)
        assert lean == pytest.approx(plain, rel=1e-5), "lean mode trains the same function"
        wrapped = [block.__dict__.get("forward") for block in model.transformer.h]
        assert all(getattr(f, "leantune_keeps_attention", None) is keep_attention for f in wrapped), wrapped
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir(chat=True))
    assert _sft_losses(tmp_path / "lean-first", model, lean=True, lean_layers=1) == pytest.approx(plain, rel=1e-5)
    assert [hasattr(block.__dict__.get("forward"), "leantune_lean") for block in model.transformer.h] == [True, False]


def test_training_compile_with_mezo_is_refused():
    from leantune.train.config import TrainingSection

    problems = TrainingSection(compile=True, optimizer="mezo").check()
    assert any("training.compile" in p and "mezo" in p for p in problems)


@pytest.mark.parametrize(("settings", "key", "says"), [
    (dict(lean=True, optimizer="mezo"), "training.lean", "mezo"),
    (dict(lean=True, distributed="fsdp2"), "training.lean", "fsdp2"),
    (dict(lean_keep_attention=True), "training.lean_keep_attention", "lean: true"),
    (dict(lean_layers=1), "training.lean_layers", "lean: true"),
    (dict(lean=True, lean_layers=0), "training.lean_layers", "at least 1"),
])
def test_training_lean_settings_that_cannot_work_are_refused(settings, key, says):
    from leantune.train.config import TrainingSection

    problems = TrainingSection(**settings).check()
    assert [p for p in problems if p.startswith(key) and says in p], problems
    assert not TrainingSection(lean=True, lean_keep_attention=True, lean_layers=3).check()


def test_lt_compile_of_a_module_stays_a_module_and_keeps_less():
    def run(compiler) -> tuple[torch.nn.Module, int, float]:
        torch._dynamo.reset()
        model = tiny_llama()
        lt.adapt(model, lt.LoRA(r=4, targets=TARGETS, init="random"))
        compiled = compiler(model, backend=BACKEND)
        ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
        kept = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.dim() and t.shape[0] in (BATCH, BATCH * SEQ):
                kept[0] += t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = compiled(input_ids=ids, labels=ids).loss
        loss.backward()
        return compiled, kept[0], loss.item()

    plain, plain_kept, plain_loss = run(torch.compile)
    ours, ours_kept, ours_loss = run(lt.compile)
    assert isinstance(ours, torch.nn.Module) and ours.state_dict().keys() == plain.state_dict().keys()
    assert ours_kept < plain_kept and ours_loss == pytest.approx(plain_loss, rel=1e-6)


def _sdpa_masks(compiler, fn, *inputs: torch.Tensor) -> tuple[list[bool], torch.Tensor]:
    """(whether each traced SDPA call got an explicit mask, the output) of ``compiler(fn)(*inputs)``."""
    masked = []

    def recording(gm: torch.fx.GraphModule, example_inputs):
        masked.extend(node.kwargs.get("attn_mask") is not None for node in gm.graph.nodes
                      if node.target is torch.nn.functional.scaled_dot_product_attention)
        return gm.forward

    torch._dynamo.reset()
    return masked, compiler(fn, backend=recording)(*inputs)


def _never_skips_when_traced(monkeypatch) -> None:
    """Make the installed transformers decide like 5.17's: no ``is_causal`` while dynamo traces."""
    from transformers import masking_utils

    original = masking_utils._ignore_causal_mask_sdpa

    @functools.wraps(original)
    def old_style(*args, **kwargs):
        return False if torch.compiler.is_compiling() else original(*args, **kwargs)

    monkeypatch.setattr(masking_utils, "_ignore_causal_mask_sdpa", old_style)


def test_lt_compile_runs_causal_attention_without_a_mask_where_torch_compile_builds_one(monkeypatch):
    _never_skips_when_traced(monkeypatch)
    from transformers import masking_utils

    decider = masking_utils._ignore_causal_mask_sdpa
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = model(input_ids=ids).logits
        logits = lambda i: model(input_ids=i).logits  # noqa: E731
        torch_masks, torch_logits = _sdpa_masks(torch.compile, logits, ids)
        lt_masks, lt_logits = _sdpa_masks(lt.compile, logits, ids)
        kept_masks, _ = _sdpa_masks(partial(lt.compile, skip_causal_mask=False), logits, ids)
    assert torch_masks == kept_masks == [True, True], "the emulated transformers builds the mask when traced"
    assert lt_masks == [False, False]
    assert torch.allclose(lt_logits, eager, atol=1e-5) and torch.allclose(torch_logits, eager, atol=1e-5)
    assert masking_utils._ignore_causal_mask_sdpa is decider, "the decision is restored after the call"


def test_lt_compile_keeps_the_mask_of_padded_inputs(monkeypatch):
    _never_skips_when_traced(monkeypatch)
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding: a mask SDPA must see
    with torch.no_grad():
        masked, got = _sdpa_masks(lt.compile, lambda i, m: model(input_ids=i, attention_mask=m).logits, ids, mask)
        want = model(input_ids=ids, attention_mask=mask).logits
    assert masked == [True, True]
    assert torch.allclose(got[:, 5:], want[:, 5:], atol=1e-5)


def test_lt_compile_does_not_recompile_from_one_call_to_the_next(monkeypatch):
    _never_skips_when_traced(monkeypatch)
    model = tiny_llama()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    step = lt.compile(lambda i: model(input_ids=i).logits, backend="eager")
    for seed in range(3):
        step(torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed)))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_lt_compile_runs_causal_attention_without_a_mask_with_the_installed_transformers():
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        masks, _ = _sdpa_masks(lt.compile, lambda i: model(input_ids=i).logits, ids)
    assert masks == [False, False]


def test_lt_compile_of_the_chunked_loss_runs_causal_attention_without_a_mask():
    # causal_lm_loss runs the decoder without a cache; traced, transformers cannot rule out
    # packed rows from the positions and builds the mask, unless told the positions are its own.
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        masks, loss = _sdpa_masks(lt.compile, partial(causal_lm_loss, model), ids, ids)
        torch_masks, _ = _sdpa_masks(torch.compile, partial(causal_lm_loss, model), ids, ids)
        eager = causal_lm_loss(model, ids, ids)
    assert masks == [False, False] and torch_masks == [True, True]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2, "one graph each, no break"
    assert loss.item() == pytest.approx(eager.item(), rel=1e-5)


def test_lt_compile_keeps_the_mask_of_packed_rows():
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    half = SEQ // 2
    positions = torch.cat([torch.arange(half), torch.arange(SEQ - half)]).expand(BATCH, -1)  # two sequences a row
    with torch.no_grad():
        masks, loss = _sdpa_masks(lt.compile, partial(causal_lm_loss, model, position_ids=positions), ids, ids)
        eager = causal_lm_loss(model, ids, ids, position_ids=positions)
        unpacked = causal_lm_loss(model, ids, ids)
    assert masks == [True, True]
    assert loss.item() == pytest.approx(eager.item(), rel=1e-5) and eager.item() != pytest.approx(unpacked.item())
