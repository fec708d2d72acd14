"""Block-by-block calibration: capture a block's inputs, let a pass quantize it, propagate its outputs.

One activation stream (``[samples, seqlen, hidden]``) is held, plus the Hessian of whichever
linear group is being quantized, so memory stays near one block's work plus the activations.
The stream carries the *quantized* model's activations: each block is calibrated on the inputs it
will really see. With ``keep_float=True`` a second stream carries the float model's activations
(through a float copy of each block), for methods that compare the two: GPTAQ's asymmetric
objective and D²Quant's deviation-aware correction.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


class _Stop(Exception):
    """Raised from a hook to end a forward pass once the needed inputs are captured."""


class BlockRunner:
    def __init__(
        self, model: nn.Module, blocks: nn.ModuleList, calib_ids: torch.Tensor, keep_float: bool = False
    ) -> None:
        self.blocks = blocks
        self.inputs, self.block_kwargs = self._capture_first_inputs(model, blocks[0], calib_ids)
        self.float_inputs = self.inputs.clone() if keep_float else None

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

    def _input_of(self, block: nn.Module, module: nn.Module, x: torch.Tensor, output: bool = False) -> torch.Tensor:
        """The input (or output) of ``module`` when ``block`` runs on ``x``, flattened to ``[tokens, features]``."""
        got: list[torch.Tensor] = []

        def hook(_mod, args, out=None):
            t = out if output else args[0]
            got.append(t.reshape(-1, t.shape[-1]).float())
            raise _Stop

        h = module.register_forward_hook(hook) if output else module.register_forward_pre_hook(hook)
        try:
            self._call(block, x)
        except _Stop:
            pass
        finally:
            h.remove()
        return got[0]

    @torch.no_grad()
    def hessian_and_cross(
        self, block: nn.Module, reader: nn.Linear, float_block: nn.Module, float_reader: nn.Linear
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``H = E[x̃ x̃ᵀ]`` on the quantized stream and ``P = E[x x̃ᵀ]`` against the float stream.

        ``x̃`` is ``reader``'s input in the (partly quantized) block, ``x`` the same input in the float
        block on the float model's activations. GPTAQ's objective ``E‖W x - Ŵ x̃‖²`` is minimised
        without constraint by ``W P H⁻¹``.
        """
        n = reader.in_features
        H = torch.zeros(n, n, device=reader.weight.device)
        P = torch.zeros_like(H)
        for xq, xf in zip(self.inputs, self.float_inputs, strict=True):
            a = self._input_of(block, reader, xq[None])
            b = self._input_of(float_block, float_reader, xf[None])
            H.addmm_(a.T, a)
            P.addmm_(b.T, a)
        count = self.inputs.shape[0] * self.inputs.shape[1]
        return H / count, P / count

    @torch.no_grad()
    def mean_output_gap(
        self,
        block: nn.Module,
        module: nn.Module,
        float_block: nn.Module,
        float_module: nn.Module,
        teacher_input: str = "float",
        skip_first: int = 0,
    ) -> torch.Tensor:
        """Mean over calibration tokens of ``float_module``'s output in the float block minus ``module``'s
        in the quantized block: the per-channel drift the quantized weights introduce. The float block
        reads the float stream (``teacher_input="float"``) or the same quantized stream as the student
        (``"quantized"``: only this block's drift). ``skip_first`` leaves out each window's first tokens."""
        total, count = None, 0
        for xq, xf in zip(self.inputs, self.float_inputs, strict=True):
            teacher_x = xf if teacher_input == "float" else xq
            t = self._input_of(float_block, float_module, teacher_x[None], True)
            d = (t - self._input_of(block, module, xq[None], True))[skip_first:]
            total = d.sum(0) if total is None else total + d.sum(0)
            count += d.shape[0]
        return total / count

    @torch.no_grad()
    def advance(self, block: nn.Module, float_block: nn.Module | None = None) -> None:
        """Replace the stream by ``block``'s outputs (with whatever it now holds, quantized or not),
        and the float stream by ``float_block``'s."""
        for i in range(self.inputs.shape[0]):
            self.inputs[i] = self._call(block, self.inputs[i : i + 1])[0]
            if float_block is not None:
                self.float_inputs[i] = self._call(float_block, self.float_inputs[i : i + 1])[0]


def quantize_blockwise(
    model: nn.Module,
    adapter,
    calib_ids: torch.Tensor,
    quantize_group,
    progress: Iterable | None = None,
) -> None:
    """Drive ``quantize_group(block_index, block, {role: linear}, H)`` over every sequential group.

    Groups (``adapter.sequential_groups``: q/k/v, o, gate/up, down) are visited in order; each
    group's Hessian is measured with the earlier groups of the same block already quantized.
    """
    blocks = adapter.blocks(model)
    runner = BlockRunner(model, blocks, calib_ids)
    for i in progress if progress is not None else range(len(blocks)):
        block = blocks[i]
        for group in adapter.sequential_groups:
            linears = {r: adapter.role(block, r) for r in group}
            H = runner.hessian(block, linears[group[0]])
            quantize_group(i, block, linears, H)
        runner.advance(block)
