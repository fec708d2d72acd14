"""What a linear does to its input before the matmul: online ops left by a transform, then simulated
activation quantization.

Each affected linear gets a submodule ``input_ops`` (``InputOps``) and a forward pre-hook that runs it,
in this order:

1. ``token_scale``: divide by the per-token factor the block's dynamic scaler computed (FPTQuant's
   S_n, on o_proj and down_proj, see ``quant.methods.fpt``);
2. ``hadamard``: ``x ← x H`` with the orthonormal Hadamard of the input width (FPTQuant's T_d before
   down_proj; ``H`` is merged into the weight as ``W H``);
3. activation quantization (``ActQuantConfig``): INT4/INT8, per token and dynamic (scale from each
   token's own range at run time) or per tensor and static (one scale calibrated on data, stored as
   the buffer ``<linear>.input_ops.act_scale``). Rounding passes gradients straight through, so the
   same module serves the end-to-end fit.

``kv_bits`` also quantizes the KV cache: keys (after RoPE) and values per token and head, dynamic
and symmetric, inside attention (an attention function registered with transformers as
``"lowbit_kv"``: SDPA on the quantized keys and values).

The checkpoint lists every such linear under ``quantization_config.input_ops`` and the activation
settings under ``quantization_config.activations``; loading re-attaches them (``attach_from_config``)
before the state dict is read, so static scales reload exactly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from quant.engine.options import option
from quant.engine.passes import QuantContext, register_pass
from quant.errors import QuantError
from quant.numerics.hadamard import hadamard_transform, has_hadamard

ACT_BITS = (4, 8, 16)  # 16: not quantized
ACT_MODES = ("dynamic", "static")
KV_ATTENTION = "lowbit_kv"


@dataclass
class ActQuantConfig:
    """Simulated activation quantization: the inputs of every block linear, and the KV cache."""

    bits: int = option(16, "Bits of the inputs of every block linear: 16 (not quantized), 8 or 4.", "--act-bits")
    mode: str = option(
        "dynamic", "Activation scales: dynamic (per token, at run time) or static (one per tensor, calibrated).",
        "--act-mode",
    )
    sym: bool = option(True, "Symmetric or asymmetric activation grid.", "--act-sym/--act-asym")
    clip: float = option(1.0, "dynamic: fraction of each token's range kept (static searches its own clip).")
    kv_bits: int = option(
        16, "KV cache bits: 16 (not quantized), 8 or 4 (keys after RoPE and values, per token and head).", "--kv-bits"
    )

    def validate(self) -> None:
        if self.bits not in ACT_BITS or self.kv_bits not in ACT_BITS:
            raise QuantError(
                f"activation bits must be one of {ACT_BITS} (16: not quantized); got {self.bits} for the linear "
                f"inputs and {self.kv_bits} for the KV cache"
            )
        if self.mode not in ACT_MODES:
            raise QuantError(f"activation mode must be one of {ACT_MODES}, got {self.mode!r}")
        if self.mode == "static" and not self.sym:
            raise QuantError("static activation scales are symmetric (one scale per tensor); use --act-sym")
        if not 0.0 < self.clip <= 1.0:
            raise QuantError(f"activation clip must be in (0, 1], got {self.clip}")


def _ste_round(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def fake_quant_tokens(x: torch.Tensor, cfg: ActQuantConfig) -> torch.Tensor:
    """Quantize-dequantize each token (last dimension) with its own range; gradients pass straight through."""
    if cfg.sym:
        qmax = 2 ** (cfg.bits - 1) - 1
        scale = (cfg.clip * x.detach().abs().amax(-1, keepdim=True)).clamp_min(1e-8) / qmax
        return _ste_round(x / scale).clamp(-qmax - 1, qmax) * scale
    qmax = 2**cfg.bits - 1
    lo, hi = x.detach().amin(-1, keepdim=True) * cfg.clip, x.detach().amax(-1, keepdim=True) * cfg.clip
    scale = (hi - lo).clamp_min(1e-8) / qmax
    zero = torch.round(-lo / scale)
    return (_ste_round(x / scale + zero).clamp(0, qmax) - zero) * scale


def fake_quant_static(x: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-tensor quantize-dequantize with a fixed scale."""
    qmax = 2 ** (bits - 1) - 1
    return _ste_round(x / scale).clamp(-qmax - 1, qmax) * scale


class TokenScale:
    """The per-token divisor a block's dynamic scaler computed for this forward (shared by its linears)."""

    value: torch.Tensor | None = None


class InputOps(nn.Module):
    def __init__(self, hadamard: int = 0, act: ActQuantConfig | None = None) -> None:
        super().__init__()
        if hadamard and not has_hadamard(hadamard):
            raise QuantError(f"no Hadamard construction for width {hadamard}")
        self.hadamard = hadamard
        self.act = act
        self.token_scale: TokenScale | None = None
        self.register_buffer("act_scale", torch.ones(()) if act is not None and act.mode == "static" else None)
        self._observe = None  # set during static calibration: a callable that sees the pre-quantization input

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.token_scale is not None and self.token_scale.value is not None:
            x = x / self.token_scale.value.to(x.dtype)
        if self.hadamard:
            x = hadamard_transform(x)
        if self._observe is not None:
            self._observe(x)
            return x
        if self.act is None:
            return x
        if self.act.mode == "static":
            return fake_quant_static(x, self.act_scale.to(x.dtype), self.act.bits)
        return fake_quant_tokens(x, self.act)

    def spec(self) -> dict:
        return {"hadamard": self.hadamard, "token_scale": self.token_scale is not None}

    def extra_repr(self) -> str:
        act = "none" if self.act is None else f"{self.act.mode} int{self.act.bits}"
        return f"hadamard={self.hadamard}, token_scale={self.token_scale is not None}, act={act}"


def _kv_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cfg = getattr(module, "kv_quant", None)
    if cfg is not None:  # [batch, kv heads, tokens, head_dim]: one scale per token and head
        key, value = fake_quant_tokens(key, cfg), fake_quant_tokens(value, cfg)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register_kv_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(KV_ATTENTION, _kv_attention)
    AttentionMaskInterface.register(KV_ATTENTION, sdpa_mask)


def set_kv_quant(model: nn.Module, bits: int) -> None:
    """Quantize keys and values to ``bits`` inside every attention (16: stop).

    The setting goes on each block's attention module: the one transformers' attention interface is
    handed as ``module``, by its convention a ``*Attention`` class (found without running the model, so
    that a checkpoint's meta-device skeleton gets it too)."""
    from quant.engine.structure import find_blocks

    cfg = None if bits == 16 else ActQuantConfig(bits=bits, mode="dynamic", sym=True)
    if cfg is not None and getattr(model.config, "attn_logit_softcapping", None):
        raise QuantError("KV-cache quantization runs on SDPA attention, which has no logit soft-capping (Gemma 2); "
                         "use --kv-bits 16")
    for block in model.get_submodule(find_blocks(model)):
        attn = [m for m in block.modules() if type(m).__name__.endswith("Attention")]
        if not attn:
            raise QuantError(f"KV-cache quantization found no attention module in {type(block).__name__}")
        for m in attn:
            m.kv_quant = cfg
    if cfg is not None and model.config._attn_implementation != KV_ATTENTION:
        _register_kv_attention()
        model.set_attn_implementation(KV_ATTENTION)


def kv_bits(model: nn.Module) -> int:
    cfgs = [getattr(m, "kv_quant", None) for m in model.modules()]
    return next((c.bits for c in cfgs if c is not None), 16)


def _run_ops(module: nn.Module, args: tuple) -> tuple:
    return (module.input_ops(args[0]), *args[1:])


def input_ops(linear: nn.Module) -> InputOps:
    """The linear's ``InputOps``, attached (with its pre-hook) on first use."""
    ops = getattr(linear, "input_ops", None)
    if ops is None:
        linear.input_ops = InputOps()
        linear._input_ops_hook = linear.register_forward_pre_hook(_run_ops)
        ops = linear.input_ops
    return ops


def move_input_ops(old: nn.Module, new: nn.Module) -> None:
    """Carry ``old``'s input ops over to the module replacing it (a quantizer installing a QuantLinear)."""
    ops = getattr(old, "input_ops", None)
    if ops is not None:
        new.input_ops = ops
        new._input_ops_hook = new.register_forward_pre_hook(_run_ops)


def ops_modules(model: nn.Module) -> dict[str, InputOps]:
    return {n: m.input_ops for n, m in model.named_modules() if isinstance(getattr(m, "input_ops", None), InputOps)}


def set_act_quant(model: nn.Module, names: list[str], act: ActQuantConfig | None) -> None:
    """Quantize the inputs of the named linears (``act=None``: stop quantizing them)."""
    for name in names:
        ops = input_ops(model.get_submodule(name))
        ops.act = act
        if act is not None and act.mode == "static" and ops.act_scale is None:
            ops.register_buffer("act_scale", torch.ones((), device=ops_device(model)))


def ops_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def calibrate_static(model: nn.Module, names: list[str], bits: int, ids: torch.Tensor, progress: bool = True) -> None:
    """Per-tensor static scales: pass 1 finds each input's absolute maximum over the calibration
    tokens; pass 2 picks, per tensor, the clip of that maximum (from a grid) with the least squared
    quantization error over the same tokens."""
    ratios = torch.linspace(0.3, 1.0, 15)
    qmax = 2 ** (bits - 1) - 1
    ops = {n: input_ops(model.get_submodule(n)) for n in names}
    amax = dict.fromkeys(names, 0.0)
    err = {n: torch.zeros(len(ratios), dtype=torch.float64) for n in names}

    def run(desc: str) -> None:
        for row in tqdm(ids, desc=desc, disable=not progress, unit="window"):
            model(row[None].to(ops_device(model)), use_cache=False)

    def observe_max(n):
        def f(x):
            amax[n] = max(amax[n], float(x.abs().max()))

        return f

    def observe_err(n):
        def f(x):
            x = x.float()
            for i, r in enumerate(ratios):
                s = max(float(r) * amax[n], 1e-8) / qmax
                err[n][i] += float(((torch.round(x / s).clamp(-qmax - 1, qmax) * s - x) ** 2).sum())

        return f

    try:
        for n in names:
            ops[n]._observe = observe_max(n)
        run("activation ranges")
        for n in names:
            ops[n]._observe = observe_err(n)
        run("activation clip search")
    finally:
        for o in ops.values():
            o._observe = None
    for n in names:
        best = float(ratios[int(torch.argmin(err[n]))])
        ops[n].act_scale.fill_(max(best * amax[n], 1e-8) / qmax)


def act_quant_targets(ctx: QuantContext) -> list[str]:
    return ctx.structure.linear_names(ctx.model)


@register_pass("actquant", ActQuantConfig)
def actquant_pass(ctx: QuantContext, config: ActQuantConfig) -> dict:
    """Simulated quantization of every block linear's input and of the KV cache (after the weight quantizer)."""
    config.validate()
    names = act_quant_targets(ctx) if config.bits != 16 else []
    set_act_quant(ctx.model, names, config)
    set_kv_quant(ctx.model, config.kv_bits)
    out = {"linears": len(names), "kv_cache_bits": config.kv_bits}
    if config.mode == "static" and names:
        if ctx.calib_ids is None:
            raise QuantError("static activation quantization needs calibration data")
        calibrate_static(ctx.model, names, config.bits, ctx.calib_ids, ctx.progress)
        out["calibration_windows"] = int(ctx.calib_ids.shape[0])
    return out


def input_ops_config(model: nn.Module) -> dict:
    """What the checkpoint records (only what is there): ``input_ops`` ``{linear: {"hadamard", "token_scale"}}``
    and ``activations`` (the settings, the linears they apply to, ``kv_bits``)."""
    ops = ops_modules(model)
    acts = {dataclasses.astuple(o.act) for o in ops.values() if o.act is not None}
    if len(acts) > 1:
        raise QuantError("mixed activation-quantization settings across layers are not supported in checkpoints")
    act = next((dataclasses.asdict(o.act) for o in ops.values() if o.act is not None), None)
    kv = kv_bits(model)
    if act is None and kv != 16:
        act = dataclasses.asdict(ActQuantConfig(bits=16))
    if act is not None:
        act.update(kv_bits=kv, modules=[n for n, o in ops.items() if o.act is not None])
    out = {"input_ops": {n: o.spec() for n, o in ops.items() if o.hadamard or o.token_scale is not None}}
    return {k: v for k, v in {**out, "activations": act}.items() if v}


def attach_from_config(model: nn.Module, qc: dict, where: str = "checkpoint") -> None:
    """Re-create the input ops and activation quantization a checkpoint lists (before its state dict is loaded)."""
    from quant.formats.qconfig import check_hadamard
    from quant.methods.fpt import install_dynamic_scaling

    specs, act = qc.get("input_ops") or {}, qc.get("activations")
    try:
        for name, spec in specs.items():
            linear = model.get_submodule(name)
            check_hadamard(linear, name, spec.get("hadamard", 0), where)
            input_ops(linear).hadamard = spec.get("hadamard", 0)
        scaled = [name for name, spec in specs.items() if spec.get("token_scale")]
        if scaled:
            install_dynamic_scaling(model, scaled)
        if act is not None:
            cfg = ActQuantConfig(**{k: v for k, v in act.items() if k != "modules"})
            cfg.validate()
            set_act_quant(model, act["modules"], cfg)
            set_kv_quant(model, cfg.kv_bits)
    except (AttributeError, TypeError) as e:
        raise QuantError(f"checkpoint activation settings do not fit this model or version ({e})") from None
