"""The block engine: every block-wise pass (rotation, RTN, GPTQ, GPTAQ, D²Quant) runs through this one loop.

For each decoder block in order: its weights are brought to the compute device (from memory, or read from
the source's safetensors shards when streaming), each block step transforms or quantizes it, the calibration
stream(s) advance through it, its tensors are written to the run's work folder (when there is one) and it is
released. Peak memory is one block in compute precision, its Hessians and the calibration activations; the
whole-model path (a model already in memory) is the same loop with nothing to load.

A block step (``BlockStep``) has ``start`` (model-level work before block 0: rotating the embeddings),
``block`` (one block: it may replace the quantized stream ``run.x`` and the float stream ``run.xf``) and
``finish`` (after the last block: the head). What a step must remember across blocks goes into
``run.note(key, value)``: notes are persisted with each finished block, so a resumed run has them too.

Resume: with a work folder (``quant.engine.resume.WorkDir``) each finished block leaves its tensors, the streams
entering the next block and a record written last; a restarted run with the same fingerprint continues after
the last recorded block. Data parallel: under ``torchrun`` each rank holds its share of the calibration
windows (``quant.engine.distributed``); the steps sum what they accumulate across ranks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from quant.engine import distributed as dist
from quant.engine.blockwise import ActivationStore, _each, _Stop, activation_store, call_block, stacked
from quant.errors import QuantError


class BlockStep:
    """One pass's per-block form. Subclasses set ``name`` and override what they use."""

    name = ""
    needs_data = False  # reads the quantized calibration stream run.x
    float_stream = False  # also needs the float model's stream run.xf

    def start(self, run: Run) -> None:  # before block 0; also rerun on resume (must be deterministic)
        pass

    def block(self, run: Run, i: int, block: nn.Module) -> None:
        pass

    def finish(self, run: Run) -> dict:
        return {}


@dataclass
class Run:
    """The state of one engine run, shared by its steps."""

    ctx: object  # quant.engine.passes.QuantContext
    structure: object
    blocks: nn.ModuleList
    device: torch.device
    kwargs: list[dict] = field(default_factory=list)  # each block's own arguments (mask, rotary tables)
    x: torch.Tensor | None = None  # the quantized model's stream at the current block, [windows, seq, hidden]
    xf: torch.Tensor | None = None  # the float model's stream (GPTAQ, DAC's float teacher)
    x_in: torch.Tensor | None = None  # the quantized stream entering the current block (steps may replace run.x)
    steps: list = field(default_factory=list)  # the run's steps, in order
    notes: dict = field(default_factory=dict)  # per-block notes: {block index: {key: value}}
    current: int = 0

    def note(self, key: str, value) -> None:
        self.notes.setdefault(self.current, {})[key] = value

    def noted(self, key: str) -> list:
        """Every block's note ``key``, in block order (finished blocks of an earlier, resumed run included)."""
        return [n[key] for _, n in sorted(self.notes.items()) if key in n]


# ----------------------------------------------------------------------------------------- stream capture
def capture(model: nn.Module, blocks: nn.ModuleList, ids: torch.Tensor) -> tuple[torch.Tensor, list[dict]]:
    """Block 0's input for every window of ``ids`` ``[windows, seq]`` and every block's own keyword arguments
    (mask, rotary tables; recorded from the first window: windows share a length, so they hold for all).

    The model runs with every block's forward replaced by a recorder that returns its input unchanged, so no
    block weight is touched (blocks may be on the meta device) and only the embeddings compute; decoder
    blocks of transformers 5 return a tensor, which is what the recorder returns."""
    from quant.engine.structure import _positional_names

    xs: list[torch.Tensor] = []
    kws: list[dict | None] = [None] * len(blocks)
    last = len(blocks) - 1

    def recorder(i: int, block: nn.Module):
        def forward(*args, **kw):
            kw = dict(kw)
            x = args[0] if args else kw.pop("hidden_states")
            if i == 0:
                xs.append(x.detach())
            if kws[i] is None:
                kw.update(zip(_positional_names(block), args[1:], strict=False))
                for k in ("past_key_values", "past_key_value", "layer_past"):
                    kw.pop(k, None)
                kw["use_cache"] = False
                kws[i] = kw
            if i == last or kws[last] is not None:  # later windows stop at block 0
                raise _Stop
            return x

        return forward

    for i, b in enumerate(blocks):
        b.forward = recorder(i, b)
    try:
        with torch.no_grad():
            for row in ids:
                try:
                    model(row[None], use_cache=False)
                except _Stop:
                    pass
    finally:
        for b in blocks:
            del b.forward
    if any(k is None for k in kws):
        raise QuantError("cannot record the decoder blocks' arguments: some blocks did not run")
    return stacked(xs), kws


# ----------------------------------------------------------------------------------------- the loop
def run_blocks(ctx, steps: list[BlockStep]) -> list[dict]:
    """Run ``steps`` block by block over ``ctx.model`` (resident, or streamed from ``ctx.source``); returns each
    step's summary. With ``ctx.work`` (a :class:`quant.engine.resume.WorkDir`), finished blocks are recorded and a
    restarted run resumes after the last one; ``ctx.activations`` says where the activations live."""
    with activation_store(getattr(ctx, "activations", None) or ActivationStore()):
        return _run_blocks(ctx, steps)


def _run_blocks(ctx, steps: list[BlockStep]) -> list[dict]:
    from quant.engine.streaming import _outer_names

    model, source, work = ctx.model, ctx.source, ctx.work
    structure = source.structure(model)
    blocks = structure.blocks(model)
    run = Run(ctx, structure, blocks, torch.device(ctx.device), steps=steps)
    done = work.finished() if work is not None else 0
    needs_data = any(s.needs_data for s in steps)
    dtype = getattr(source, "dtype", None)  # the blocks' compute dtype: streams and recorded arguments follow it

    source.load_outer(model, structure, "inputs")
    for step in steps:  # model-level work before block 0 (rerun on resume: deterministic)
        step.start(run)
    if needs_data or source.streaming:  # a streamed model carries a probe stream to discover odd blocks on
        ids = dist.shard(ctx.calib_ids) if needs_data else source.probe_ids(model)
        x, run.kwargs = capture(model, blocks, ids.to(run.device))
        run.kwargs = [to_compute(kw, run.device, dtype) for kw in run.kwargs]
        run.x = to_compute(x, run.device, dtype)
        run.xf = stacked([run.x]) if any(s.float_stream for s in steps) else None
    if source.streaming and work is not None:
        work.save_outer(model, _outer_names(model, structure, "inputs"), "inputs")
    source.release_outer(model, structure, "inputs")
    if done:
        run.notes, streams = work.restore(done, run.device)
        run.x, run.xf = (to_compute(streams.get(k, getattr(run, k)), run.device, dtype) for k in ("x", "xf"))
        work.reinstall(ctx, structure, range(done), source.streaming)

    bar = tqdm(range(done, len(blocks)), desc="+".join(s.name for s in steps), disable=not ctx.progress,
               unit="block", initial=done, total=len(blocks))
    for i in bar:
        run.current = i
        block = source.load_block(model, structure, i, run)
        run.x_in = run.x
        for step in steps:
            step.block(run, i, block)
        if run.x is not None and not needs_data:  # only the probe stream: advance it
            run.x = _advance(block, run.x, run.kwargs[i])
        if work is not None:
            work.finish_block(ctx, structure, i, block, run)
        source.release_block(model, structure, i)
        run.x_in = None

    source.load_outer(model, structure, "outputs")
    summaries = [s.finish(run) for s in steps]
    if source.streaming and work is not None:
        work.save_outer(model, _outer_names(model, structure, "outputs"), "outputs")
    source.release_outer(model, structure, "outputs")
    return summaries


@torch.no_grad()
def _advance(block: nn.Module, x: torch.Tensor, kwargs: dict, chunk: int = 16) -> torch.Tensor:
    return _each(lambda c: call_block(block, c, kwargs), x, chunk)


def to_compute(obj, device: torch.device, dtype: torch.dtype | None = None):
    """``obj`` (a tensor, or dicts/tuples/lists of them) on ``device``, its floating tensors in ``dtype`` if given."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, dtype) if dtype is not None and obj.is_floating_point() else obj.to(device)
    if isinstance(obj, dict):
        return {k: to_compute(v, device, dtype) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_compute(v, device, dtype) for v in obj)
    return obj


def parse_device(device: str | None) -> torch.device:
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; one line for anything else."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(device)
    except RuntimeError:
        raise QuantError(f"unknown --device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise QuantError(f"--device {device}: this machine has no CUDA device (torch {torch.__version__})")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise QuantError(f"--device {device}: only {torch.cuda.device_count()} CUDA devices are visible")
    elif d.type != "cpu":
        raise QuantError(f"unsupported --device {device!r}; use auto, cpu, cuda or cuda:N")
    return d


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """The compute dtype: ``auto`` is fp32 on CPU (bf16 matmuls are slow there) and bf16 on a GPU."""
    if dtype in (None, "", "auto"):
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if dtype not in DTYPES:
        raise QuantError(f"unknown --dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return DTYPES[dtype]
