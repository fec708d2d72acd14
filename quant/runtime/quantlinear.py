"""``QuantLinear``: a linear layer stored as packed low-bit codes plus per-group fp16 scales and zeros.

Buffers (all saved in the checkpoint under ``<module>.<name>``):

* ``qweight`` int32 ``[out, ceil(in / (32 // bits))]``: codes packed per row (see ``quant.numerics.packing``)
* ``scales``  fp16  ``[out, in / group_size]``
* ``zeros``   uint8 ``[out, in / group_size]``: integer zero-points
* ``bias``    (optional) in the model's dtype

``forward`` dequantizes and runs a dense matmul in the input's dtype: the reference path, and the one
the kernels must match. It first offers the call to a low-bit kernel: on a CPU input with few tokens
(``kernels_cpu.dispatch``, uniform and DSQ), on a CUDA input (``kernels_cuda.dispatch``, uniform); each
declines (and this path runs) whenever shape, format or ``LOWBIT_KERNELS=0`` rule it out.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from quant.numerics.grid import QuantizedWeight, dequantize_weight
from quant.numerics.packing import pack, packed_width, unpack


class PackedLinear(nn.Module):
    """A linear layer whose weight is stored packed; ``forward`` dequantizes (or uses the cache that
    :func:`dequantized_weights` fills) and runs a dense matmul. Subclasses define ``dequantize``."""

    FORMAT = ""  # recorded per module in the checkpoint; selects the class on load

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if in_features % group_size:
            raise ValueError(f"group size {group_size} does not divide in_features {in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        self._register_weight()
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype) if bias else None)
        self._cached: torch.Tensor | None = None  # dense weight, only inside dequantized_weights()

    def _register_weight(self) -> None:
        """Register the (zeroed) buffers that hold the packed weight."""
        raise NotImplementedError

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def storage_buffers(self) -> list[torch.Tensor]:
        """The tensors that hold the weight (not the bias): what its size on disk counts."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and self._cached is None:
            # decoding-sized calls read the packed weight directly (kernels_cpu); the rest fall through
            from kernels_cpu.dispatch import compiled_forward, kernel_forward

            y = compiled_forward(self, x) if torch.compiler.is_compiling() else kernel_forward(self, x)
            if y is not None:
                return y
        w = self._cached if self._cached is not None and self._cached.dtype == x.dtype else self.dequantize(x.dtype)
        return F.linear(x, w, self.bias)


class QuantLinear(PackedLinear):
    FORMAT = "uniform"

    def _register_weight(self) -> None:
        out, n, n_groups = self.out_features, self.in_features, self.in_features // self.group_size
        self.register_buffer("qweight", torch.zeros(out, packed_width(n, self.bits), dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(out, n_groups, dtype=torch.float16))
        self.register_buffer("zeros", torch.zeros(out, n_groups, dtype=torch.uint8))

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> QuantLinear:
        out, n = qw.codes.shape
        dtype = bias.dtype if bias is not None else torch.float32
        m = cls(n, out, qw.bits, qw.group_size, bias=bias is not None, dtype=dtype)
        m.qweight.copy_(pack(qw.codes, qw.bits))
        m.scales.copy_(qw.scales)
        m.zeros.copy_(qw.zeros)
        if bias is not None:
            m.bias.copy_(bias.detach())
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda and self._cached is None:
            # imported here so CPU use never loads (or builds) anything CUDA
            from kernels_cuda.dispatch import kernel_forward

            y = kernel_forward(self, x)
            if y is not None:
                return y
        return super().forward(x)

    def codes(self) -> torch.Tensor:
        return unpack(self.qweight, self.bits, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_weight(self.codes(), self.scales, self.zeros, self.group_size, dtype)

    def storage_buffers(self) -> list[torch.Tensor]:
        return [self.qweight, self.scales, self.zeros]

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}"
        )


@contextmanager
def dequantized_weights(model: nn.Module, dtype: torch.dtype = torch.float32):
    """Dequantize every packed linear once for a run of many forwards (evaluation), then drop it; where the
    dense copies would take more than half the available memory (an 8B model's: 28 GB in fp32), nothing is
    cached and each forward dequantizes layer by layer instead."""
    from quant.formats.reader import available_memory

    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    need = sum(m.in_features * m.out_features for m in layers) * torch.empty(0, dtype=dtype).element_size()
    avail = available_memory()
    if avail is not None and need > avail // 2:
        layers = []
    try:
        for m in layers:
            m._cached = m.dequantize(dtype)
        yield model
    finally:
        for m in layers:
            m._cached = None


def storage_bytes(out_features: int, in_features: int, bits: int, group_size: int) -> int:
    """Bytes a ``QuantLinear`` of this shape stores: packed codes, fp16 scales, uint8 zeros (no bias).

    ``group_size`` is the effective one (``QuantSpec.group_for``), so per-channel means ``in_features``.
    """
    return out_features * (4 * packed_width(in_features, bits) + 3 * (in_features // group_size))


def quantized_sizes(model: nn.Module) -> dict:
    """Bytes of every packed linear (codes and every scale and zero) against the same weights in fp16."""
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    qbytes = sum(b.numel() * b.element_size() for m in layers for b in m.storage_buffers())
    params = sum(m.in_features * m.out_features for m in layers)
    return {
        "quantized_linear_bytes": qbytes,
        "quantized_linear_fp16_bytes": 2 * params,
        "ratio_to_fp16": round(qbytes / max(2 * params, 1), 4),
        "bits_per_weight": round(8 * qbytes / max(params, 1), 3),
    }
