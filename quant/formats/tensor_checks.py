"""What a checkpoint's tensors must be before any of them is copied into a model.

``load_state_dict`` converts dtypes and broadcasts shapes without a word: scales stored as bf16, a
``qweight`` as int16 or an embedding as uint32 would load as a different model, and a bias of shape ``[1]``
would become a constant. So every stored tensor is checked first against the skeleton the loader built:
exact dtype and shape, and finite values for every floating tensor (no real checkpoint holds NaN/Inf).
"""

from __future__ import annotations

import torch
from torch import nn

from quant.errors import QuantError


def torch_dtype(d: torch.dtype | str) -> torch.dtype:
    """A config's ``dtype`` ("float16", "torch.bfloat16" or a torch dtype) as a torch dtype, or one clear error."""
    if isinstance(d, torch.dtype):
        return d
    got = getattr(torch, str(d).removeprefix("torch."), None)
    if not isinstance(got, torch.dtype) or not got.is_floating_point:
        raise QuantError(f"unsupported model dtype {d!r} in config.json")
    return got


def _describe(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')} {list(t.shape)}"


def check_tensor(name: str, t: torch.Tensor, dtypes: tuple[torch.dtype, ...], shape: tuple, where: str) -> None:
    """Refuse ``t`` unless its dtype is one of ``dtypes``, its shape is ``shape`` and, if floating, it is finite."""
    if t.dtype not in dtypes or tuple(t.shape) != tuple(shape):
        want = " or ".join(str(d).removeprefix("torch.") for d in dict.fromkeys(dtypes))
        raise QuantError(f"corrupt checkpoint {where}: {name} is {_describe(t)}, expected {want} {list(shape)}")
    if t.is_floating_point() and not t.is_meta and not bool(torch.isfinite(t).all()):  # meta: a header's shape
        raise QuantError(f"corrupt checkpoint {where}: {name} holds NaN or Inf values")


def check_state(state: dict[str, torch.Tensor], model: nn.Module, stored_dtype: torch.dtype, where: str) -> None:
    """Check every tensor of ``state`` that ``model`` has (missing and extra names are the loader's business).

    Packed buffers (codes, scales, zero-points of a ``PackedLinear``) and every non-floating tensor must match
    the skeleton exactly. The model's other floating tensors may have been built in another dtype than the
    file holds (``dtype=`` on load converts them, as transformers does): they must be stored in the
    checkpoint's own dtype (``stored_dtype``) or the skeleton's."""
    expected = model.state_dict()
    packed = {
        f"{n}.{b}" if n else b
        for n, m in model.named_modules()
        if getattr(m, "FORMAT", "")
        for b, t in m.named_buffers(recurse=False)
        if t is not None and b != "bias"
    }
    for name, t in state.items():
        ref = expected.get(name)
        if ref is None:
            continue
        loose = ref.is_floating_point() and name not in packed
        check_tensor(name, t, (ref.dtype, stored_dtype) if loose else (ref.dtype,), tuple(ref.shape), where)
