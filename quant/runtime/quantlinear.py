"""``QuantLinear``: a linear layer stored as packed low-bit codes plus per-group fp16 scales and zeros.

Buffers (all saved in the checkpoint under ``<module>.<name>``):

* ``qweight`` int32 ``[out, ceil(in / (32 // bits))]``: codes packed per row (see ``quant.numerics.packing``)
* ``scales``  fp16  ``[out, in / group_size]``
* ``zeros``   uint8 ``[out, in / group_size]``: integer zero-points
* ``bias``    (optional) in the model's dtype

``ScaleCodedLinear`` (format ``uniform-dq8``) holds the same kind of weight in fewer bits: ``qcodes`` uint8
``[out, in / 8 * bits]``, the codes packed densely (``quant.numerics.packing.pack_dense``: 3 bits per 3-bit code,
not rowpack's 3.2); ``scale_codes`` uint8 ``[out, in / group_size]`` on a per-row grid ``scale_grid`` fp16
``[out, 2]`` (``quant.numerics.scalecodes``); the zero-points packed two per byte in ``zero_pairs`` uint8
``[out, ceil(groups / 2)]``. Its ``qweight``, ``scales`` and ``zeros`` are those decoded, so everything that
reads a uniform layer reads it too.

``CodebookLinear`` (format ``codebook-dq8``) stores the same dense codes and 8-bit scales, no zero-points, and
``levels`` fp16 ``[2^bits]``: ``w = levels[code] * scale`` (``quant.numerics.codebook``). It is not a
``QuantLinear``, so the uniform paths (the CUDA kernels, the GPTQ export) never take it for one; the CPU kernel
reads it as a table lookup, as it does DSQ's. ``VectorCodebookLinear`` (formats ``vq2-dq8``, ``vq3-dq8``) is the same
with ``levels`` fp16 ``[2^(bits*d), d]``: each run of d codes along a row is one index into d-value entries (2 or 3
weights a lookup), read on the CPU by its own kernel (``vector_gemv``).

``forward`` dequantizes and runs a dense matmul in the input's dtype: the reference path, and the one
the kernels must match. It first offers the call to a low-bit kernel: on a CPU input with few tokens
(``kernels_cpu.dispatch``, uniform, DSQ and both codebooks), on a CUDA input (``kernels_cuda.dispatch``, uniform); each
declines (and this path runs) whenever shape, format or ``LOWBIT_KERNELS=0`` rule it out.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from quant.numerics.codebook import vector_dim
from quant.numerics.grid import QuantizedWeight, codebook_dim, dequantize_weight
from quant.numerics.packing import pack, pack_dense, packed_width, unpack, unpack_dense
from quant.numerics.scalecodes import ScaleGrid, pack_nibbles, unpack_nibbles


class PackedLinear(nn.Module):
    """A linear layer whose weight is stored packed; ``forward`` dequantizes (or uses the cache that
    :func:`dequantized_weights` fills) and runs a dense matmul. Subclasses define ``dequantize``."""

    FORMAT = ""  # recorded per module in the checkpoint; selects the class on load
    STORED: tuple[str, ...] = ()  # the buffers that hold the weight (not the bias): what its size on disk counts

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
        return [self._buffers[name] for name in self.STORED]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and self._cached is None:
            # decoding-sized calls read the packed weight directly (kernels_cpu); the rest fall through
            from kernels_cpu.dispatch import kernel_forward, prepared_forward

            y = prepared_forward(self, x)
            if y is None and not torch.compiler.is_compiling():
                y = kernel_forward(self, x)
            if y is not None:
                return y
        w = self._cached if self._cached is not None and self._cached.dtype == x.dtype else self.dequantize(x.dtype)
        return F.linear(x, w, self.bias)


class QuantLinear(PackedLinear):
    FORMAT = "uniform"
    STORED = ("qweight", "scales", "zeros")

    def _register_weight(self) -> None:
        out, n, n_groups = self.out_features, self.in_features, self.in_features // self.group_size
        self.register_buffer("qweight", torch.zeros(out, packed_width(n, self.bits), dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(out, n_groups, dtype=torch.float16))
        self.register_buffer("zeros", torch.zeros(out, n_groups, dtype=torch.uint8))

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> PackedLinear:
        """The packed layer of ``qw``: a ``ScaleCodedLinear`` when its scales are on 8-bit grids, a
        ``CodebookLinear`` when its codes index a codebook."""
        if qw.levels is not None:
            cls = CODEBOOK_CLASSES[vector_dim(qw.levels)]
        elif qw.scale_grid is not None:
            cls = ScaleCodedLinear
        out, n = qw.codes.shape
        dtype = bias.dtype if bias is not None else torch.float32
        m = cls(n, out, qw.bits, qw.group_size, bias=bias is not None, dtype=dtype)
        m.set_codes(qw.codes)
        m._store(qw.scales, qw.zeros, qw.scale_grid)
        if qw.levels is not None:
            m.levels.copy_(qw.levels)
        if bias is not None:
            m.bias.copy_(bias.detach())
        return m

    def _store(self, scales: torch.Tensor, zeros: torch.Tensor, grid: ScaleGrid | None = None) -> None:
        self.scales.copy_(scales)
        self.zeros.copy_(zeros)

    def set_codes(self, codes: torch.Tensor) -> None:
        """Replace the integer codes (``[out, in]``)."""
        self.qweight.copy_(pack(codes, self.bits))

    def set_scales(self, scales: torch.Tensor) -> None:
        """Replace the group scales (``[out, groups]``) by the nearest ones storage holds."""
        self.scales.copy_(scales.to(torch.float16))

    def scale_rows(self, c: torch.Tensor) -> None:
        """Multiply output row ``j`` of the weight by ``c_j`` through its scales."""
        self.set_scales(self.scales.float() * c[:, None].to(self.scales.device))

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

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, bias={self.bias is not None}"
        )


class ScaleCoded:
    """Dense codes and 8-bit group scales on per-row grids (``quant.numerics.scalecodes``): what
    ``ScaleCodedLinear`` and ``CodebookLinear`` share. Mixed into a ``PackedLinear``."""

    def _register_scale_coded(self) -> None:
        out, n, n_groups = self.out_features, self.in_features, self.in_features // self.group_size
        if n % 8 or self.bits not in (2, 3, 4):
            raise ValueError(f"8-bit scales take 2-4-bit codes in rows of a multiple of 8; got {self.bits} x {n}")
        self.register_buffer("qcodes", torch.zeros(out, n // 8 * self.bits, dtype=torch.uint8))
        self.register_buffer("scale_codes", torch.zeros(out, n_groups, dtype=torch.uint8))
        self.register_buffer("scale_grid", torch.zeros(out, 2, dtype=torch.float16))

    def grid(self) -> ScaleGrid:
        return ScaleGrid.from_stored(self.scale_grid)

    def codes(self) -> torch.Tensor:
        return unpack_dense(self.qcodes, self.bits, self.in_features)

    def set_codes(self, codes: torch.Tensor) -> None:
        self.qcodes.copy_(pack_dense(codes, self.bits))

    @property
    def scales(self) -> torch.Tensor:  # fp16 [out, groups], decoded
        return self.grid().decode(self.scale_codes)

    def _store_scales(self, scales: torch.Tensor, grid: ScaleGrid | None) -> None:
        if grid is None:
            raise ValueError(f"{type(self).__name__} needs the scales' grid")
        self.scale_grid.copy_(grid.stored())
        codes = grid.encode(scales)
        if not torch.equal(grid.decode(codes), scales.to(torch.float16)):
            raise ValueError("scales are not points of their rows' grids: quantize with this grid's snap")
        self.scale_codes.copy_(codes)

    def set_scales(self, scales: torch.Tensor) -> None:
        self.scale_codes.copy_(self.grid().encode(scales))  # the nearest grid point, within the row's range

    def scale_rows(self, c: torch.Tensor) -> None:
        # the grid's base moves and the codes stay: every scale of the row keeps its fp16-level precision
        g = self.grid()
        g.base = (g.base.double() * c[:, None].double().cpu()).to(torch.float16).float()
        self.scale_grid.copy_(g.stored())


class ScaleCodedLinear(ScaleCoded, QuantLinear):
    """``QuantLinear`` with 8-bit scales on a per-row grid and 4-bit zero-points (see the module docstring)."""

    FORMAT = "uniform-dq8"
    STORED = ("qcodes", "scale_codes", "scale_grid", "zero_pairs")

    def _register_weight(self) -> None:
        self._register_scale_coded()
        n_groups = self.in_features // self.group_size
        self.register_buffer("zero_pairs", torch.zeros(self.out_features, (n_groups + 1) // 2, dtype=torch.uint8))

    @property
    def qweight(self) -> torch.Tensor:  # the codes in rowpack words, for the paths that read a QuantLinear's
        return pack(self.codes(), self.bits)

    @property
    def zeros(self) -> torch.Tensor:  # uint8 [out, groups]
        return unpack_nibbles(self.zero_pairs, self.scale_codes.shape[1])

    def _store(self, scales: torch.Tensor, zeros: torch.Tensor, grid: ScaleGrid | None = None) -> None:
        if int(zeros.max()) > 15:
            raise ValueError("ScaleCodedLinear stores zero-points in 4 bits")
        self._store_scales(scales, grid)
        self.zero_pairs.copy_(pack_nibbles(zeros))


class CodebookLinear(ScaleCoded, PackedLinear):
    """Codes that index the layer's own ``levels`` (fp16 ``[2^bits]``, ``quant.numerics.codebook``), times 8-bit
    group scales; no zero-points. Format ``codebook-dq8``: ``qcodes``, ``scale_codes``, ``scale_grid`` as
    ``ScaleCodedLinear``, and ``levels``. Not a ``QuantLinear``: the uniform paths (kernels, GPTQ export) never
    take it for one."""

    FORMAT = "codebook-dq8"
    STORED = ("qcodes", "scale_codes", "scale_grid", "levels")
    DIM = 1  # weights one entry of the levels covers

    def _register_weight(self) -> None:
        self._register_scale_coded()
        shape = (2**self.bits,) if self.DIM == 1 else (2 ** (self.bits * self.DIM), self.DIM)
        self.register_buffer("levels", torch.zeros(shape, dtype=torch.float16))

    def _store(self, scales: torch.Tensor, zeros: torch.Tensor, grid: ScaleGrid | None = None) -> None:
        self._store_scales(scales, grid)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_weight(self.codes(), self.scales, None, self.group_size, dtype, self.levels)

    extra_repr = QuantLinear.extra_repr


class VectorCodebookLinear(CodebookLinear):
    """A codebook whose entries cover ``DIM`` consecutive weights of a group: levels ``[2^(bits*DIM), DIM]``, and
    each run of ``DIM`` codes along a row the index of one entry (``quant.numerics.codebook.decode``)."""

    FORMAT = "vq2-dq8"
    DIM = 2


class Vector3CodebookLinear(VectorCodebookLinear):
    FORMAT = "vq3-dq8"
    DIM = 3


CODEBOOK_CLASSES = {1: CodebookLinear, 2: VectorCodebookLinear, 3: Vector3CodebookLinear}  # by entry length


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


def storage_bytes(
    out_features: int, in_features: int, bits: int, group_size: int, scale_bits: int = 16, codebook: str = "uniform"
) -> int:
    """Bytes a ``QuantLinear`` of this shape stores (no bias): rowpack codes, fp16 scales and uint8 zeros; with
    ``scale_bits=8`` (``ScaleCodedLinear``) dense codes, a scale code and a 4-bit zero per group, and the row's fp16
    grid base and step; with a codebook (``kmeans``, ``vq2``, ``vq3``: ``CodebookLinear``) the same without zeros,
    plus the fp16 levels (``2^(bits*d)`` entries of d values).

    ``group_size`` is the effective one (``QuantSpec.group_for``), so per-channel means ``in_features``.
    """
    groups = in_features // group_size
    if codebook != "uniform":
        d = codebook_dim(codebook)
        return out_features * (in_features // 8 * bits + groups + 4) + 2 * d * 2 ** (bits * d)
    if scale_bits == 8:
        return out_features * (in_features // 8 * bits + groups + (groups + 1) // 2 + 4)
    return out_features * (4 * packed_width(in_features, bits) + 3 * groups)


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
