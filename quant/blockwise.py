"""Block-by-block calibration: capture a block's inputs, let a pass quantize it, propagate its outputs.

One activation stream (``[samples, seqlen, hidden]``) is held, plus the Hessian of whichever
linear group is being quantized, so memory stays near one block's work plus the activations.
The stream carries the *quantized* model's activations: each block is calibrated on the inputs it
will really see. ``run_staged`` runs one block stage by stage over all windows, so a pass can
quantize each group as its input appears (one forward per block), and can carry a second, float
stream through the block before quantizing it (GPTAQ's asymmetric objective, D²Quant's DAC).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


class _Stop(Exception):
    """Raised from a hook to end a forward pass once the needed inputs are captured."""


class BlockRunner:
    """The calibration stream at one block's input, and the arguments each block gets from its model.

    Every block keeps its own keyword arguments (attention mask, rotary tables): sliding-window and
    global layers (Gemma 2/3) differ, so block 0's are never replayed for all. They are recorded from
    one full forward of the first window (windows share a length, so they hold for every window)."""

    def __init__(self, model: nn.Module, blocks: nn.ModuleList, calib_ids: torch.Tensor) -> None:
        from quant.structure import capture_block_inputs

        self.blocks = blocks
        self._index = {id(b): i for i, b in enumerate(blocks)}
        self.kwargs = [kw for _, kw in capture_block_inputs(model, blocks, calib_ids[:1])]
        self.inputs = self._capture_first_inputs(model, blocks[0], calib_ids)

    @property
    def block_kwargs(self) -> dict:
        return self.kwargs[0]

    def kwargs_for(self, block: nn.Module) -> dict:
        """``block``'s own arguments (a copy of a block, for example its float twin, gets block 0's)."""
        return self.kwargs[self._index.get(id(block), 0)]

    @staticmethod
    @torch.no_grad()
    def _capture_first_inputs(model: nn.Module, first: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        hidden: list[torch.Tensor] = []

        def hook(_mod, args, kw):
            hidden.append((args[0] if args else kw["hidden_states"]).detach())
            raise _Stop

        h = first.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            for row in ids:
                try:
                    model(row[None], use_cache=False)
                except _Stop:
                    pass
        finally:
            h.remove()
        return torch.cat(hidden)

    def _call(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return call_block(block, x, self.kwargs_for(block))

    @torch.no_grad()
    def hessians(self, block: nn.Module, linears: dict[str, nn.Module], whole: nn.Module | None = None) -> dict:
        """``name -> (E[x xᵀ], tokens)`` (fp32, ``[in, in]``) of each linear's input over all calibration tokens.

        Linears fed the same tensor (q/k/v; gate/up) share one accumulation. The forward stops once every
        linear has been reached, so later parts of the block cost nothing; a sparse-MoE stage runs the
        whole block (experts see only the tokens routed to them) and ``whole`` (the MoE block) adds the
        Hessian of all its tokens under ``""``, for experts that saw too few."""
        acc: dict[str, list] = {}
        share: dict[str, str] = {}

        def pre(name):
            def hook(_mod, args):
                x = args[0]
                owner = next((n for n, t in seen.items() if t is x), None)
                seen[name] = x
                if owner is not None:
                    share.setdefault(name, share.get(owner, owner))
                else:
                    a = acc.setdefault(name, [None, 0])
                    x = x.reshape(-1, x.shape[-1]).float()
                    if a[0] is None:
                        a[0] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
                    a[0].addmm_(x.T, x)
                    a[1] += x.shape[0]
                if whole is None and len(seen) == len(linears):
                    raise _Stop

            return hook

        hooks = [m.register_forward_pre_hook(pre(n)) for n, m in linears.items()]
        if whole is not None:
            hooks.append(whole.register_forward_pre_hook(pre("")))
        try:
            for x in self.inputs:  # one calibration window at a time
                seen: dict[str, torch.Tensor] = {}
                try:
                    self._call(block, x[None])
                except _Stop:
                    pass
        finally:
            for h in hooks:
                h.remove()
        out = {n: (None, 0) if a[0] is None else (a[0] / max(a[1], 1), a[1]) for n, a in acc.items()}
        for n in [*linears, *([""] if whole is not None else [])]:
            if n not in out:
                out[n] = out[share[n]] if n in share else (None, 0)
        return out

    @torch.no_grad()
    def hessian(self, block: nn.Module, first_reader: nn.Module) -> torch.Tensor:
        """``E[x xᵀ]`` over all calibration tokens of the input of ``first_reader``."""
        return self.hessians(block, {"": first_reader})[""][0]

    @torch.no_grad()
    def advance(self, block: nn.Module) -> None:
        """Replace the stream by ``block``'s outputs (with whatever it now holds, quantized or not)."""
        for i in range(self.inputs.shape[0]):
            self.inputs[i] = self._call(block, self.inputs[i : i + 1])[0]


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
    return torch.cat(
        [input_to(mlp, lambda c=x[i : i + chunk]: block(c, **block_kwargs)) for i in range(0, x.shape[0], chunk)]
    )


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
    return torch.cat([fn(t[i : i + chunk]) for i in range(0, t.shape[0], chunk)])


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
        ins = {n: torch.cat([t for t in ts if t is not None]) if any(t is not None for t in ts) else x.new_zeros(0, 0)
               for n, ts in got.items()}
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
    h = x + each(role("o"), attn_in)
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
            ins[n] = input_to(owner.down_proj, lambda o=owner, t=t: o(t)) if len(t) else t.new_zeros(0, 0)
        visit(down, ins)
        return h + each(mlp, xc)
    visit(gate_up, xc)
    xd = each(lambda c: input_to(role("down"), lambda: mlp(c)), xc)
    changed = visit(down, xd)
    return h + each(role("down"), xd if changed is None else changed)


def quantize_blockwise(
    model: nn.Module,
    structure,
    calib_ids: torch.Tensor,
    quantize_group,
    progress: Iterable | None = None,
) -> None:
    """Drive ``quantize_group(block_index, block, {name: linear}, {name: H or None})`` over every stage.

    Stages (``structure.linear_groups``: q/k/v, o, gate/up, down; a parallel block's attention and MLP
    inputs together; experts for MoE) are visited in order; each stage's Hessians are measured with the
    earlier stages of the same block already quantized. Linears reading the same input share one Hessian.
    In a sparse-MoE stage each expert gets the Hessian of the tokens routed to it; an expert's gate/up
    with fewer tokens than inputs use the Hessian of all the block's tokens instead, its down (whose
    input only exists for routed tokens) gets ``None``: the caller rounds it to nearest.
    """
    blocks = structure.blocks(model)
    runner = BlockRunner(model, blocks, calib_ids)
    for i in progress if progress is not None else range(len(blocks)):
        block = blocks[i]
        for group in structure.linear_groups(block):
            linears = {n: block.get_submodule(n) for n in group}
            experts = any(".experts." in n for n in group)
            hs = runner.hessians(block, linears, structure.role(block, "mlp") if experts else None)
            if not experts:
                quantize_group(i, block, linears, {n: hs[n][0] for n in group})
                continue
            H_all = hs.pop("")[0]
            chosen = {}
            for n in group:
                H, count = hs[n]
                if count >= linears[n].in_features:
                    chosen[n] = H
                else:
                    chosen[n] = None if n.endswith("down_proj") else H_all
            quantize_group(i, block, linears, chosen)
        runner.advance(block)
