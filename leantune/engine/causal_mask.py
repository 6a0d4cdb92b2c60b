"""Causal attention without a materialised mask while ``lt.compile`` traces a transformers model.

transformers hands SDPA ``is_causal=True`` and no mask when nothing is padded and the
queries cover all keys, so that the fast kernels (cuDNN, flash) skip the masked half of
the scores. Under ``torch.compile`` some versions (5.17, the device image's, among them)
never take that path: their test "is the padding mask all ones?" is written for eager
tensors and answers "cannot tell" whenever dynamo traces, even when there is no padding
mask at all. They then build the full (S × S) causal mask, and SDPA computes every score
and masks half of them: measured on an H100 (1B Llama, 4 × 1024 tokens) cuDNN's attention
took ~150 µs forward in the model against 60 µs with ``is_causal`` (README, "Attention").

With no padding mask and as many queries as keys the decision needs no data, so while
:func:`causal_mask_skipped` is active it is made the eager way. Exact: ``is_causal`` is the
same lower-triangular mask. Any other case goes to transformers' own test unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
from collections.abc import Callable, Iterator

_DECIDER = "_ignore_causal_mask_sdpa"


@contextlib.contextmanager
def causal_mask_skipped() -> Iterator[None]:
    """While active, transformers' SDPA mask builder returns no mask (so SDPA runs with
    ``is_causal``) for unpadded inputs whose queries cover all keys, traced or not.

    A no-op where transformers' masking module is not loaded (not an HF model) or has no
    such decision (other versions).
    """
    module = sys.modules.get("transformers.masking_utils")
    original = getattr(module, _DECIDER, None)
    if original is None:
        yield
        return
    setattr(module, _DECIDER, _static_decider(original))
    try:
        yield
    finally:
        setattr(module, _DECIDER, original)


@functools.cache
def _static_decider(original: Callable[..., bool]) -> Callable[..., bool]:
    """``original`` answering "skip the mask" from static facts first. Cached: one wrapper per
    original, so that dynamo's guard on the module global holds from one call to the next."""
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

