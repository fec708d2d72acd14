"""One block, stage by stage: the stage driver of the block engine (``quant.engine.loop``).

``run_staged`` runs one block over every calibration window of a stream, one stage of linears at a
time, so a pass can quantize each group as soon as its input is known (one forward per block), and
can carry a second, float stream through the block before quantizing it (GPTAQ's asymmetric
objective, D²Quant's DAC).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn


class ActivationStore:
    """Where the calibration activations live: the streams between blocks and each stage's inputs, all windows
    at once ([windows, seq, width]: for a wide model and many tokens, more than the block itself). In memory by
    default; ``folder`` puts them in memory-mapped files there (``--offload-activations``), which the kernel
    writes back and drops when memory runs short. The numbers are the same either way."""

    def __init__(self, folder: str | Path | None = None) -> None:
        self.folder = Path(folder) if folder is not None else None
        self._n = 0

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if self.folder is None or torch.device(device).type != "cpu":
            return torch.empty(shape, dtype=dtype, device=device)
        self.folder.mkdir(parents=True, exist_ok=True)
        f = self.folder / f"act-{os.getpid()}-{self._n}.bin"
        self._n += 1
        numel = math.prod(shape)
        with open(f, "wb") as fh:
            fh.truncate(numel * dtype.itemsize)
        t = torch.from_file(str(f), shared=True, size=numel, dtype=dtype)
        f.unlink()  # the mapping keeps the data; the disk space is freed with the tensor
        return t.view(shape)


_store = ActivationStore()


@contextmanager
def activation_store(store: ActivationStore):
    """Use ``store`` for the activations the engine allocates inside this block."""
    global _store
    old, _store = _store, store
    try:
        yield store
    finally:
        _store = old


def stacked(parts: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(parts)`` (along dim 0), into a tensor from the activation store."""
    first = parts[0]
    out = _store.empty((sum(t.shape[0] for t in parts), *first.shape[1:]), first.dtype, first.device)
    i = 0
    for t in parts:
        out[i : i + t.shape[0]] = t
        i += t.shape[0]
    return out


class _Stop(Exception):
    """Raised from a hook to end a forward pass once the needed inputs are captured."""


def call_block(block: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def input_to(module: nn.Module, call) -> torch.Tensor:
    """The input ``module`` receives while ``call()`` runs; the call stops there."""
    got: list[torch.Tensor] = []

    def hook(_mod, args):
        got.append(args[0])
        raise _Stop

    h = module.register_forward_pre_hook(hook)
    try:
        call()
    except _Stop:
        pass
    finally:
        h.remove()
    return got[0]


POST_ATTENTION_NORM = "post_attention_norm"


@torch.no_grad()
def mlp_inputs(block: nn.Module, structure, x: torch.Tensor, block_kwargs: dict, chunk: int = 16) -> torch.Tensor:
    """The MLP's pre-norm output (the MLP's input) for every window of ``x``; the MLP does not run."""
    mlp = structure.role(block, "mlp")
    return _each(lambda c: input_to(mlp, lambda: block(c, **block_kwargs)), x, chunk)


Visit = Callable[[str | tuple[str, ...], torch.Tensor | dict], torch.Tensor | None]


@torch.no_grad()
def run_staged(
    block: nn.Module, structure, x: torch.Tensor, block_kwargs: dict, visit: Visit, chunk: int = 16
) -> torch.Tensor:
    """Run a decoder block on every window of ``x`` ``[windows, seq, hidden]``, one stage at a time.

    Before each stage of linears runs (``structure.linear_groups``, as a tuple of names inside the block),
    ``visit(stage, inputs)`` sees that stage's input for all windows at once and may quantize it: a tensor
    where the stage's linears share their input, else ``{name: input}``. Returns the block's output.

    A pre-norm block (``x + attn(norm1 x)``, then ``h + mlp(norm2 h)``, checked numerically when the
    structure was discovered) costs one forward (``_run_prenorm``, which also offers DAC its norm and
    takes DSQ's rescaled input back); any other block runs up to each stage again (``_run_generic``).
    """
    if structure.info(block).staged:
        return _run_prenorm(block, structure, x, block_kwargs, visit, chunk)
    return _run_generic(block, structure, x, block_kwargs, visit, chunk)


def _each(fn, t: torch.Tensor, chunk: int) -> torch.Tensor:
    """``fn`` over ``chunk`` windows of ``t`` at a time, the results stacked in the activation store."""
    out = None
    for i in range(0, t.shape[0], chunk):
        y = fn(t[i : i + chunk])
        if out is None:
            out = _store.empty((t.shape[0], *y.shape[1:]), y.dtype, y.device)
        out[i : i + y.shape[0]] = y
    return out


def _run_generic(block: nn.Module, structure, x: torch.Tensor, kwargs: dict, visit: Visit, chunk: int) -> torch.Tensor:
    """Each stage's inputs from a forward that stops once the stage has been reached (the whole block in a
    sparse-MoE stage, whose experts see only their routed tokens; ``""`` then holds the MoE block's input)."""
    info = structure.info(block)
    for stage in info.stages:
        mods = {n: block.get_submodule(n) for n in stage}
        if any(".experts." in n for n in stage):
            mods[""] = structure.role(block, "mlp")
        got: dict[str, list[torch.Tensor]] = {n: [] for n in mods}
        shared = True
        for i in range(0, x.shape[0], chunk):
            seen: dict[str, torch.Tensor] = {}

            def pre(name, seen=seen, stop_after=0 if "" in mods else len(mods)):
                def hook(_m, args):
                    seen.setdefault(name, args[0])
                    if len(seen) == stop_after:
                        raise _Stop

                return hook

            hooks = [m.register_forward_pre_hook(pre(n)) for n, m in mods.items()]
            try:
                call_block(block, x[i : i + chunk], kwargs)
            except _Stop:
                pass
            finally:
                for h in hooks:
                    h.remove()
            shared &= len({id(t) for t in seen.values()}) == 1 and len(seen) == len(mods)
            for n in mods:
                t = seen.get(n)
                got[n].append(t.reshape(-1, t.shape[-1]) if t is not None and "" in mods else t)
        ins = {n: torch.cat([t for t in ts if t is not None]) if any(t is not None for t in ts)
               else x.new_zeros(0, mods[n].in_features if n else x.shape[-1]) for n, ts in got.items()}
        visit(tuple(stage), ins[stage[0]] if shared else ins)
    return _each(lambda c: call_block(block, c, kwargs), x, chunk)


def _run_prenorm(block: nn.Module, structure, x: torch.Tensor, block_kwargs: dict, visit: Visit, chunk: int):
    """One forward of ``h = x + attn(norm1(x))``, ``h + mlp(norm2(h))``, stage by stage.

    ``visit("post_attention_norm", out)`` sees norm2's output and may give the norm a bias (DAC), after
    which norm2 runs again. Dense down_proj's visit may return the input it now sees (DSQ absorbs a
    per-channel scale into up_proj, which has already run: ``xd · c``).

    In a sparse-MoE block the MLP groups get ``{name: rows}``: each expert's linears the tokens its
    router sends it (as in inference), the shared expert all tokens, and ``""`` all tokens (for
    experts that get too few); the MLP then runs again for the block's output.
    Windows run ``chunk`` at a time (faster than one by one or all at once on CPU; same numbers).
    """
    from moe.experts import is_moe_block

    def each(fn, t: torch.Tensor) -> torch.Tensor:
        return _each(fn, t, chunk)

    def role(r: str) -> nn.Module:
        return structure.role(block, r)

    attn, mlp = role("attn"), role("mlp")
    qkv, o, gate_up, down = (tuple(g) for g in structure.linear_groups(block))

    xa = each(role("input_norm"), x)
    visit(qkv, xa)
    attn_in = each(lambda c: input_to(role("o"), lambda: attn(hidden_states=c, **block_kwargs)), xa)
    del xa
    visit(o, attn_in)
    h = each(_past_ops(role("o")), attn_in).add_(x)  # x + o(attn): in place, so h lives in the activation store
    del attn_in
    norm2 = role(POST_ATTENTION_NORM)
    visit(POST_ATTENTION_NORM, each(norm2, h))
    xc = each(norm2, h)
    if is_moe_block(mlp):
        flat = xc.reshape(-1, xc.shape[-1])
        routed = mlp.gate(flat)[2]  # top-k expert ids per token, from the (float) router
        rows = {}
        for owner in dict.fromkeys(n.rpartition(".")[0] for n in down):
            e = owner.rpartition(".")[2]
            rows[owner] = flat[(routed == int(e)).any(-1)] if e.isdigit() else flat
        visit(gate_up, {"": flat, **{n: rows[n.rpartition(".")[0]] for n in gate_up}})
        ins = {}
        for n in down:
            owner = block.get_submodule(n.rpartition(".")[0])
            t = rows[n.rpartition(".")[0]]
            ins[n] = (input_to(owner.down_proj, lambda o=owner, t=t: o(t)) if len(t)
                      else t.new_zeros(0, owner.down_proj.in_features))
        visit(down, ins)
        return each(mlp, xc).add_(h)
    visit(gate_up, xc)
    xd = each(lambda c: input_to(role("down"), lambda: mlp(c)), xc)
    changed = visit(down, xd)
    return each(_past_ops(role("down")), xd if changed is None else changed).add_(h)


def _past_ops(linear: nn.Module):
    """``linear`` called on an input :func:`input_to` captured: that input has been through the linear's online
    ops (its forward pre-hook, e.g. the Hadamard before down_proj), so the call skips the hooks, which would
    apply them twice."""
    return linear.forward
