"""MeZO, the zeroth-order optimizer: it lowers losses, its projected gradient is the
directional derivative, its updates are exactly ``-lr·g·z`` with ``z`` rebuilt from
the seed, the perturbation is undone up to rounding (bounds below), no gradients
exist, and a state dict resumes a run bit for bit.

Tolerances: moving a parameter by ``+εz``, ``-2εz``, ``+εz`` rounds three times,
so it comes back within three half-ulps of ``|p| + 2ε|z|``: ``3·2⁻⁵³·(…)`` in
fp64, ``3·2⁻⁸·(…)`` in bf16. Updates are checked bit for bit against the same
operations replayed on a copy.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import leantune as lt
import leantune.engine.mezo as mezo_module
from leantune.engine import MeZO, causal_lm_loss

from .models import batch, tiny_llama
from .train_helpers import seqcls_config, tiny_gpt2_dir, write_jsonl


def _regression(dtype=torch.float64, n: int = 32, d: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = x @ torch.randn(d, generator=g, dtype=dtype) + 0.3 * torch.randn(n, generator=g, dtype=dtype)
    model = nn.Linear(d, 1).to(dtype)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()

    def loss() -> torch.Tensor:
        return ((model(x).squeeze(-1) - y) ** 2).mean()

    best = torch.linalg.lstsq(torch.cat([x, torch.ones(n, 1, dtype=dtype)], 1), y[:, None]).solution
    best_loss = ((torch.cat([x, torch.ones(n, 1, dtype=dtype)], 1) @ best).squeeze(-1) - y).pow(2).mean()
    return model, loss, float(best_loss)


@pytest.mark.parametrize("n_samples", [1, 4])
def test_mezo_solves_a_least_squares_problem(n_samples):
    torch.manual_seed(0)
    model, loss, best = _regression(torch.float32)
    opt = MeZO(model.parameters(), lr=1e-2, eps=1e-3, n_samples=n_samples, seed=3)
    with torch.no_grad():
        start = float(loss())
    seen = [float(opt.step(loss)) for _ in range(300)]
    with torch.no_grad():
        end = float(loss())
    assert end - best < 0.01 * (start - best), (start, end, best)  # 99 % of the way to the optimum
    assert seen[-1] < seen[0]
    assert all(p.grad is None for p in model.parameters())


def test_projected_gradient_is_the_directional_derivative():
    torch.manual_seed(0)
    a = torch.randn(6, 4, dtype=torch.float64)
    w = nn.Parameter(torch.randn(4, dtype=torch.float64))
    v = nn.Parameter(torch.randn(6, dtype=torch.float64))

    def loss() -> torch.Tensor:
        return (torch.nn.functional.softplus(a @ w) * v).sum() + (w ** 3).sum()

    grad_w, grad_v = torch.autograd.grad(loss(), [w, v])
    errors = []
    for eps in (1e-2, 1e-3):
        opt = MeZO([w, v], lr=0.0, eps=eps, seed=11)
        z_w, z_v = opt.noise(0), opt.noise(1)
        exact = float((grad_w * z_w).sum() + (grad_v * z_v).sum())
        opt.step(loss)
        errors.append(abs(float(opt.projected_grad) - exact))
        assert errors[-1] < 1e-3 * max(1.0, abs(exact)), (eps, float(opt.projected_grad), exact)
    # the central difference is second order: 10x smaller eps, ~100x smaller error
    assert 30 < errors[0] / errors[1] < 300, errors


def test_update_expectation_is_minus_lr_times_the_gradient():
    """E[g·z] = ∇L; averaging many directions (n_samples) recovers the gradient."""
    torch.manual_seed(0)
    h = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 3.0]], dtype=torch.float64)
    b = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    w = nn.Parameter(torch.tensor([0.3, -0.1, 0.7], dtype=torch.float64))
    w0 = w.detach().clone()

    def loss() -> torch.Tensor:
        return 0.5 * w @ h @ w + b @ w

    grad = h @ w0 + b
    opt = MeZO([w], lr=1.0, eps=1e-3, n_samples=3000, seed=5)
    opt.step(loss)
    estimate = w0 - w.detach()  # = mean over samples of g_k·z_k
    assert float((estimate - grad).norm()) < 0.1 * float(grad.norm()), (estimate, grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk", [mezo_module.CHUNK_ELEMENTS, 7], ids=["one-chunk", "chunks-of-7"])
def test_step_is_exactly_the_update_rebuilt_from_the_seed(dtype, chunk, monkeypatch):
    monkeypatch.setattr(mezo_module, "CHUNK_ELEMENTS", chunk)
    torch.manual_seed(0)
    base = torch.randn(5, 8, dtype=dtype)
    params = [nn.Parameter(torch.randn(3, 4, dtype=dtype)), nn.Parameter(base.t())]  # the second is not contiguous
    x = torch.randn(4, 3, dtype=dtype)
    seen: list[list[torch.Tensor]] = []

    def loss() -> torch.Tensor:
        seen.append([p.detach().clone() for p in params])
        assert not torch.is_grad_enabled()
        return torch.tanh(x @ params[0]).sum() + params[1].square().sum() * 0.1

    eps, lr = 1e-3, 0.05
    opt = MeZO(params, lr=lr, eps=eps, seed=42)
    start = [p.detach().clone() for p in params]
    zs = [opt.noise(i) for i in range(2)]
    assert all(z.dtype == dtype and z.shape == p.shape for z, p in zip(zs, params, strict=True))
    returned = opt.step(loss)
    assert len(seen) == 2
    with torch.no_grad():
        # replay the optimizer's own operations on copies: bit for bit
        plus = [p0.clone().add_(z, alpha=eps) for p0, z in zip(start, zs, strict=True)]
        minus = [p.clone().add_(z, alpha=-2 * eps) for p, z in zip(plus, zs, strict=True)]
        loss_plus, loss_minus = loss_of(loss, params, plus), loss_of(loss, params, minus)
        g = (loss_plus - loss_minus) / (2 * eps)
        after = [m.clone().add_(z, alpha=eps).add_(z * (g * -lr)) for m, z in zip(minus, zs, strict=True)]
    for got, want in zip(seen[0], plus, strict=True):
        assert torch.equal(got, want)
    for got, want in zip(seen[1], minus, strict=True):
        assert torch.equal(got, want)
    assert torch.equal(opt.projected_grad, g)
    assert torch.equal(returned, (loss_plus + loss_minus) / 2)
    for p, want, p0, z in zip(params, after, start, zs, strict=True):
        assert torch.equal(p.detach(), want)
        # and close to the ideal p0 - lr·g·z (only the restore's rounding separates them)
        tol = 3 * torch.finfo(dtype).eps * (p0.abs() + 2 * eps * z.abs() + lr * abs(float(g)) * z.abs())
        assert ((p.detach() - (p0 - lr * g * z)).abs() <= tol).all()
    # the next step draws new directions
    assert not torch.equal(opt.noise(0), zs[0])


def test_chunks_bound_the_noise_buffer_and_cover_every_element_once(monkeypatch):
    monkeypatch.setattr(mezo_module, "CHUNK_ELEMENTS", 7)
    shapes = [(3, 4), (3,), (1, 5)]
    params = [nn.Parameter(torch.randn(s)) for s in shapes] + [nn.Parameter(torch.randn(4, 10).t())]
    opt = MeZO([{"params": params[:2]}, {"params": params[2:], "lr": 0.5}], lr=0.1)
    layout = opt._layout()
    covered = [torch.zeros(p.numel(), dtype=torch.int64) for p in params]
    for chunk in layout:
        assert {i for i, *_ in chunk.pieces} <= ({0, 1} if chunk.group == 0 else {2, 3})  # one lr per chunk
        whole = [i for i, start, *_ in chunk.pieces if start is None]
        assert chunk.numel <= 7 or whole == [3]  # only a non-contiguous parameter may exceed the chunk
        for i, start, length, _ in chunk.pieces:
            covered[i][(start or 0):(start or 0) + length] += 1
    assert all(bool((c == 1).all()) for c in covered)
    # small parameters share chunks: 12 + 3 elements take 3 chunks, not one per parameter and piece
    assert sum(c.group == 0 for c in layout) == 3


def loss_of(loss, params: list[nn.Parameter], values: list[torch.Tensor]) -> torch.Tensor:
    """``loss()`` at ``values`` (then puts the parameters back)."""
    keep = [p.detach().clone() for p in params]
    for p, v in zip(params, values, strict=True):
        p.data.copy_(v)
    try:
        return loss()
    finally:
        for p, v in zip(params, keep, strict=True):
            p.data.copy_(v)


@pytest.mark.parametrize("dtype,half_ulp", [(torch.float64, 2.0 ** -53), (torch.bfloat16, 2.0 ** -8)])
def test_perturb_and_restore_drift_is_within_three_roundings(dtype, half_ulp):
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(64, 64).to(dtype))
    p0 = p.detach().clone()
    eps = 1e-2 if dtype == torch.bfloat16 else 1e-3
    opt = MeZO([p], lr=0.0, eps=eps, seed=9)  # lr 0: a step only perturbs and restores
    z = opt.noise(0)
    assert z.dtype == (torch.float32 if dtype == torch.bfloat16 else torch.float64)
    opt.step(lambda: p.float().sum())
    drift = (p.detach().double() - p0.double()).abs()
    bound = 3 * half_ulp * (p0.double().abs() + 2 * eps * z.double().abs())
    assert (drift <= bound).all(), float((drift - bound).max())
    if dtype == torch.float64:
        assert float(drift.max()) < 1e-15
    else:
        assert float(drift.max()) > 0  # bf16 really does drift: the bound is not vacuous


def test_bf16_and_fp32_parameters_see_the_same_directions():
    torch.manual_seed(0)
    w32 = nn.Parameter(torch.randn(10, 10))
    w16 = nn.Parameter(w32.detach().to(torch.bfloat16))
    z32, z16 = MeZO([w32], seed=4).noise(0), MeZO([w16], seed=4).noise(0)
    assert z16.dtype == torch.float32 and torch.equal(z32, z16)
    assert abs(float(z32.mean())) < 0.3 and 0.8 < float(z32.std()) < 1.2


def test_weight_decay_and_param_groups():
    torch.manual_seed(0)
    decayed, plain = nn.Parameter(torch.randn(8, dtype=torch.float64)), nn.Parameter(torch.randn(8, dtype=torch.float64))
    d0, p0 = decayed.detach().clone(), plain.detach().clone()
    opt = MeZO([{"params": [decayed], "weight_decay": 0.5}, {"params": [plain]}], lr=0.1, eps=1e-3, seed=0)
    opt.step(lambda: torch.zeros((), dtype=torch.float64))  # flat loss: g = 0, only decay moves
    assert float(opt.projected_grad) == 0.0
    assert torch.allclose(decayed.detach(), d0 * (1 - 0.1 * 0.5), rtol=0, atol=1e-15)
    assert torch.allclose(plain.detach(), p0, rtol=0, atol=1e-15)


def test_lr_scheduler_drives_the_step_size():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(6, dtype=torch.float64))
    target = torch.randn(6, dtype=torch.float64)
    opt = MeZO([w], lr=0.2, eps=1e-4, seed=1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 ** s)
    for t in range(3):
        before, z = w.detach().clone(), opt.noise(0)
        opt.step(lambda: ((w - target) ** 2).sum())
        want = before - 0.2 * 0.5 ** t * opt.projected_grad * z
        assert torch.allclose(w.detach(), want, rtol=0, atol=1e-14)
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2 * 0.5 ** 3)


def test_state_dict_resumes_identically():
    torch.manual_seed(0)
    x, y = torch.randn(16, 4), torch.randn(16, 2)

    def make() -> tuple[nn.Module, MeZO, torch.optim.lr_scheduler.LRScheduler]:
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
        opt = MeZO(model.parameters(), lr=1e-2, eps=1e-3, weight_decay=0.01, n_samples=2)  # seed from torch's RNG
        return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))

    def train(model: nn.Module, opt: MeZO, sched, steps: int) -> list[float]:
        losses = []
        for _ in range(steps):
            losses.append(float(opt.step(lambda: ((model(x) - y) ** 2).mean())))
            sched.step()
        return losses

    model_a, opt_a, sched_a = make()
    model_b, opt_b, sched_b = make()
    assert opt_a.seed != opt_b.seed
    train(model_a, opt_a, sched_a, 3)
    buf = io.BytesIO()
    torch.save({"opt": opt_a.state_dict(), "sched": sched_a.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model_b.load_state_dict(model_a.state_dict())
    opt_b.load_state_dict(saved["opt"])
    sched_b.load_state_dict(saved["sched"])
    assert (opt_b.seed, opt_b.step_count, opt_b.n_samples) == (opt_a.seed, 3, 2)
    assert opt_b.param_groups[0]["lr"] == opt_a.param_groups[0]["lr"] == pytest.approx(1e-2 / 4)
    before = copy.deepcopy(model_a.state_dict())
    losses_a, losses_b = train(model_a, opt_a, sched_a, 3), train(model_b, opt_b, sched_b, 3)
    assert losses_a == losses_b
    for pa, pb, p0 in zip(model_a.parameters(), model_b.parameters(), before.values(), strict=True):
        assert torch.equal(pa, pb) and not torch.equal(pa, p0)


def test_both_forwards_of_a_step_see_the_same_randomness():
    w = nn.Parameter(torch.zeros(3))
    draws: list[float] = []

    def loss() -> torch.Tensor:
        draws.append(float(torch.rand(())))  # e.g. dropout inside the model
        return w.sum()

    opt = MeZO([w], lr=0.0, seed=0)
    opt.step(loss)
    opt.step(loss)
    assert draws[0] == draws[1] and draws[2] == draws[3] and draws[0] != draws[2]


def test_trains_lora_on_tiny_llama_without_gradients():
    model = lt.adapt(tiny_llama(), lt.LoRA())
    b = batch("llama")
    params = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in params) == lt.trainable_parameters(model)[0] > 0
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}

    def loss() -> torch.Tensor:
        return causal_lm_loss(model, b["input_ids"], b["labels"], attention_mask=b["attention_mask"])

    with torch.no_grad():
        start = float(loss())
    opt = lt.MeZO(params, lr=3e-2, eps=1e-3, seed=0)
    for _ in range(150):
        out = opt.step(loss)
        assert not out.requires_grad
    with torch.no_grad():
        end = float(loss())
    assert end < start - 0.05, (start, end)
    assert all(p.grad is None for p in model.parameters())
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n  # only the adapter moved


def test_bad_input_is_refused_clearly():
    w = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="eps"):
        MeZO([w], eps=0.0)
    with pytest.raises(ValueError, match="eps"):
        MeZO([w], eps=-1e-3)
    with pytest.raises(ValueError, match="lr"):
        MeZO([w], lr=-1.0)
    with pytest.raises(ValueError, match="n_samples"):
        MeZO([w], n_samples=0)
    with pytest.raises(ValueError, match="weight_decay"):
        MeZO([w], weight_decay=-0.1)
    with pytest.raises(ValueError, match="no parameters"):
        MeZO([])
    with pytest.raises(ValueError, match="no parameters"):
        MeZO(p for p in nn.Linear(2, 2).parameters() if p.requires_grad and p.ndim > 5)
    with pytest.raises(ValueError, match="one eps"):
        MeZO([{"params": [w], "eps": 1e-2}, {"params": [nn.Parameter(torch.zeros(1))]}], eps=1e-3)
    with pytest.raises(TypeError, match="floating point"):
        MeZO([torch.zeros(2, dtype=torch.int64)])
    opt = MeZO([w], lr=1e-3)
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    with pytest.raises(ValueError, match="scalar"):
        opt.step(lambda: w * 2)
    # a failing closure leaves the parameters where they were (up to the restore's rounding: 1e-3·|z|·2⁻²³)
    assert w.detach().abs().max() < 1e-9
    with pytest.raises(ValueError, match="no parameters"):
        MeZO([{"params": []}])
    with pytest.raises(ValueError, match="not a MeZO state dict"):
        opt.load_state_dict(torch.optim.SGD([w], lr=0.1).state_dict())


class _NoGradients(lt.Callback):
    """Records, after every step, whether any trainable parameter holds a gradient."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.stop_at, self.grads = stop_at, []

    def on_step_end(self, info) -> None:
        self.grads.append(any(p.grad is not None for p in info.model.parameters()))
        info.stop = info.step == self.stop_at


def _train_losses(run_dir) -> list[float]:
    import json

    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"]


def test_finetune_with_mezo_lowers_a_causal_lm_loss_without_gradients(tmp_path):
    rows = [{"prompt": f"is {w} good or bad ?", "response": "good" if w in ("fine", "great") else "bad"}
            for w in ("fine", "bad", "great", "awful", "fine", "poor", "great", "dull")]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    config = {
        "model": str(tiny_gpt2_dir(chat=True)),
        "task": {"type": "causal-lm", "max_length": 32},
        "data": {"train": str(data)},
        "method": {"name": "lora", "r": 4, "targets": ["c_attn", "c_fc"], "modules_to_save": ["ln_f"]},
        "training": {"max_steps": 30, "batch_size": 8, "learning_rate": 2e-2, "log_every": 5, "schedule": "constant",
                     "optimizer": "mezo", "mezo_eps": 1e-3},
        "output": {"dir": str(tmp_path / "run"), "progress": False},
    }
    watch = _NoGradients()
    result = lt.finetune(None, config, callbacks=[watch])
    losses = _train_losses(tmp_path / "run")
    assert result.step == 30 and len(watch.grads) == 30 and not any(watch.grads)
    assert losses[-1] < losses[0] - 0.1, losses  # one batch (8 rows), seen every step


def test_finetune_with_mezo_resumes_bit_identically(tmp_path):
    def config(out):
        raw = seqcls_config(out, optimizer="mezo", max_steps=10, grad_accum=2, learning_rate=0.1, warmup_steps=2,
                            schedule="cosine", save_every=4, keep_checkpoints=1, mezo_samples=2)
        raw["method"]["dropout"] = 0.2  # both forwards of a step must draw the same masks, resumed or not
        return raw

    whole = lt.finetune(None, config(tmp_path / "whole"))
    part = lt.finetune(None, config(tmp_path / "part"), callbacks=[_NoGradients(stop_at=5)])
    assert part.stopped and part.step == 5
    resumed = lt.finetune(None, config(tmp_path / "part"), resume=True)
    assert resumed.step == whole.step == 10
    from safetensors.torch import load_file

    a = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "part" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any((t != 0).any() for k, t in a.items() if "lora_B" in k)  # MeZO moved B off its zero init
    assert _train_losses(tmp_path / "part") == _train_losses(tmp_path / "whole")


def test_finetune_config_checks_the_optimizer(tmp_path):
    with pytest.raises(ValueError, match="training.optimizer: 'mezzo' is not one of adamw, mezo"):
        lt.finetune(None, seqcls_config(tmp_path / "a", optimizer="mezzo"))
    with pytest.raises(ValueError, match="mezo_eps"):
        lt.finetune(None, seqcls_config(tmp_path / "b", optimizer="mezo", mezo_eps=0.0))
    raw = seqcls_config(tmp_path / "c", optimizer="mezo")
    raw["method"] = {"name": "adalora", "init_r": 4, "target_r": 2, "targets": ["query", "value"]}
    with pytest.raises(ValueError, match="mezo runs in one process and for methods without a training schedule"):
        lt.finetune(None, raw)
