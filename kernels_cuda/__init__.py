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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType

log = logging.getLogger("lowbit.kernels")

_disabled = 0
_seen: set[str] = set()


def enabled() -> bool:
    """False under ``LOWBIT_KERNELS=0`` (or ``false``/``off``/``no``) or inside :func:`disabled`: the dequantize
    path on every device (CUDA and CPU kernels alike)."""
    env = os.environ.get("LOWBIT_KERNELS", "1").strip().lower()
    return _disabled == 0 and env not in ("0", "false", "off", "no")


def inside_disabled() -> bool:
    """True inside :func:`disabled` (no environment read: for per-call checks of layers readied beforehand)."""
    return _disabled > 0


@contextmanager
def disabled() -> Iterator[None]:
    """Run the block with the dequantize + matmul path on every device."""
    global _disabled
    _disabled += 1
    try:
        yield
    finally:
        _disabled -= 1


def log_once(key: str, msg: str, *args: object) -> None:
    """Log which path a layer takes (and why it falls back) once per process."""
    if key not in _seen:
        _seen.add(key)
        log.info(msg, *args)


def rows_reason(layer, x, max_rows: int) -> tuple[str, str] | None:
    """Why a call has the wrong number of tokens for a kernel (none, or prefill-sized), or None."""
    rows = x.numel() // max(layer.in_features, 1)
    if rows == 0:
        return "empty", "empty input"
    if rows > max_rows:
        return "rows", f"more than {max_rows} rows per call (prefill)"
    return None


class LazyExtension:
    """A compiled extension built on first use; ``None`` (warned once, the reason kept) when that fails."""

    def __init__(self, what: str, build: Callable[[], ModuleType]) -> None:
        self.what, self._build = what, build
        self._lock = threading.Lock()
        self.module: ModuleType | None = None
        self.error: str | None = None

    def load(self) -> ModuleType | None:
        if self.module is not None or self.error is not None:
            return self.module
        with self._lock:
            if self.module is None and self.error is None:
                try:
                    self.module = self._build()
                except Exception as e:  # noqa: BLE001 - any build/import failure means: fall back
                    self.error = f"{type(e).__name__}: {e}".splitlines()[0]
                    warnings.warn(
                        f"{self.what} unavailable, packed linears fall back to dequantize + matmul: {self.error}",
                        RuntimeWarning,
                        stacklevel=3,
                    )
        return self.module


def _build_cuda() -> ModuleType:
    from kernels_cuda import build

    log.warning("loading the lowbit CUDA kernels (compiled once, cached in %s)", build.build_dir())
    return build.load()


EXTENSION = LazyExtension("lowbit CUDA kernels", _build_cuda)


def load_extension() -> ModuleType | None:
    """The compiled extension, building it on first use; None (warned once) if that fails."""
    return EXTENSION.load()


def extension_error() -> str | None:
    """Why the extension could not be loaded (None if it loaded or was never tried)."""
    return EXTENSION.error


__all__ = ["LazyExtension", "disabled", "enabled", "extension_error", "load_extension", "log_once", "rows_reason"]
