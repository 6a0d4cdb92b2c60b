"""MeZO: a zeroth-order optimizer that trains with forward passes only.

After Malladi et al. 2023, "Fine-Tuning Language Models with Just Forward
Passes". A step estimates the gradient along one random direction ``z`` from two
losses, at ``θ + εz`` and ``θ - εz``, and moves along ``z``::

    g = (L(θ + εz) - L(θ - εz)) / 2ε        # projected gradient, a scalar
    θ ← θ - lr · (g·z + weight_decay·θ)

Why it needs only the memory of inference: there is no backward pass (the loss
runs under ``torch.no_grad``, so no activations are kept and no ``.grad``
exists), and ``z`` is never stored. It is regenerated, as often as it is needed,
from a seed, one chunk at a time: the parameters of one optimizer group (and
one device and ``z`` dtype), in order, are laid end to end and cut into chunks
of at most :data:`CHUNK_ELEMENTS` values; a chunk's ``z`` comes from a generator
on its device seeded from (base seed, step, sample, chunk number), is added to
the parameter pieces it covers, and is freed. So the extra memory is one chunk
(64 MiB in fp32), even for a 128k-token embedding, and not a copy of the model.
Chunks that span many parameters (LoRA's hundreds of small factors) also cost
one random-number kernel and one multi-tensor add each, not launches per
parameter: on a 1B Llama with LoRA r=16 (224 tensors) on an H100, one pass over
the parameters took about 8 ms of host time with a generator per parameter and
2-3 ms so; with no host sync in a step, that overlaps the forwards, and an eager
step costs about two LoRA forwards (78 ms against 2 × 40 ms).

Peak memory (same H100, 1B Llama in bf16, 4 × 1024 tokens, chunked loss): a
forward with the loss under no_grad peaked at 2.98 GiB; MeZO on the LoRA
parameters at 3.02 GiB (1.01 ×), MeZO on all 1.2 B parameters at 2.98 GiB (1.00 ×).

It works on any set of floating-point parameters: a method's trainable
parameters after ``lt.adapt`` or a whole model's.

Precision. ``z`` is drawn in fp32 for fp16/bf16/fp32 parameters and in fp64
for fp64 ones (``promote_types(dtype, float32)``). So a bf16 model and its fp32
copy explore the same directions, and the in-place ``p += c·z`` is computed in
fp32 and rounded to the parameter's dtype once. Moving away and back is not
exact in floating point: each of the three in-place adds rounds once, so after
a step's perturb/restore a parameter is off by at most three half-ulps of
``|p| + 2ε|z|`` (≤ 3·2⁻⁸·(|p| + 2ε|z|) in bf16, ~1e-16 relative in fp64).
In bf16 this drift and the update ``lr·g·z`` are both near one ulp (a smaller
update is rounded away), so keep trained parameters in fp32 where it matters:
leantune deltas keep their own dtype and compute in the base's, so fp32 deltas
on a bf16 base cost little.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

# Largest piece of ``z`` generated at once (64 MiB in fp32); part of the layout that fixes
# the directions, so changing it changes which ``z`` a seed gives.
CHUNK_ELEMENTS = 1 << 24
_MASK64 = (1 << 64) - 1


@dataclass
class _Chunk:
    """One contiguous run of ``z``: ``pieces`` are (parameter index, start in the flattened
    parameter or None for a whole non-contiguous parameter, length, offset in the chunk)."""

    number: int  # position in the layout: part of the seed
    device: torch.device
    dtype: torch.dtype
    group: int
    numel: int = 0
    pieces: list[tuple[int, int | None, int, int]] = field(default_factory=list)


# (chunk, the parameter pieces it covers, their lengths, their shapes where whole)
_Targets = tuple[_Chunk, list[torch.Tensor], list[int], list[torch.Size | None]]


def _splitmix64(x: int) -> int:
    """A well-mixed 64-bit hash, so that nearby (step, index) pairs get unrelated seeds."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def mix_seed(*parts: int) -> int:
    """One generator seed (63 bits, valid on every device) from several integers."""
    h = 0
    for p in parts:
        h = _splitmix64(h ^ (p & _MASK64))
    return h >> 1


class MeZO(torch.optim.Optimizer):
    """Zeroth-order SGD with seed-regenerated perturbations (MeZO).

    ``MeZO(params, lr=1e-6, eps=1e-3, weight_decay=0.0, n_samples=1, seed=None)``;
    ``params`` may be parameter groups with their own ``lr`` and ``weight_decay``
    (``eps`` must be one value: the finite difference is along one direction).
    ``step(closure)`` needs a closure that returns the loss (a 0-d tensor or a
    float) of the current parameters; it is called ``2 · n_samples`` times per
    step under ``torch.no_grad``, each pair with the same RNG state (so dropout
    noise cancels in the difference). The step returns the mean of the losses
    at ``θ ± εz``, which estimates ``L(θ)`` to second order in ε.

    ``n_samples > 1`` averages the update over that many directions (the
    paper's ``n``). ``seed=None`` draws the base seed from torch's global RNG
    (reproducible under ``torch.manual_seed``). ``state_dict`` carries the base
    seed and the step counter, so a resumed run draws the same directions.
    A non-finite projected gradient gives no update for that direction (the
    parameters are still restored; the returned loss shows the problem).
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-6,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        n_samples: int = 1,
        seed: int | None = None,
    ) -> None:
        if not lr >= 0.0:
            raise ValueError(f"MeZO: lr must be >= 0, got {lr}")
        if not eps > 0.0:
            raise ValueError(f"MeZO: eps (the perturbation size) must be > 0, got {eps}")
        if not weight_decay >= 0.0:
            raise ValueError(f"MeZO: weight_decay must be >= 0, got {weight_decay}")
        if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
            raise ValueError(f"MeZO: n_samples must be an integer >= 1, got {n_samples!r}")
        if isinstance(params, torch.Tensor):
            raise TypeError("MeZO: params must be an iterable of tensors or of parameter groups, not one tensor")
        params = list(params)
        no_params = ValueError("MeZO got no parameters to train: pass e.g. "
                               "[p for p in model.parameters() if p.requires_grad]")
        if not params:
            raise no_params
        super().__init__(params, dict(lr=lr, eps=eps, weight_decay=weight_decay))
        if not any(group["params"] for group in self.param_groups):
            raise no_params
        for group in self.param_groups:
            for p in group["params"]:
                if not p.is_floating_point():
                    raise TypeError(f"MeZO: parameters must be floating point, got {p.dtype}")
            if not group["lr"] >= 0.0 or not group["weight_decay"] >= 0.0:
                raise ValueError("MeZO: every parameter group needs lr >= 0 and weight_decay >= 0")
        self._check_eps()
        self.n_samples = n_samples
        self.seed = int(torch.randint(0, 2**62, ()).item()) if seed is None else int(seed)
        self.step_count = 0
        self.projected_grad: torch.Tensor | None = None  # mean g of the last step, for logging
        self._generators: dict[torch.device, torch.Generator] = {}

    # --- directions -------------------------------------------------------

    def _check_eps(self) -> float:
        eps = {g["eps"] for g in self.param_groups}
        if len(eps) != 1 or not next(iter(eps)) > 0.0:
            raise ValueError(f"MeZO: every parameter group must share one eps > 0, got {sorted(eps)}")
        return eps.pop()

    def _params(self) -> list[torch.Tensor]:
        """Every parameter, in the fixed order (groups, then their lists) that the layout follows."""
        return [p for group in self.param_groups for p in group["params"]]

    def _layout(self) -> list[_Chunk]:
        """Cut each (group, device, z dtype)'s parameters, laid end to end, into chunks.

        A contiguous parameter may straddle chunks (its flat view is sliced); a
        non-contiguous one has no flat view, so it goes whole into one chunk
        (a chunk of its own where it does not fit).
        """
        chunks: list[_Chunk] = []
        index = 0
        for gi, group in enumerate(self.param_groups):
            current: dict[tuple[torch.device, torch.dtype], _Chunk] = {}
            for p in group["params"]:
                key = (p.device, torch.promote_types(p.dtype, torch.float32))
                n, whole, start = p.numel(), not p.is_contiguous(), 0
                while start < n:
                    c = current.get(key)
                    room = CHUNK_ELEMENTS - c.numel if c is not None else 0
                    if c is None or room <= 0 or (whole and n > room):
                        c = current[key] = _Chunk(len(chunks), key[0], key[1], gi)
                        chunks.append(c)
                        room = CHUNK_ELEMENTS
                    take = n if whole else min(n - start, room)
                    c.pieces.append((index, None if whole else start, take, c.numel))
                    c.numel += take
                    start += take
                index += 1
        return chunks

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device)
        return self._generators[device]

    def _z(self, chunk: _Chunk, step: int, sample: int) -> torch.Tensor:
        """The chunk's ``z`` at (step, sample): fresh memory the caller may overwrite."""
        gen = self._generator(chunk.device)
        gen.manual_seed(mix_seed(self.seed, step, sample, chunk.number))
        return torch.randn(chunk.numel, generator=gen, device=chunk.device, dtype=chunk.dtype)

    def _targets(self, chunks: list[_Chunk]) -> list[_Targets]:
        """Per chunk: the parameter pieces it covers, their lengths and, for whole parameters,
        their shapes. Built once a step: the passes over the parameters reuse the views."""
        params = self._params()
        out = []
        for chunk in chunks:
            pieces, lengths, shapes = [], [], []
            for i, start, length, _ in chunk.pieces:  # consecutive in the chunk, in this order
                p = params[i]
                pieces.append(p if start is None else p.view(-1)[start:start + length])
                lengths.append(length)
                shapes.append(p.shape if start is None else None)
            out.append((chunk, pieces, lengths, shapes))
        return out

    def _chunks(self, targets: list[_Targets], step: int, sample: int
                ) -> Iterator[tuple[_Chunk, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]]:
        """(chunk, its z, the parameter pieces it covers, the matching views of z), one chunk at a time."""
        for chunk, pieces, lengths, shapes in targets:
            z = self._z(chunk, step, sample)
            zs = [v if shape is None else v.view(shape) for v, shape in zip(z.split(lengths), shapes, strict=True)]
            yield chunk, z, pieces, zs

    def noise(self, index: int, step: int | None = None, sample: int = 0) -> torch.Tensor:
        """The direction ``z`` of parameter ``index`` (global order over groups) at ``step``
        (default: the next step) and ``sample``, as the optimizer draws it: for inspection
        and tests; it allocates the full tensor, which the optimizer itself never does."""
        params = self._params()
        if not 0 <= index < len(params):
            raise IndexError(f"MeZO has no parameter {index}")
        step = self.step_count if step is None else step
        out = torch.empty(params[index].shape, dtype=torch.promote_types(params[index].dtype, torch.float32),
                          device=params[index].device)
        for chunk in self._layout():
            for i, start, length, offset in chunk.pieces:
                if i == index:
                    z = self._z(chunk, step, sample)[offset:offset + length]
                    out.view(-1)[start or 0:(start or 0) + length] = z
        return out

    def _perturb(self, targets: list[_Targets], sample: int, scale: float) -> None:
        """``p += scale · z`` for every parameter, in place, a chunk at a time."""
        for _, _, pieces, zs in self._chunks(targets, self.step_count, sample):
            torch._foreach_add_(pieces, zs, alpha=scale)

    # --- the step ---------------------------------------------------------

    @staticmethod
    def _evaluate(closure: Callable[[], Any]) -> torch.Tensor:
        loss = closure()
        if not isinstance(loss, torch.Tensor):
            loss = torch.tensor(float(loss), dtype=torch.float64)
        if loss.numel() != 1:
            raise ValueError(f"MeZO: the closure must return a scalar loss, got shape {tuple(loss.shape)}")
        return loss.detach().reshape(()).to(torch.promote_types(loss.dtype, torch.float32))

    @staticmethod
    def _rng_state() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        return torch.get_rng_state(), cuda

    @staticmethod
    def _set_rng_state(state: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state_all(state[1])

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> torch.Tensor:  # type: ignore[override]
        """One MeZO step; ``closure()`` returns the loss of the current parameters."""
        if closure is None:
            raise ValueError("MeZO.step needs a closure that returns the loss, e.g. "
                             "opt.step(lambda: loss_fn(model, batch)): it evaluates the loss itself, twice")
        eps = self._check_eps()
        layout = self._targets(self._layout())
        grads, losses = [], []
        for k in range(self.n_samples):
            rng = self._rng_state()
            offset = 0.0  # where the parameters are, in units of z: undone even if the closure raises
            try:
                self._perturb(layout, k, eps)
                offset = eps
                loss_plus = self._evaluate(closure)
                self._set_rng_state(rng)  # the same dropout masks for both sides
                self._perturb(layout, k, -2.0 * eps)
                offset = -eps
                loss_minus = self._evaluate(closure)
            finally:
                if offset:
                    self._perturb(layout, k, -offset)
            g = (loss_plus - loss_minus.to(loss_plus.device)) / (2.0 * eps)
            grads.append(torch.where(torch.isfinite(g), g, torch.zeros_like(g)))  # no host sync
            losses.append((loss_plus + loss_minus.to(loss_plus.device)) / 2)
        for group in self.param_groups:
            if group["lr"] != 0.0 and group["weight_decay"] != 0.0 and group["params"]:
                torch._foreach_mul_(group["params"], 1.0 - group["lr"] * group["weight_decay"])
        on_device: dict[torch.device, list[torch.Tensor]] = {}
        moving = [t for t in layout if self.param_groups[t[0].group]["lr"] != 0.0]
        for k in range(self.n_samples):
            for chunk, z, pieces, zs in self._chunks(moving, self.step_count, k):
                lr = self.param_groups[chunk.group]["lr"]
                if chunk.device not in on_device:
                    on_device[chunk.device] = [g.to(chunk.device, non_blocking=True) for g in grads]
                z.mul_(on_device[chunk.device][k] * (-lr / self.n_samples))  # no host sync
                torch._foreach_add_(pieces, zs)
        self.step_count += 1
        self.projected_grad = torch.stack(grads).mean()
        return torch.stack(losses).mean()

    # --- checkpoints ------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The usual optimizer state plus the base seed and step counter, which fix all future directions."""
        sd = super().state_dict()
        sd["mezo"] = dict(seed=self.seed, step=self.step_count, n_samples=self.n_samples)
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore groups (lr, eps, weight decay), seed and step counter."""
        state_dict = dict(state_dict)
        extra = state_dict.pop("mezo", None)
        if extra is None:
            raise ValueError("MeZO.load_state_dict: not a MeZO state dict (no 'mezo' entry with seed and step)")
        super().load_state_dict(state_dict)
        self.seed, self.step_count, self.n_samples = int(extra["seed"]), int(extra["step"]), int(extra["n_samples"])
