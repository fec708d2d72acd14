"""A model's structure, discovered from the loaded model itself: no per-architecture table.

What every pass needs to know is read off one short forward (``discover``):

- the decoder blocks: the ``nn.ModuleList`` of transformers' ``_no_split_modules`` class;
- every linear in a block (``nn.Linear``; GPT-2's transposed ``Conv1D`` is turned into one first by
  :func:`normalize`, as are fused 3-D MoE experts, split per expert);
- data flow, from the autograd graph of each block run on its own captured inputs (sliding and global
  layers get their own masks and rotary tables): which linears read another's output, so the
  *stages* (linears that can be quantized together: q/k/v, o, gate/up, down; a parallel block's
  attention and MLP inputs share a stage), which linears read the residual stream (and through which
  pre-norm) and which write to it (directly, or through a post-norm as in Gemma 2/3 and OLMo 2);
- each norm's kind, by evaluating it: RMSNorm ``w``, RMSNorm ``(1 + w)``, mean-centring LayerNorm;
- named roles where the graph fixes them: the attention writer ``o`` (first writer) and the MLP writer
  ``down`` (last); among a writer's inputs, the one whose doubling doubles the writer's input is
  ``v`` (attention) or ``up`` (MLP: the projection that can absorb a column scale), the others ``q``,
  ``k`` (in execution order) or ``gate``; the pre-norms of the attention and MLP readers. A fused
  ``qkv_proj`` or ``gate_up_proj`` has no such role: passes that need it say so (``check``).

Routers of sparse-MoE blocks (linears beside an ``experts`` list) stay float and are not quantized.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from quant.errors import QuantError

LINEAR_ROLES = ("q", "k", "v", "o", "gate", "up", "down")
NORM_ROLES = ("input_norm", "post_attention_norm")
PROBE_TOKENS = 64
_CACHE = "_lowbit_structure"
# model_type -> {role: module name inside a block} for roles the graph cannot fix (applied after discovery,
# where the module exists). None of the tested families needs one.
ROLE_OVERRIDES: dict[str, dict[str, str]] = {}


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to the arithmetic of the model's dtype (bf16/fp16 models round far more than fp32 ones)."""
    tol = 1e-4 if b.dtype in (torch.float32, torch.float64) else 2e-2
    return torch.allclose(a.float(), b.float(), rtol=tol, atol=tol * float(b.abs().max()) + 1e-12)


def _linear_types() -> tuple[type, ...]:
    from quant.runtime.quantlinear import PackedLinear

    return (nn.Linear, PackedLinear)


def _is_norm(m: nn.Module) -> bool:
    w = getattr(m, "weight", None)
    return (
        not any(True for _ in m.children())
        and isinstance(w, torch.Tensor)
        and w.dim() == 1
        and "norm" in type(m).__name__.lower()
    )


def normalize(model: nn.Module) -> nn.Module:
    """Bring ``model`` to the form every pass works on, computing the same function: GPT-2's ``Conv1D``
    (weight stored ``[in, out]``) becomes ``nn.Linear``, fused MoE experts become one linear per expert."""
    from transformers.pytorch_utils import Conv1D

    from moe.experts import unfuse_experts

    changed = unfuse_experts(model)
    for name, m in list(model.named_modules()):
        if isinstance(m, Conv1D):
            w = m.weight
            lin = nn.Linear(w.shape[0], w.shape[1], bias=m.bias is not None, device=w.device, dtype=w.dtype)
            if w.device.type != "meta":
                with torch.no_grad():
                    lin.weight.copy_(w.T)
                    if m.bias is not None:
                        lin.bias.copy_(m.bias)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, lin)
            changed += 1
    if changed:
        model.__dict__.pop(_CACHE, None)
    return model


def find_blocks(model: nn.Module) -> str:
    """Path of the decoder-block list: the ModuleList of the model's ``_no_split_modules`` class
    (the unit transformers never splits across devices), else the longest list of one repeated class."""
    classes = set(getattr(model, "_no_split_modules", None) or ())
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    for n, m in lists:
        if all(type(b).__name__ in classes for b in m):
            return n
    same = [(len(m), n) for n, m in lists if len({type(b) for b in m}) == 1 and "expert" not in n]
    if not same:
        raise QuantError(f"cannot find the decoder blocks of {type(model).__name__}: no list of repeated layers")
    return max(same)[1]


def norm_kind(norm: nn.Module) -> str:
    """What a norm computes, found by evaluating it: ``rms`` (x/rms·w), ``rms_1p`` (x/rms·(1+w), Gemma),
    ``layernorm`` (mean-centred, with or without bias), or ``other``."""
    w = norm.weight.detach().float()
    if w.device.type == "meta":
        return "unknown"
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(4, w.shape[0], generator=g) * 2 + 0.5).to(norm.weight.dtype)
    with torch.no_grad():
        y = norm(x.to(w.device)).cpu()
    x = x.float()
    eps = float(getattr(norm, "variance_epsilon", None) or getattr(norm, "eps", None) or 1e-6)
    rms = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    xc = x - x.mean(-1, keepdim=True)
    ln = xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    b = getattr(norm, "bias", None)
    b = 0 if b is None else b.detach().float().cpu()
    w = w.cpu()
    for kind, ref in (("rms", rms * w), ("rms_1p", rms * (1 + w)), ("layernorm", ln * w + b)):
        if _close(y.float(), ref.to(y.dtype)):
            return kind
    return "other"


@dataclass
class BlockStructure:
    stages: list[list[str]]  # quantizable linears (names inside the block), stage by stage, in execution order
    routers: list[str]  # linears left float (MoE routers)
    readers: dict[str, str | None]  # residual readers (routers too) -> the pre-norm they read (None: un-normed)
    writers: dict[str, str | None]  # residual writers -> the post-norm between them and the residual, if any
    norms: dict[str, tuple[str, str]]  # name -> (kind, place: pre | post | inner)
    roles: dict[str, str]  # named roles the graph fixes (LINEAR_ROLES, NORM_ROLES, "attn", "mlp")
    moe: bool = False
    dsq_pairs: dict[str, str] = field(default_factory=dict)  # MLP writer -> the up projection feeding it linearly
    # x + attn(norm1 x), then h + mlp(norm2 h), checked numerically (quant.engine.blockwise.run_staged)
    staged: bool = False

    @property
    def parallel(self) -> bool:
        """Attention and MLP both read the block's input (GPT-NeoX, Phi, Falcon, Cohere)."""
        return len(self.stages) > 0 and set(self.readers) - set(self.routers) <= set(self.stages[0])

    @property
    def linears(self) -> list[str]:
        return [n for s in self.stages for n in s]


@dataclass
class Structure:
    """Where everything lives in one model, and which properties the passes rely on hold."""

    model_type: str
    layers: str
    embed_tokens: str
    lm_head: str
    final_norm: str | None
    final_norm_kind: str
    tied: bool
    position_embeddings: bool  # learned absolute positions added to the residual (GPT-2)
    block_info: list[BlockStructure] = field(default_factory=list)

    # -- where things are -------------------------------------------------------------------------------
    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def info(self, block: nn.Module | int) -> BlockStructure:
        """A block's structure, by index or by module (a copy of a block, for example a float twin, gets
        block 0's)."""
        if isinstance(block, int):
            return self.block_info[block]
        return self.block_info[self._ids.get(id(block), 0)]

    @property
    def roles(self) -> dict[str, str]:
        return self.block_info[0].roles

    def role(self, block: nn.Module, role: str) -> nn.Module:
        return block.get_submodule(self.info(block).roles[role])

    def linear_groups(self, block: nn.Module) -> list[list[str]]:
        return self.info(block).stages

    def linear_names(self, model: nn.Module) -> list[str]:
        """Fully qualified names of every quantizable block linear, in block then stage order."""
        return [f"{self.layers}.{i}.{n}" for i, b in enumerate(self.block_info) for n in b.linears]

    def embeddings(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.embed_tokens)

    def head(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.lm_head)

    def is_tied(self, model: nn.Module) -> bool:
        """lm_head computes with the embedding matrix (a streamed model's modules hold separate copies of it
        while loaded: there the config says)."""
        if getattr(self.head(model), "weight", None) is self.embeddings(model).weight:
            return True
        text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        return self.tied and bool(getattr(text, "tie_word_embeddings", False))

    def is_moe(self, model: nn.Module | None = None) -> bool:
        return any(b.moe for b in self.block_info)

    # -- what holds -------------------------------------------------------------------------------------
    def missing(self, needs: tuple[str, ...]) -> str | None:
        """The first property in ``needs`` this model lacks, in words (None: all hold). See ``NEEDS``."""
        for need in needs:
            for i, b in enumerate(self.block_info):
                why = _lacks(self, b, need)
                if why:
                    return f"{why} (block {i})" if len(self.block_info) > 1 and i else why
        return None

    def check(self, what: str, needs: tuple[str, ...], alternative: str) -> None:
        """One line naming the pass, the missing property and an alternative, where a property fails."""
        why = self.missing(needs)
        if why:
            raise QuantError(f"{what} cannot run on this {self.model_type} model: {why}; {alternative}")

    def passes(self) -> dict[str, str]:
        """Each pass -> "yes" or the property this model lacks for it."""
        return {p: self.missing(needs) or "yes" for p, needs in PASS_NEEDS.items()}

    def summary(self) -> dict:
        """JSON-able description (``quantize inspect-model``)."""
        b = self.block_info[0]
        return {
            "model_type": self.model_type,
            "blocks": f"{self.layers} ({len(self.block_info)})",
            "embeddings": self.embed_tokens + (" + learned positions" if self.position_embeddings else ""),
            "final_norm": f"{self.final_norm} ({self.final_norm_kind})" if self.final_norm else None,
            "lm_head": self.lm_head + (" (tied to the embeddings)" if self.tied else ""),
            "block 0": {
                "stages": b.stages if not b.moe else [_compact(s) for s in b.stages],
                "norms": {n: f"{k}, {p}" for n, (k, p) in b.norms.items()},
                "reads residual": {r: n or "(un-normed)" for r, n in _compact_map(b.readers).items()},
                "writes residual": {w: f"through {n}" if n else "directly" for w, n in _compact_map(b.writers).items()},
                "layout": ("parallel" if b.parallel else "sequential")
                + (", pre-norm staged" if b.staged else "")
                + (", sparse MoE" if b.moe else ""),
                "roles": b.roles,
                "routers (float)": b.routers,
            },
        }

    def __post_init__(self) -> None:
        self._ids: dict[int, int] = {}


def _compact(names: list[str]) -> list[str]:
    return list(dict.fromkeys(re.sub(r"\.\d+\.", ".*.", n) for n in names))


def _compact_map(d: dict[str, str | None]) -> dict[str, str | None]:
    return {re.sub(r"\.\d+\.", ".*.", k): v for k, v in d.items()}


# What each pass needs of a model (see ``_lacks`` for the words a failing need gives). The passes check
# these themselves; `quantize inspect-model` reports them.
PASS_NEEDS: dict[str, tuple[str, ...]] = {
    "rtn": (),
    "gptq": (),
    "gptaq (d2quant --no-dsq)": (),
    "d2quant DSQ": ("linear_up",),
    "d2quant DAC": ("staged",),
    "nsds allocation": ("dense",),
    "rotate": ("foldable_norms",),
    "fptquant": ("dense", "staged", "qkvo", "gated_mlp", "foldable_norms", "plain_rms"),
}


# A pass's needs, and how each is checked. The words are what the user reads when one fails.
def _lacks(s: Structure, b: BlockStructure, need: str) -> str | None:
    roles = b.roles
    if need == "dense":
        return "it has Mixture-of-Experts blocks" if b.moe else None
    if need == "staged":
        why = (
            "post-norms on the residual" if any(b.writers.values()) else "parallel attention and MLP" if b.parallel
            else "checked numerically, the block computes something else, e.g. a scaled residual"
        )
        return None if b.staged else f"its blocks are not pre-norm `x + attn(norm(x))`, `h + mlp(norm(h))` ({why})"
    if need == "linear_up":
        mlp_writers = [w for w in b.writers if w != roles.get("o")]
        if mlp_writers and all(w in b.dsq_pairs for w in mlp_writers):
            return None
        return "its MLP has no gated up projection that can absorb a column scale"
    if need == "mlp_norm":
        return None if "post_attention_norm" in roles else "its MLP has no pre-norm of its own"
    if need == "qkvo":
        missing = [r for r in ("q", "k", "v", "o") if r not in roles]
        return f"its attention has no separate {'/'.join(missing)} projections (fused)" if missing else None
    if need == "gated_mlp":
        missing = [r for r in ("gate", "up", "down") if r not in roles]
        return f"its MLP has no separate {'/'.join(missing)} projections" if missing else None
    if need == "foldable_norms":
        kinds = {k for _, (k, p) in b.norms.items() if p == "pre"} | {s.final_norm_kind}
        if any(b.writers.values()):
            return "post-norms sit between its writers and the residual stream (they cannot absorb a rotation)"
        if any(n is None for n in b.readers.values()):
            return "linears read the residual stream without a norm"
        if kinds - {"rms", "rms_1p"}:
            return f"its norms are {'/'.join(sorted(kinds - {'rms', 'rms_1p'}))}, not RMSNorm (mean-centring)"
        if s.position_embeddings:
            return "learned position embeddings write to the residual stream"
        return None
    if need == "plain_rms":
        kinds = {k for _, (k, p) in b.norms.items() if p == "pre"} | {s.final_norm_kind}
        return None if kinds == {"rms"} else f"its norms are {'/'.join(sorted(kinds))}, not RMSNorm with a plain weight"
    raise ValueError(need)


# ------------------------------------------------------------------------------------------------ discovery
def _module_names(model: nn.Module) -> dict[int, str]:
    return {id(m): n for n, m in model.named_modules(remove_duplicate=False)}


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, ids: torch.Tensor) -> list[tuple]:
    """``(hidden, kwargs)`` each block receives when ``model`` runs on ``ids`` ``[1, seq]``: per block,
    because sliding-window and global layers (Gemma 2/3) get different masks and rotary tables."""
    got: list[tuple | None] = [None] * len(blocks)

    def hook(i):
        def pre(_m, args, kw):
            if got[i] is None:
                kw = dict(kw)
                x = args[0] if args else kw.pop("hidden_states")
                kw.update(zip(_positional_names(blocks[i]), args[1:], strict=False))
                kw.pop("past_key_values", None)
                kw.pop("layer_past", None)
                kw["use_cache"] = False
                got[i] = (x.detach().clone(), kw)

        return pre

    hooks = [b.register_forward_pre_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    try:
        model(ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    if any(g is None for g in got):
        raise QuantError("cannot discover the model's structure: some decoder blocks did not run")
    return got


def _positional_names(block: nn.Module) -> list[str]:
    import inspect

    params = list(inspect.signature(block.forward).parameters)
    return params[1:]


def _walk(start, stop_at: dict, leaf) -> tuple[set[str], bool, dict[str, str | None]]:
    """From an autograd node, go towards the inputs without crossing a linear's output.

    Returns the linears met, whether the block input was reached, and for each linear met the first
    norm output crossed on the way to it (a post-norm, seen from the block output)."""
    lin_nodes, norm_nodes = stop_at["linear"], stop_at["norm"]
    met: dict[str, str | None] = {}
    reached = False
    seen = set()
    stack = [(start, None)]
    while stack:
        node, via = stack.pop()
        if node is None or (node, via) in seen:
            continue
        seen.add((node, via))
        if node in lin_nodes:  # a direct path wins over one through a norm
            name = lin_nodes[node]
            met[name] = None if via is None or met.get(name, via) is None else via
            continue
        if getattr(node, "variable", None) is leaf:
            reached = True
            continue
        if node in norm_nodes and via is None:
            via = norm_nodes[node]
        stack.extend((n, via) for n, _ in node.next_functions)
    return set(met), reached, met


_PASS_THROUGH = ("Index", "View", "UnsafeView", "Reshape", "Slice", "Select", "Expand", "Clone", "ToCopy", "Alias")


def _source_norm(node, norm_nodes: dict) -> str | None:
    """The norm whose output a linear reads, through indexing and reshapes only (an expert reads a routed
    slice of the normed stream); None when anything else sits between (OLMo 2 reads the raw residual)."""
    while node is not None:
        if node in norm_nodes:
            return norm_nodes[node]
        if not type(node).__name__.startswith(_PASS_THROUGH):
            return None
        nxt = [n for n, _ in node.next_functions if n is not None]
        node = nxt[0] if len(nxt) == 1 else None
    return None


def _own_router(block: nn.Module, name: str, m: nn.Module) -> bool:
    """A router module that is not an nn.Linear (transformers 5's ``*TopKRouter``): a leaf with a 2-D weight
    beside an ``experts`` list. It reads the residual stream like a linear (rotation must turn it too)."""
    w = getattr(m, "weight", None)
    leaf = not any(True for _ in m.children())
    return leaf and isinstance(w, torch.Tensor) and w.dim() == 2 and _is_router(block, name)


def _is_router(block: nn.Module, name: str) -> bool:
    parent = block.get_submodule(name.rpartition(".")[0]) if "." in name else block
    return isinstance(getattr(parent, "experts", None), nn.Module) and ".experts." not in f".{name}"


@torch.no_grad()
def _scales_linearly(block, x, kwargs, lin: str, target: str) -> bool:
    """Does doubling ``lin``'s output double ``target``'s input (v for o, up for down)?"""
    from quant.engine.blockwise import call_block, input_to

    lin, target = block.get_submodule(lin), block.get_submodule(target)
    base = input_to(target, lambda: call_block(block, x, kwargs))
    h = lin.register_forward_hook(lambda _m, _a, out: out * 2)
    try:
        doubled = input_to(target, lambda: call_block(block, x, kwargs))
    finally:
        h.remove()
    return _close(doubled, 2 * base)


def _discover_block(block: nn.Module, x: torch.Tensor, kwargs: dict) -> BlockStructure:
    from quant.engine.blockwise import call_block

    names = _module_names(block)
    # linear-like leaves: nn.Linear (quantized) and routers that keep a [experts, hidden] weight of their own
    linears = {
        n: m for n, m in block.named_modules() if n and (isinstance(m, _linear_types()) or _own_router(block, n, m))
    }
    norms = {n: m for n, m in block.named_modules() if n and _is_norm(m)}
    order = {n: i for i, n in enumerate(linears)}
    rec: dict[str, dict] = {}
    nodes = {"linear": {}, "norm": {}}

    def fwd(kind):
        def hook(m, args, out):
            name = names[id(m)]
            for t in out if isinstance(out, tuple) else (out,):  # a router returns (logits, weights, ids)
                if isinstance(t, torch.Tensor) and t.grad_fn is not None:
                    nodes[kind][t.grad_fn] = name
            rec.setdefault(name, {"in": args[0], "out": out, "kind": kind})

        return hook

    hooks = [m.register_forward_hook(fwd("linear")) for m in linears.values()]
    hooks += [m.register_forward_hook(fwd("norm")) for m in norms.values()]
    leaf = x.detach().clone().requires_grad_(True)
    try:
        with torch.enable_grad():
            out = call_block(block, leaf, kwargs)
    finally:
        for h in hooks:
            h.remove()

    routers = [n for n in linears if _is_router(block, n) or not isinstance(linears[n], _linear_types())]
    quantizable = [n for n in linears if n not in routers]
    ups, reads, depth = {}, {}, {}
    for n in linears:
        if n in rec:
            ups[n], reads[n], _ = _walk(rec[n]["in"].grad_fn, nodes, leaf)
            if rec[n]["in"] is leaf:
                reads[n] = True

    def canon(n: str) -> str:
        return re.sub(r"\.experts\.\d+\.", ".experts.*.", n)

    def depth_of(n: str, stack=()) -> int:
        if n not in depth:
            if n not in ups:  # an expert no probe token was routed to: as its siblings
                sib = [m for m in ups if canon(m) == canon(n)]
                if not sib:
                    raise QuantError(f"cannot discover the structure: {n} never ran on the probe input")
                depth[n] = depth_of(sib[0])
            else:
                depth[n] = 1 + max((depth_of(u) for u in ups[n] if u not in routers), default=-1)
        return depth[n]

    stages: dict[int, list[str]] = {}
    for n in quantizable:
        stages.setdefault(depth_of(n), []).append(n)
    stages_list = [sorted(stages[d], key=order.get) for d in sorted(stages)]

    _, _, writers = _walk(out.grad_fn, nodes, leaf)
    by_depth = sorted(writers.items(), key=lambda kv: (depth_of(kv[0]), order[kv[0]]))
    writers = {n: v for n, v in by_depth if n not in routers}
    readers = {n: _source_norm(rec[n]["in"].grad_fn, nodes["norm"]) for n in linears if reads.get(n)}
    for n in quantizable:  # an expert no probe token reached reads what its siblings read
        sib = next((m for m in readers if canon(m) == canon(n)), None)
        if n not in rec and sib is not None:
            readers[n] = readers[sib]
    readers = dict(sorted(readers.items(), key=lambda kv: order[kv[0]]))
    post = set(writers.values()) - {None}
    pre = {v for v in readers.values() if v}
    norm_info = {n: (norm_kind(m), "pre" if n in pre else "post" if n in post else "inner") for n, m in norms.items()}

    moe = any(".experts." in n for n in quantizable)
    roles = _roles(block, x, kwargs, ups, readers, writers, moe)
    b = BlockStructure(stages_list, routers, readers, writers, norm_info, roles, moe)
    b.dsq_pairs = _dsq_pairs(block, x, kwargs, ups, roles, writers)
    b.staged = _staged_ok(block, b, x, kwargs)
    return b


def _common_parent(names: list[str]) -> str:
    parts = [n.split(".")[:-1] for n in names]
    common = []
    for seg in zip(*parts, strict=False):
        if len(set(seg)) != 1:
            break
        common.append(seg[0])
    return ".".join(common)


def _roles(block, x, kwargs, ups, readers, writers, moe) -> dict[str, str]:
    """Named roles the graph fixes (see the module docstring); absent where it does not fix them."""
    roles: dict[str, str] = {}
    if not writers:
        return roles
    attn_w, *mlp_ws = writers
    roles["o"], roles["attn"] = attn_w, attn_w.rpartition(".")[0]
    attn_in = sorted(ups.get(attn_w, ()), key=list(readers).index) if ups.get(attn_w, set()) <= set(readers) else []
    if len(attn_in) == 3:
        v = [n for n in attn_in if _scales_linearly(block, x, kwargs, n, attn_w)]
        if len(v) == 1:
            roles["q"], roles["k"] = [n for n in attn_in if n != v[0]]
            roles["v"] = v[0]
    norms = {readers[n] for n in attn_in}
    if len(norms) == 1 and None not in norms:
        roles["input_norm"] = norms.pop()
    mlp_readers = [n for n in readers if n not in attn_in]
    if mlp_ws:
        roles["mlp"] = _common_parent(mlp_ws + mlp_readers) if moe else mlp_ws[-1].rpartition(".")[0]
    norms = {readers[n] for n in mlp_readers}
    if len(norms) == 1 and None not in norms and norms != {roles.get("input_norm")}:
        roles["post_attention_norm"] = norms.pop()
    if moe or len(mlp_ws) != 1:
        return roles
    roles["down"] = down = mlp_ws[0]
    mlp_in = sorted(ups.get(down, ()), key=list(readers).index) if ups.get(down, set()) <= set(readers) else []
    if len(mlp_in) == 2:
        up = [n for n in mlp_in if _scales_linearly(block, x, kwargs, n, down)]
        if len(up) == 1:
            roles["up"], roles["gate"] = up[0], next(n for n in mlp_in if n != up[0])
    return roles


def _dsq_pairs(block, x, kwargs, ups, roles, writers) -> dict[str, str]:
    """MLP writer -> its up projection (the gated MLP input whose doubling doubles the writer's input)."""
    from moe.experts import ExpertMLP

    pairs = {roles["down"]: roles["up"]} if "up" in roles else {}
    for w in writers:
        parent = block.get_submodule(w.rpartition(".")[0]) if "." in w else block
        if isinstance(parent, ExpertMLP):  # ours (moe.experts): down(act(gate x) * up x) by construction
            pairs[w] = w.rpartition(".")[0] + ".up_proj"
        elif w != roles.get("o") and w not in pairs and len(ups.get(w, ())) == 2:  # a shared expert
            lin = [u for u in ups[w] if _scales_linearly(block, x, kwargs, u, w)]
            if len(lin) == 1:
                pairs[w] = lin[0]
    return pairs


def _staged_ok(block: nn.Module, b: BlockStructure, x: torch.Tensor, kwargs: dict) -> bool:
    """Does ``run_staged``'s decomposition reproduce the block? (A numerical self-check, not a name match.)"""
    from quant.engine.blockwise import _run_prenorm, call_block

    needs = ("o", "attn", "mlp", *NORM_ROLES, *(() if b.moe else ("down",)))
    if not all(r in b.roles for r in needs) or b.parallel or any(b.writers.values()) or len(b.stages) != 4:
        return False
    probe = Structure("", "", "", "", None, "", False, False, [b])
    probe._ids = {id(block): 0}
    try:
        with torch.no_grad():
            staged = _run_prenorm(block, probe, x, kwargs, lambda *_: None, 16)
            ref = call_block(block, x, kwargs)
    except Exception:  # the decomposition does not even run on this block: not staged
        return False
    return _close(staged, ref)


def _final_norm(model: nn.Module, head: nn.Module, blocks: nn.ModuleList, ids: torch.Tensor):
    """The norm whose output lm_head reads, from one forward with hooks."""
    inside = {id(m) for m in blocks.modules()}
    outs: dict[int, nn.Module] = {}
    got = []
    hooks = [
        m.register_forward_hook(lambda m, a, o: outs.__setitem__(o.data_ptr(), m))
        for m in model.modules()
        if _is_norm(m) and id(m) not in inside
    ]
    hooks.append(head.register_forward_pre_hook(lambda m, a: got.append(a[0].data_ptr())))
    try:
        with torch.no_grad():
            model(ids, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return outs.get(got[0]) if got else None


def probe_ids(model: nn.Module, n: int = PROBE_TOKENS) -> torch.Tensor:
    vocab = model.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    device = next(itertools.chain(model.parameters(), model.buffers())).device
    return torch.randint(0, vocab, (1, n), generator=g).to(device)


def discover(model: nn.Module) -> Structure:
    """Find ``model``'s structure (see the module docstring). Costs a few short forwards of one sequence."""
    normalize(model)
    layers = find_blocks(model)
    blocks = model.get_submodule(layers)
    head = model.get_output_embeddings()
    if head is None or not isinstance(head, _linear_types()):
        raise QuantError(f"{type(model).__name__} has no linear lm_head: only causal language models are supported")
    from quant.numerics.grid import check_finite

    for name, p in model.named_parameters():  # a NaN would make every numerical check below meaningless
        if p.is_floating_point():
            check_finite(p.detach(), name)
    ids = probe_ids(model)
    was_training = model.training
    model.eval()
    try:
        inputs = capture_block_inputs(model, blocks, ids)
        final = _final_norm(model, head, blocks, ids)
        info = [_discover_block(b, x, kw) for b, (x, kw) in zip(blocks, inputs, strict=True)]
    finally:
        model.train(was_training)
    s = model_level(model, layers, final)
    s.block_info = info
    for block, b in zip(blocks, info, strict=True):
        b.roles.update({r: n for r, n in ROLE_OVERRIDES.get(s.model_type, {}).items() if _has(block, n)})
    return s


def model_level(model: nn.Module, layers: str, final: nn.Module | None) -> Structure:
    """The places outside the blocks (``final``: the norm lm_head reads); no block structure yet."""
    names = _module_names(model)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    outside = [m for m in model.modules() if isinstance(m, nn.Embedding) and m is not embed]
    s = Structure(
        model_type=getattr(model.config, "model_type", type(model).__name__),
        layers=layers,
        embed_tokens=names[id(embed)],
        lm_head=names[id(head)],
        final_norm=names[id(final)] if final is not None else None,
        final_norm_kind=norm_kind(final) if final is not None else "none",
        tied=getattr(head, "weight", None) is embed.weight,  # a packed head has no weight: untied
        position_embeddings=any(not _inside(names[id(m)], layers) for m in outside),
    )
    s._ids = {id(b): i for i, b in enumerate(model.get_submodule(layers))}
    return s


def _has(block: nn.Module, name: str) -> bool:
    try:
        block.get_submodule(name)
    except AttributeError:
        return False
    return True


def _inside(name: str, prefix: str) -> bool:
    return name.startswith(prefix + ".")


def structure_of(model: nn.Module) -> Structure:
    """The model's structure, discovered once and kept on the model (``normalize`` and module swaps that
    keep names leave it valid)."""
    s = model.__dict__.get(_CACHE)
    blocks = None
    if s is not None:
        blocks = model.get_submodule(s.layers)
        if len(blocks) != len(s.block_info) or any(s._ids.get(id(b)) != i for i, b in enumerate(blocks)):
            s = None
    if s is None:
        with torch.inference_mode(False):  # discovery reads the autograd graph, which inference mode does not record
            s = discover(model)
        model.__dict__[_CACHE] = s
    return s


def check_model_type(model_type: str) -> None:
    """Refuse, by name, configs no causal-LM class of transformers builds (before any weight is read)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise QuantError(f"unsupported architecture {model_type!r}: transformers has no causal language model for it")
