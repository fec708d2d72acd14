"""Low-bit GEMV/GEMM kernels for the CPU (2/3/4/8-bit uniform codes, DSQ sign planes, codebook codes; 1-8 tokens).

* ``csrc/lowbit_gemv_cpu.cpp``: the kernels (AVX-512 or AVX2/FMA chosen at run time, a portable body
  otherwise; with int8 tokens, AVX-512 VNNI or AVX2), reading the packed weights directly: no float weight is built.
* :mod:`kernels_cpu.layout`: the offline repack of uniform codes and DSQ planes into the kernel's ``chunk8``
  layout, and DSQ's and codebook layers' group tables for the int8 bodies.
* :mod:`kernels_cpu.build`: JIT build into the same persistent cache as ``kernels_cuda``, and
  ``python -m kernels_cpu.build`` ahead of time.
* ``csrc/decode_attention_cpu.cpp`` and :mod:`kernels_cpu.attention`: one query token's attention over a KV cache,
  transformers' attention implementation ``"lowbit_cpu"`` for compiled decode steps.
* :mod:`kernels_cpu.dispatch`: what ``QuantLinear``/``DSQLinear.forward`` call on CPU inputs, eagerly or inside a
  ``torch.compile``'d decode step (``prepare_for_decode``; the kernels are also ``torch.ops.lowbit_cpu.*``).

The dispatch rules are shared with ``kernels_cuda``: ``LOWBIT_KERNELS=0`` or ``kernels_cuda.disabled()``
forces the dequantize + matmul path on every device. A failed build (no compiler) is reported once and
every layer falls back to that path.
"""

from __future__ import annotations

from types import ModuleType

from kernels_cuda import LazyExtension


def _build() -> ModuleType:
    from kernels_cpu import build
    from kernels_cuda import log

    log.warning("loading the lowbit CPU kernels (compiled once, about a minute; cached in %s)", build.build_dir())
    module = build.load()
    _register_fakes()
    return module


def _register_fakes() -> None:
    """Output shapes of the torch operators the extension registers (torch.ops.lowbit_cpu.*), for torch.compile."""
    import torch

    torch.library.register_fake("lowbit_cpu::uniform_gemv")(
        lambda x, codes, scales, zeros, bits, group_size, isa: x.new_empty(x.shape[0], scales.shape[0])
    )
    torch.library.register_fake("lowbit_cpu::dsq_gemv")(
        lambda x, codes, row_scales, tables, group_size, isa: x.new_empty(x.shape[0], row_scales.shape[0])
    )
    torch.library.register_fake("lowbit_cpu::codebook_gemv")(
        lambda x, codes, scales, levels, tables, group_size, isa: x.new_empty(x.shape[0], scales.shape[0])
    )
    torch.library.register_fake("lowbit_cpu::vector_gemv")(
        lambda x, codes, scales, levels, group_size, isa: x.new_empty(x.shape[0], scales.shape[0])
    )
    torch.library.register_fake("lowbit_cpu::decode_attention")(
        lambda q, k, v, mask, scale: q.new_empty(q.shape[0], 1, q.shape[1], q.shape[3])
    )


EXTENSION = LazyExtension("lowbit CPU kernels", _build)  # .load(): the module or None; .error: why not

__all__ = ["EXTENSION"]
