"""``QuantLinear``/``DSQLinear.forward`` on the CPU: the low-bit kernel for decoding-sized calls.

The kernel serves float32 inputs of at most :data:`MAX_ROWS` tokens (decode, small batches) without autograd,
for 2/3/4/8-bit uniform codes, DSQ sign planes, 2-4-bit codebook codes and vector codebook codes (``vector_gemv``:
one portable body, a table read a run of 2 or 3 weights) whose group is a multiple of 8.
Anything else (prefill, where dequantize + a BLAS matmul is faster; training; a failed build;
``LOWBIT_KERNELS=0``) falls back to ``PackedLinear``'s dequantize + matmul; in layers readied for decoding
(:func:`prepare_for_decode`) or that have decoded, prefill rebuilds the float weight from the repacked codes by
table lookup (``lookup_dequantize``: the weight ``dequantize`` builds, in about a tenth of its time) before the
matmul.
Other float dtypes are computed in float32 and cast back. Each path is logged once per process (logger
``lowbit.kernels``).

With int8 tokens on (opt-in: :func:`use_int8_tokens`, on in ``quantize generate`` and ``bench``;
``LOWBIT_CPU_ISA`` overrides both), the kernels quantize the tokens to int8 per group and multiply them with the
codes in integer dot products, as llama.cpp does: AVX-512 VNNI for groups that are multiples of 64 (1.7x faster
than the float body on SmolLM2 INT4 on such a CPU), AVX2 for groups of 32 with 2-4-bit codes or DSQ planes (DSQ's
group tables then rounded to 7 bits). The logits then differ from the dequantize path's by more than summation
order does (tests/test_kernels_cpu.py states the bounds).

Uniform codes and DSQ's sign planes are repacked once into the ``chunk8`` layout (:mod:`kernels_cpu.layout`)
and cached on the module with the per-layer checks (rebuilt when its buffers change): a second copy of the
codes, the same size or smaller (3-bit), DSQ's group tables for the int8 bodies (2 + 2^B bytes a group, 10 at
three planes, against its row scales' 6), a codebook layer's group steps and one table for them (2 bytes a group),
and no float weight. The fp16 scales and uint8 zeros, and DSQ's row scales, are read as stored; 8-bit scales and
4-bit zeros are decoded into them once, in the same cache. Codebook layers (each group's values ``s * L[c]``, the
layer's own levels ``L``) run on the DSQ bodies with that table.
"""

from __future__ import annotations

import os
import weakref

import torch

import kernels_cpu
import kernels_cuda
from kernels_cpu.layout import chunk8, codebook_tables, dsq_chunk8, dsq_tables, for_body, kernel_buffer
from kernels_cuda import log_once, rows_reason
from quant.errors import QuantError

MAX_ROWS = 8  # tokens per call; more is prefill, where rebuilding the weight + BLAS is the better path
ISA_ENV = "LOWBIT_CPU_ISA"  # the highest body to use: 0 portable, 1 AVX2, 2 AVX-512, 3 int8 tokens (VNNI or AVX2)


_INT8_TOKENS = [False]


def use_int8_tokens(on: bool = True) -> None:
    """Let the kernels quantize the tokens to int8 (the int8 bodies: faster, as llama.cpp does; the logits move by
    more than summation order). Off by default, so a forward matches the dequantize path; ``quantize generate`` and
    ``quantize bench`` turn it on unless told ``--float-tokens``."""
    _INT8_TOKENS[0] = on


def max_isa() -> int:
    """The highest body a layer's plan uses: ``LOWBIT_CPU_ISA`` if set; else the best this CPU has, capped at 2
    (float32 tokens) unless :func:`use_int8_tokens` is on. Read when a layer's plan is built."""
    v = os.environ.get(ISA_ENV, "").strip()
    if not v:
        return -1 if _INT8_TOKENS[0] else 2
    if v not in ("0", "1", "2", "3"):
        raise QuantError(f"{ISA_ENV} must be 0, 1, 2 or 3, got {v!r}")
    return int(v)
KERNEL_BITS = {"uniform": (2, 3, 4, 8), "uniform-dq8": (2, 3, 4), "dsq": (1, 2, 3, 4), "codebook-dq8": (2, 3, 4),
               "vq2-dq8": (2, 3, 4), "vq3-dq8": (2, 3)}
VECTOR_FORMATS = ("vq2-dq8", "vq3-dq8")  # one portable body, on the stored chunk8 codes


def _static_reason(layer: torch.nn.Module) -> tuple[str, str] | None:
    """Why the kernel cannot serve this layer at all (format, width, group, scale dtype), or None."""
    scales = layer.row_scales if layer.FORMAT == "dsq" else layer.scales
    if scales.dtype != torch.float16:
        return f"scales-{scales.dtype}", f"{scales.dtype} scales (the kernel reads the checkpoint's fp16)"
    if layer.bits not in KERNEL_BITS.get(layer.FORMAT, ()):
        return f"bits-{layer.FORMAT}{layer.bits}", f"{layer.bits}-bit {layer.FORMAT} weights"
    if layer.group_size % 8:
        return "group", f"group size {layer.group_size} (the kernel needs a multiple of 8)"
    return None


def unsupported_reason(layer: torch.nn.Module, x: torch.Tensor, plan: tuple | None = None) -> tuple[str, str] | None:
    """(key, message) saying why the kernel cannot run this call, or None if it can."""
    if not kernels_cuda.enabled():
        return "disabled", "disabled by LOWBIT_KERNELS=0 or kernels_cuda.disabled()"
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"dtype-{x.dtype}", f"{x.dtype} input (the kernel computes in float32)"
    if x.shape[-1] != layer.in_features:
        return "shape", "input width is not in_features"  # F.linear raises the error
    if x.requires_grad and torch.is_grad_enabled():
        return "autograd", "input requires grad (the kernel has no backward)"
    # the rows before the plan: a prefill-sized call never builds one (nor holds the repacked codes)
    return rows_reason(layer, x, MAX_ROWS) or (plan or _plan(layer))[2]


def _plan(layer: torch.nn.Module) -> tuple:
    """(key, buffer refs, reason or None, kernel name, its arguments after x, isa) for the layer, cached on the
    module: the checks that depend on the layer only and the repacked codes are done once, not per token. Rebuilt
    when a buffer is replaced (``.float()``, ``load_state_dict``) or written in place; writes through ``.data`` that
    bypass the version counter are not seen (load weights with ``load_state_dict``)."""
    b = layer._buffers  # not layer.<name>: nn.Module.__getattr__ costs a microsecond a time, per token and layer
    bufs = tuple(b[name] for name in layer.STORED)
    key = (_INT8_TOKENS[0], *((t.data_ptr(), t._version if not t.is_inference() else 0) for t in bufs))
    plan = layer.__dict__.get("_cpu_kernel_plan")
    if plan is not None and plan[0] == key and all(r() is t for r, t in zip(plan[1], bufs, strict=True)):
        return plan
    reason, name, args, isa = _static_reason(layer), None, (), max_isa()
    ext = kernels_cpu.EXTENSION.load() if reason is None else None
    if reason is None and ext is None:
        reason = "build", f"kernel build failed ({kernels_cpu.EXTENSION.error})"
    elif reason is None:
        body = ext.kernel_body(isa, layer.group_size, layer.bits)  # its layout: chunk8, or split3 (3 bits, AVX2 int8)
        with torch.no_grad():
            if layer.FORMAT == "dsq":
                codes = dsq_chunk8(bufs[0], layer.in_features)
            else:  # 8-bit-scale layers (uniform and codebook) store chunk8 rows already
                dense = layer.FORMAT != "uniform"
                codes = kernel_buffer(bufs[0]) if dense else chunk8(bufs[0], layer.bits, layer.in_features)
            if layer.FORMAT not in VECTOR_FORMATS:
                codes = for_body(codes, layer.bits, layer.in_features, body)
        if layer.FORMAT == "dsq":
            name, args = "dsq_gemv", (codes, bufs[1], dsq_tables(bufs[1]), layer.group_size)
        elif layer.FORMAT in VECTOR_FORMATS:  # each run of codes one entry of the levels
            name, args = "vector_gemv", (codes, layer.scales, layer.levels.float().contiguous(), layer.group_size)
        elif layer.FORMAT == "codebook-dq8":  # the DSQ bodies, each group's table its scale times the levels
            scales, levels = layer.scales, layer.levels.float()
            name, args = "codebook_gemv", (codes, scales, levels, codebook_tables(scales, levels), layer.group_size)
        else:  # 8-bit scales (ScaleCodedLinear) are decoded here, once: the kernel reads fp16 scales and uint8 zeros
            name, args = "uniform_gemv", (codes, layer.scales, layer.zeros, layer.bits, layer.group_size)
    plan = (key, tuple(weakref.ref(t) for t in bufs), reason, name, args, isa)
    layer.__dict__["_cpu_kernel_plan"] = plan
    return plan


def lowbit_matmul_cpu(layer: torch.nn.Module, x: torch.Tensor, plan: tuple | None = None) -> torch.Tensor:
    """``x[..., in] . W^T + bias`` with the CPU kernel, on the body the layer's plan chose (the best, or
    ``LOWBIT_CPU_ISA``; its codes are in that body's layout)."""
    _, _, reason, name, args, isa = plan or _plan(layer)
    if name is None:
        raise RuntimeError(f"lowbit CPU kernel cannot serve this layer: {reason[1]}")
    x2 = x.reshape(-1, layer.in_features)
    if x2.dtype != torch.float32 or not x2.is_contiguous():
        x2 = x2.to(torch.float32).contiguous()
    y = getattr(kernels_cpu.EXTENSION.module, name)(x2, *args, isa)
    bias = layer._buffers["bias"]
    if bias is not None:
        y += bias
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    return y.view(*x.shape[:-1], layer.out_features)


def prepare_for_decode(model: torch.nn.Module) -> int:
    """Ready every packed linear the kernel can serve for decoding, eager or in a ``torch.compile``'d step: its
    repacked codes and fixed arguments are stored on the layer, so that a decoding-sized call is one kernel call
    with no per-call checks of the layer (inside a compiled graph, one call of ``torch.ops.lowbit_cpu.*``); siblings
    that read one input are fused (:class:`Siblings`). On SmolLM2 the checks and wrappers of an unprepared eager
    call cost more than its kernel. The weights are then fixed for decoding: prepare again after changing them
    (``quantize generate`` and ``bench`` prepare the model they load). Returns how many layers were prepared."""
    n = 0
    for layer in model.modules():
        layer.__dict__.pop("_cpu_prepared", None)
        layer.__dict__.pop("_cpu_siblings", None)
        if getattr(layer, "FORMAT", None) not in KERNEL_BITS or not kernels_cuda.enabled():
            continue
        _, _, reason, name, args, isa = _plan(layer)
        if reason is None:
            layer.__dict__["_cpu_prepared"] = (name, (*args, isa))
            n += 1
    if n:
        fuse_siblings(model)
    return n


class Siblings:
    """Linears of a block that read one input (q/k/v, gate/up), with uniform codes of one width and group: in a
    compiled decode step the first of them computes all their outputs in one kernel call over their rows stored
    together (one token quantization and one pass of the thread pool instead of three; ~1.3x faster for SmolLM2's
    q/k/v and gate/up), and the others take theirs from here. A sibling called on another input (a model that
    calls them otherwise than the structure discovery saw) computes its own."""

    def __init__(self, layers: list[torch.nn.Module]) -> None:
        plans = [_plan(m) for m in layers]
        codes, scales, zeros, bits, group = zip(*(p[4] for p in plans), strict=True)
        # the rows one after another, each layer's own arguments views into them: no second copy of the codes (a
        # view's 4 bytes of padding are the next layer's first row, which the kernel reads past but does not use)
        fused = torch.cat([c[:-4] for c in codes] + [codes[-1][-4:]])
        all_scales, all_zeros = torch.cat(scales), torch.cat(zeros)
        self.args = (fused, all_scales, all_zeros, bits[0], group[0], plans[0][5])
        self.sizes = [m.out_features for m in layers]
        at = row = 0
        for m, p, c in zip(layers, plans, codes, strict=True):
            rows = slice(row, row + m.out_features)
            args = (fused[at: at + c.numel()], all_scales[rows], all_zeros[rows], bits[0], group[0])
            m.__dict__["_cpu_kernel_plan"] = (*p[:4], args, p[5])
            m.__dict__["_cpu_prepared"] = ("uniform_gemv", (*args, p[5]))
            at, row = at + c.numel() - 4, row + m.out_features
        self.x: torch.Tensor | None = None
        self.pending: dict[int, torch.Tensor] = {}

    def output(self, i: int, x: torch.Tensor, x2: torch.Tensor, gemv) -> torch.Tensor | None:
        """Sibling ``i``'s ``x2 . W^T`` (no bias; ``x2``: the layer's input ``x`` as float32 rows; ``gemv``: the
        kernel's ``uniform_gemv``), or None when it must compute its own."""
        if i == 0:
            ys = gemv(x2, *self.args).split(self.sizes, dim=1)
            self.x, self.pending = x, dict(enumerate(ys[1:], 1))
            return ys[0]
        if self.x is not x or i not in self.pending:
            return None
        y = self.pending.pop(i)
        if not self.pending:  # all taken: nothing is held between steps (nor made a graph output)
            self.x = None
        return y


def fuse_siblings(model: torch.nn.Module) -> int:
    """Group the prepared linears that read one input (same block stage, same parent module, same pre-norm, in the
    structure :func:`quant.engine.structure.structure_of` discovers) and same kernel arguments into
    :class:`Siblings`. Models whose structure cannot be discovered keep one call per linear. Returns the groups."""
    from quant.engine.structure import structure_of

    try:
        s = structure_of(model)
    except Exception as e:  # an optimisation only: whatever stops discovery leaves one call per linear
        log_once("cpu-siblings", "packed linears not fused (structure not discovered: %s)", e)
        return 0
    n = 0
    for block, info in zip(s.blocks(model), s.block_info, strict=True):
        for stage in info.stages:
            groups: dict[tuple, list[torch.nn.Module]] = {}
            for name in stage:
                m = block.get_submodule(name)
                prepared = m.__dict__.get("_cpu_prepared")
                if name not in info.readers or prepared is None or prepared[0] != "uniform_gemv":
                    continue
                key = (info.readers[name], name.rpartition(".")[0], m.in_features, *prepared[1][3:])
                groups.setdefault(key, []).append(m)
            for layers in groups.values():
                if len(layers) > 1:
                    sib = Siblings(layers)
                    for i, m in enumerate(layers):
                        m.__dict__["_cpu_siblings"] = (sib, i)
                    n += 1
    return n


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def prepared_forward(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The output of a layer :func:`prepare_for_decode` readied: a decoding-sized call through its kernel (or its
    siblings' fused call), eagerly or inside ``torch.compile``; a prefill-sized one by lookup + BLAS (eagerly,
    :func:`_prefill`). None (not prepared, not a float call, autograd, kernels disabled) for the caller's other
    paths, which compile too."""
    prepared = layer.__dict__.get("_cpu_prepared")
    if prepared is None or x.dtype not in _KERNEL_DTYPES:
        return None
    rows = x.numel() // layer.in_features
    if rows > MAX_ROWS:
        return _prefill(layer, x, prepared)
    if rows == 0:
        return None
    if torch.compiler.is_compiling():
        ops = torch.ops.lowbit_cpu
    elif (x.requires_grad and torch.is_grad_enabled()) or kernels_cuda.inside_disabled():
        return None
    else:  # (LOWBIT_KERNELS was read when the layer was prepared: os.environ costs a microsecond a call)
        ops = kernels_cpu.EXTENSION.module  # eagerly, the extension's own functions: torch.ops adds ~7 us a call
    name, args = prepared
    x2 = x.reshape(-1, layer.in_features).to(torch.float32).contiguous()
    sib = layer.__dict__.get("_cpu_siblings")
    y = sib[0].output(sib[1], x, x2, ops.uniform_gemv) if sib is not None else None
    if y is None:
        y = getattr(ops, name)(x2, *args)
    bias = layer._buffers["bias"]
    if bias is not None:
        y = y + bias
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    return y.view(*x.shape[:-1], layer.out_features)


def group_values(name: str, args: tuple) -> torch.Tensor:
    """Each group's weight for every code, float32 ``[out, groups, 2^bits]``, from a kernel's arguments (``name``:
    ``uniform_gemv``, ``codebook_gemv`` or ``dsq_gemv``): ``(c - z) s``, ``s L[c]`` or DSQ's ``T[c]``, computed as
    each format's ``dequantize`` computes its weights, so that ``lookup_dequantize`` rebuilds them exactly."""
    if name == "uniform_gemv":
        _, scales, zeros, bits = args[:4]
        values = (torch.arange(2**bits, dtype=torch.float32) - zeros.float()[..., None]) * scales.float()[..., None]
    elif name == "codebook_gemv":
        values = args[2] * args[1].float()[..., None]  # the levels (float32) times each group's scale
    else:
        from quant.methods.dsq import DSQParams

        r = args[1].float()
        values = DSQParams(r.reshape(-1, r.shape[2]), r.new_ones(1)).levels().view(*r.shape[:2], -1)
    return values.contiguous()


def _prefill(layer: torch.nn.Module, x: torch.Tensor, prepared: tuple) -> torch.Tensor | None:
    """A prefill-sized call of a prepared layer, eagerly: its float weight rebuilt from the prepared codes by table
    lookup (``lookup_dequantize``: the same weight as ``dequantize``, in a fraction of its time), then BLAS. None
    (the dequantize path) inside ``torch.compile``, under autograd or disabled kernels, for 8-bit codes, and for
    3-bit codes in the AVX2 int8 body's own layout, and vector codebooks (a run's values are not a group's table)."""
    name, args = prepared
    isa, bits = args[-1], layer.bits
    if (torch.compiler.is_compiling() or (x.requires_grad and torch.is_grad_enabled())
            or kernels_cuda.inside_disabled() or bits > 4 or name == "vector_gemv"):
        return None
    ext = kernels_cpu.EXTENSION.module
    if bits == 3 and ext.kernel_body(isa, layer.group_size, bits) == "avx2-int8":
        return None
    log_once(f"cpu-prefill:{layer.FORMAT}", "%s on cpu: prefill, weight by table lookup", type(layer).__name__)
    w = ext.lookup_dequantize(args[0], group_values(name, args), layer.group_size, isa)
    return torch.nn.functional.linear(x, w if x.dtype == torch.float32 else w.to(x.dtype), layer._buffers["bias"])


def kernel_forward(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The layer's output through the kernel, or None when the caller must fall back."""
    why = unsupported_reason(layer, x)
    if why is not None and why[0] == "rows" and "_cpu_kernel_plan" in layer.__dict__:
        # a layer that has decoded holds its repacked codes: a prompt's call rebuilds its weight from them
        _, _, reason, name, args, isa = _plan(layer)
        y = None if reason is not None else _prefill(layer, x, (name, (*args, isa)))
        if y is not None:
            return y
    if why is not None:
        log_once(f"cpu-fallback:{why[0]}", "%s on cpu: dequantize + matmul (%s)", type(layer).__name__, why[1])
        return None
    log_once(f"cpu-kernel:{layer.FORMAT}", "%s on cpu: lowbit CPU kernel", type(layer).__name__)
    return lowbit_matmul_cpu(layer, x)
