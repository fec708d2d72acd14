"""Custom CUDA low-bit GEMM kernels for ``QuantLinear`` (2/3/4-bit, fp16/bf16, 1..64 tokens).

* ``csrc/lowbit_gemm.cu``: the kernel (tensor-core "swap AB" GEMV/GEMM, weights decoded in
  registers, read exactly once per call); ``csrc/binding.cpp``: the torch binding.
* :mod:`kernels_cuda.layout`: the offline repack from the checkpoint layout to the kernel's.
* :mod:`kernels_cuda.build`: JIT build into a persistent cache, ``python -m kernels_cuda.build``
  (ahead of time) and ``--check`` (nvcc compile check, no GPU).
* :mod:`kernels_cuda.dispatch`: what ``QuantLinear.forward`` calls on CUDA inputs.

Importing this package (or ``quant``) never needs nvcc or a GPU: the extension is built lazily on
the first CUDA forward that can use it; a failed build is reported once and every layer falls back
to dequantize + matmul. ``LOWBIT_KERNELS=0`` or ``with kernels_cuda.disabled():`` forces the
dequantize path (to compare both).
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

log = logging.getLogger("lowbit.kernels")

_lock = threading.Lock()
_ext: ModuleType | None = None
_error: str | None = None
_disabled = 0


def enabled() -> bool:
    """False under ``LOWBIT_KERNELS=0`` (or ``false``/``off``/``no``) or inside :func:`disabled`."""
    env = os.environ.get("LOWBIT_KERNELS", "1").strip().lower()
    return _disabled == 0 and env not in ("0", "false", "off", "no")


@contextmanager
def disabled() -> Iterator[None]:
    """Run the block with the dequantize + matmul path on every device."""
    global _disabled
    _disabled += 1
    try:
        yield
    finally:
        _disabled -= 1


def load_extension() -> ModuleType | None:
    """The compiled extension, building it on first use; None (warned once) if that fails."""
    global _ext, _error
    if _ext is not None or _error is not None:
        return _ext
    with _lock:
        if _ext is None and _error is None:
            from kernels_cuda import build

            log.warning("loading the lowbit CUDA kernels (compiled once, cached in %s)", build.build_dir())
            try:
                _ext = build.load()
            except Exception as e:  # noqa: BLE001 - any build/import failure means: fall back
                _error = f"{type(e).__name__}: {e}"
                warnings.warn(
                    f"lowbit CUDA kernels unavailable, QuantLinear falls back to dequantize + matmul: {_error}",
                    RuntimeWarning,
                    stacklevel=2,
                )
    return _ext


def extension_error() -> str | None:
    """Why the extension could not be loaded (None if it loaded or was never tried)."""
    return _error


__all__ = ["disabled", "enabled", "extension_error", "load_extension"]
