"""Causal attention without a materialised mask while ``lt.compile`` traces a transformers model.

transformers hands SDPA ``is_causal=True`` and no mask when nothing is padded, the queries
cover all keys and each row holds one sequence, so that the fast kernels (cuDNN, flash)
skip the masked half of the scores. Under ``torch.compile`` it often cannot tell, because
its tests read tensor values, which a trace does not have:

- "is the padding mask all ones?": some versions (5.17, the device image's, among them)
  answer "cannot tell" whenever dynamo traces, even with no padding mask at all;
- "are several sequences packed into a row?": read from ``position_ids``, which the
  decoder makes itself when given none; every version answers "cannot tell" when traced
  without a cache, which is how :func:`~leantune.engine.causal_lm_loss` runs the decoder.

Either answer builds the full (S × S) mask, and SDPA then computes every score and masks
half of them. Here both questions are answered from static facts where those suffice: no
padding mask and as many queries as keys; positions the decoder numbered itself (set by
``causal_lm_loss`` for its call, :data:`DEFAULT_POSITIONS`). Exact: ``is_causal`` is the
same lower-triangular mask. Every other case goes to transformers' own test unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
from collections.abc import Callable, Iterator


class _Flag:
    """A switch that dynamo reads while tracing (a plain object's attribute: a traced
    assignment is replayed after the graph, and later reads in the trace see it)."""

    def __init__(self) -> None:
        self.on = False


DEFAULT_POSITIONS = _Flag()
"""On while ``causal_lm_loss`` runs a decoder without ``position_ids``: each row is then one
sequence numbered 0, 1, ... by the decoder itself, so no packing needs detecting."""


@contextlib.contextmanager
def causal_mask_skipped() -> Iterator[None]:
    """While active, transformers' SDPA mask builder returns no mask (so SDPA runs with
    ``is_causal``) wherever static facts show the mask is plain causal, traced or not.

    A no-op where transformers' masking module is not loaded (not an HF model) or lacks
    these tests (other versions).
    """
    module = sys.modules.get("transformers.masking_utils")
    originals = {name: getattr(module, name, None) for name in _STATIC_FIRST}
    patched = {name: _STATIC_FIRST[name](f) for name, f in originals.items() if f is not None}
    for name, f in patched.items():
        setattr(module, name, f)
    try:
        yield
    finally:
        for name in patched:
            setattr(module, name, originals[name])


@functools.cache
def _unpadded_full_length_first(original: Callable[..., bool]) -> Callable[..., bool]:
    """``_ignore_causal_mask_sdpa`` answering "skip" from static facts first. Cached: one
    wrapper per original, so that dynamo's guard on the module global holds from call to call."""
    names = list(inspect.signature(original).parameters)

    @functools.wraps(original)
    def decide(*args, **kwargs) -> bool:
        given = dict(zip(names, args, strict=False)) | kwargs
        padding_mask, q_length, kv_length = (given.get(name) for name in names[:3])
        window = given.get("local_attention_size")
        static = all(isinstance(n, int) and not isinstance(n, bool) for n in (q_length, kv_length))
        if padding_mask is None and static and q_length == kv_length and (window is None or kv_length < window):
            return True
        return original(*args, **kwargs)

    return decide


@functools.cache
def _default_positions_first(original: Callable[..., object]) -> Callable[..., object]:
    """``find_packed_sequence_indices`` answering "not packed" for the decoder's own positions."""

    @functools.wraps(original)
    def find(*args, **kwargs):
        return None if DEFAULT_POSITIONS.on else original(*args, **kwargs)

    return find


_STATIC_FIRST = {"_ignore_causal_mask_sdpa": _unpadded_full_length_first,
                 "find_packed_sequence_indices": _default_positions_first}
