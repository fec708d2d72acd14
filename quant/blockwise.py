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
    def __init__(self, model: nn.Module, blocks: nn.ModuleList, calib_ids: torch.Tensor) -> None:
        self.blocks = blocks
        self.inputs, self.block_kwargs = self._capture_first_inputs(model, blocks[0], calib_ids)

    @staticmethod
    @torch.no_grad()
    def _capture_first_inputs(model: nn.Module, first: nn.Module, ids: torch.Tensor):
        hidden: list[torch.Tensor] = []
        kwargs: dict = {}

        def hook(_mod, args, kw):
            hidden.append((args[0] if args else kw["hidden_states"]).detach())
            if not kwargs:  # same length every sample: the rotary/mask kwargs are shared
                kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})
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
        kwargs["use_cache"] = False
        kwargs.pop("past_key_values", None)
        return torch.cat(hidden), kwargs

    def _call(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        out = block(x, **self.block_kwargs)
        return out[0] if isinstance(out, tuple) else out

    @torch.no_grad()
    def hessian(self, block: nn.Module, first_reader: nn.Linear) -> torch.Tensor:
        """``E[x xᵀ]`` over all calibration tokens of the input of ``first_reader`` (fp32, ``[in, in]``).

        The forward stops as soon as that input is seen, so later parts of the block cost nothing.
        """
        n_in = first_reader.in_features
        H = torch.zeros(n_in, n_in, device=first_reader.weight.device)
        count = 0

        def hook(_mod, args):
            nonlocal count
            x = args[0].reshape(-1, n_in).float()
            H.addmm_(x.T, x)
            count += x.shape[0]
            raise _Stop

        h = first_reader.register_forward_pre_hook(hook)
        try:
            for x in self.inputs:  # one calibration window at a time
                try:
                    self._call(block, x[None])
                except _Stop:
                    pass
        finally:
            h.remove()
        return H / max(count, 1)

    @torch.no_grad()
    def advance(self, block: nn.Module) -> None:
        """Replace the stream by ``block``'s outputs (with whatever it now holds, quantized or not)."""
        for i in range(self.inputs.shape[0]):
            self.inputs[i] = self._call(block, self.inputs[i : i + 1])[0]


def _input_to(module: nn.Module, call) -> torch.Tensor:
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
def mlp_inputs(block: nn.Module, adapter, x: torch.Tensor, block_kwargs: dict, chunk: int = 16) -> torch.Tensor:
    """The post-attention norm's output (the MLP's input) for every window of ``x``; the MLP does not run."""
    mlp = block.get_submodule(adapter.roles["down"].rpartition(".")[0])
    return torch.cat(
        [_input_to(mlp, lambda c=x[i : i + chunk]: block(c, **block_kwargs)) for i in range(0, x.shape[0], chunk)]
    )


@torch.no_grad()
def run_staged(
    block: nn.Module,
    adapter,
    x: torch.Tensor,
    block_kwargs: dict,
    visit: Callable[[str | tuple[str, ...], torch.Tensor | dict], torch.Tensor | None],
    chunk: int = 16,
) -> torch.Tensor:
    """Run a pre-norm decoder block on every window of ``x`` ``[windows, seq, hidden]``, one stage at a time.

    The block computes ``h = x + attn(norm1(x))`` and ``h + mlp(norm2(h))`` (every architecture the
    adapters know). Before each sequential group of linears runs (``adapter.linear_groups``, as a
    tuple of names inside the block), ``visit(group, inputs)`` sees that group's input for all windows
    at once and may quantize the group; ``visit("post_attention_norm", out)`` sees norm2's output and
    may give the norm a bias (DAC), after which norm2 runs again. So each block costs one forward,
    not one per group. Dense down_proj's visit may return the input it now sees (DSQ absorbs a
    per-channel scale into up_proj, which has already run: ``xd · c``).

    In a sparse-MoE block the MLP groups get ``{name: rows}``: each expert's linears the tokens its
    router sends it (as in inference), the shared expert all tokens, and ``""`` all tokens (for
    experts that get too few); the MLP then runs again for the block's output.
    Windows run ``chunk`` at a time (faster than one by one or all at once on CPU; same numbers).
    """
    from moe.experts import is_moe_block

    def each(fn, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([fn(t[i : i + chunk]) for i in range(0, t.shape[0], chunk)])

    def role(r: str) -> nn.Module:
        return adapter.role(block, r)

    attn = block.get_submodule(adapter.roles["o"].rpartition(".")[0])
    mlp = block.get_submodule(adapter.roles["down"].rpartition(".")[0])
    qkv, o, gate_up, down = (tuple(g) for g in adapter.linear_groups(block))

    xa = each(role("input_norm"), x)
    visit(qkv, xa)
    attn_in = each(lambda c: _input_to(role("o"), lambda: attn(hidden_states=c, **block_kwargs)), xa)
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
            ins[n] = _input_to(owner.down_proj, lambda o=owner, t=t: o(t)) if len(t) else t.new_zeros(0, 0)
        visit(down, ins)
        return h + each(mlp, xc)
    visit(gate_up, xc)
    xd = each(lambda c: _input_to(role("down"), lambda: mlp(c)), xc)
    changed = visit(down, xd)
    return h + each(role("down"), xd if changed is None else changed)


@torch.no_grad()
def expert_hessians(
    runner: BlockRunner, block: nn.Module, linears: dict[str, nn.Module], mlp: nn.Module
) -> dict[str, tuple[torch.Tensor | None, int]]:
    """Per-expert ``(E[x xᵀ], tokens)`` of each linear in a sparse-MoE group, from the tokens the router
    sends it (the whole block runs, as in inference). The MoE block's input Hessian over all tokens is
    returned under ``""`` for the fallback of experts that saw too few tokens."""
    acc: dict[str, list] = {n: [None, 0] for n in [*linears, ""]}

    def add(name: str, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        a = acc[name]
        a[0] = x.T @ x if a[0] is None else a[0].addmm_(x.T, x)
        a[1] += x.shape[0]

    hooks = [m.register_forward_pre_hook(lambda _m, args, n=n: add(n, args[0])) for n, m in linears.items()]
    hooks.append(mlp.register_forward_pre_hook(lambda _m, args: add("", args[0])))
    try:
        for x in runner.inputs:
            runner._call(block, x[None])
    finally:
        for h in hooks:
            h.remove()
    return {n: (None if H is None else H / count, count) for n, (H, count) in acc.items()}


def quantize_blockwise(
    model: nn.Module,
    adapter,
    calib_ids: torch.Tensor,
    quantize_group,
    progress: Iterable | None = None,
) -> None:
    """Drive ``quantize_group(block_index, block, {name: linear}, {name: H or None})`` over every group.

    Groups (``adapter.linear_groups``: q/k/v, o, gate/up, down; experts for MoE) are visited in order;
    each group's Hessians are measured with the earlier groups of the same block already quantized.
    A dense group shares one Hessian (its linears read the same input). In a sparse-MoE group each
    expert gets the Hessian of the tokens routed to it; an expert's gate/up with fewer tokens than
    inputs use the Hessian of all the block's tokens instead, its down (whose input only exists for
    routed tokens) gets ``None``: the caller rounds it to nearest.
    """
    from moe.experts import is_moe_block

    blocks = adapter.blocks(model)
    runner = BlockRunner(model, blocks, calib_ids)
    mlp_name = adapter.roles["down"].rpartition(".")[0]
    for i in progress if progress is not None else range(len(blocks)):
        block = blocks[i]
        mlp = block.get_submodule(mlp_name)
        for group in adapter.linear_groups(block):
            linears = {n: block.get_submodule(n) for n in group}
            if not (is_moe_block(mlp) and group[0].startswith(mlp_name)):
                H = runner.hessian(block, linears[group[0]])
                quantize_group(i, block, linears, dict.fromkeys(group, H))
                continue
            hs = expert_hessians(runner, block, linears, mlp)
            H_all = hs.pop("")[0]
            chosen = {}
            for n, (H, count) in hs.items():
                if count >= linears[n].in_features:
                    chosen[n] = H
                else:
                    chosen[n] = None if n.endswith("down_proj") else H_all
            quantize_group(i, block, linears, chosen)
        runner.advance(block)
