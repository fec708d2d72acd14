"""Data-parallel calibration under ``torchrun``: each rank holds a share of the calibration windows.

``torchrun --nproc-per-node N quantize model ...`` starts N copies; ``init()`` joins them (gloo on CPU, NCCL
on CUDA). Every rank holds the whole block being quantized and its own windows of the calibration stream;
what a solver needs from all windows (Hessians ``Σ x xᵀ``, GPTAQ's cross moments, token counts, DAC's mean
shift) is summed across ranks, after which every rank solves the same problem and gets the same codes, so no
broadcast of results is needed and every rank's stream advances through the same quantized block. (The solve
is the cheap part next to the forwards; solving once per rank keeps one code path with no ownership.) Only
rank 0 writes files. With one process every function here is the identity.
"""

from __future__ import annotations

import os

import torch


def world() -> int:
    return torch.distributed.get_world_size() if _active() else 1


def rank() -> int:
    return torch.distributed.get_rank() if _active() else 0


def _active() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def init(device: torch.device) -> None:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1); a plain run does nothing."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or _active():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    torch.distributed.init_process_group(backend)


def local_device(device: torch.device) -> torch.device:
    """``cuda`` under torchrun means this rank's own GPU (``LOCAL_RANK``)."""
    if device.type == "cuda" and device.index is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def shard(windows: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous share of the calibration windows (the first ranks take one more when the count
    does not divide)."""
    n, r, w = windows.shape[0], rank(), world()
    if w > n:
        raise ValueError(f"{w} ranks need at least {w} calibration windows, got {n}")
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return windows[start : start + base + (r < extra)]


def sum_(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over ranks (in place; the same bits on every rank)."""
    if world() > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def barrier() -> None:
    if world() > 1:
        torch.distributed.barrier()
