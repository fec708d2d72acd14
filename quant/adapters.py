"""Architecture adapters: where each role every pass needs lives in a supported model.

A pass never hard-codes module names; it asks the adapter for a block's ``q``/``k``/``v``/``o``,
``gate``/``up``/``down`` linears and its two norms, and for the model's embeddings, final norm and
lm_head. Adding an architecture means adding one entry to ``ADAPTERS``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from quant.errors import QuantError

LINEAR_ROLES = ("q", "k", "v", "o", "gate", "up", "down")
NORM_ROLES = ("input_norm", "post_attention_norm")


@dataclass(frozen=True)
class Adapter:
    model_types: tuple[str, ...]
    layers: str = "model.layers"
    embed_tokens: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    # role -> attribute path inside one decoder block
    roles: dict[str, str] = field(
        default_factory=lambda: {
            "q": "self_attn.q_proj",
            "k": "self_attn.k_proj",
            "v": "self_attn.v_proj",
            "o": "self_attn.o_proj",
            "gate": "mlp.gate_proj",
            "up": "mlp.up_proj",
            "down": "mlp.down_proj",
            "input_norm": "input_layernorm",
            "post_attention_norm": "post_attention_layernorm",
        }
    )
    # Linears that read the same input, in the order a sequential quantizer visits them.
    sequential_groups: tuple[tuple[str, ...], ...] = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def role(self, block: nn.Module, role: str) -> nn.Module:
        return block.get_submodule(self.roles[role])

    def linears(self, block: nn.Module) -> dict[str, nn.Module]:
        return {r: self.role(block, r) for r in LINEAR_ROLES}

    def linear_groups(self, block: nn.Module) -> list[list[str]]:
        """The block's linears (names inside the block) in sequential groups: those reading the same input.

        Dense: q/k/v, o, gate/up, down. Sparse MoE (after ``moe.experts.unfuse_experts``): q/k/v, o, every
        expert's and the shared expert's gate/up, then their down projections. Routers stay float.
        """
        from moe.experts import is_moe_block

        groups = [[self.roles[r] for r in group] for group in self.sequential_groups[:2]]
        mlp_name = self.roles["down"].rpartition(".")[0]
        mlp = block.get_submodule(mlp_name)
        if not is_moe_block(mlp):
            return groups + [[self.roles[r] for r in group] for group in self.sequential_groups[2:]]
        experts = [f"{mlp_name}.experts.{e}" for e in range(len(mlp.experts))]
        if getattr(mlp, "shared_expert", None) is not None:
            experts.append(f"{mlp_name}.shared_expert")
        gate_up = [f"{x}.{p}" for x in experts for p in ("gate_proj", "up_proj")]
        return [*groups, gate_up, [f"{x}.down_proj" for x in experts]]

    def residual_io(self, block: nn.Module) -> tuple[list[nn.Module], list[nn.Module], list[nn.Module]]:
        """Modules (each with a ``[out, hidden]``-read or ``[hidden, in]``-written ``weight``) that read the
        first norm's output, read the second norm's output (MoE: also the router and the shared-expert
        gate), and write to the residual stream."""
        q, o, mlp_in, mlp_out = self.linear_groups(block)
        get = block.get_submodule
        readers2 = [get(n) for n in mlp_in]
        mlp = get(self.roles["down"].rpartition(".")[0])
        for extra in ("gate", "shared_expert_gate"):  # MoE routers: linear readers of the stream too
            m = getattr(mlp, extra, None)
            if isinstance(m, nn.Module) and getattr(m, "weight", None) is not None and m.weight.dim() == 2:
                readers2.append(m)
        return [get(n) for n in q], readers2, [get(n) for n in o + mlp_out]

    def linear_names(self, model: nn.Module) -> list[str]:
        """Fully qualified names of every block linear, in block then group order."""
        return [
            f"{self.layers}.{i}.{name}"
            for i, block in enumerate(self.blocks(model))
            for group in self.linear_groups(block)
            for name in group
        ]

    def is_moe(self, model: nn.Module) -> bool:
        from moe.experts import is_moe_block

        mlp = self.roles["down"].rpartition(".")[0]
        return any(is_moe_block(b.get_submodule(mlp)) for b in self.blocks(model))

    def require_dense(self, model: nn.Module, what: str) -> None:
        """One clear error where a pass does not handle Mixture-of-Experts blocks (yet)."""
        if self.is_moe(model):
            raise QuantError(f"{what} does not support Mixture-of-Experts models yet; use --method rtn or gptq")

    def embeddings(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.embed_tokens)

    def head(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.lm_head)

    def is_tied(self, model: nn.Module) -> bool:
        return self.head(model).weight is self.embeddings(model).weight


MOE_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")  # fused experts, unfused before quantizing
_LLAMA_LIKE = Adapter(model_types=("llama", "mistral", "qwen2", "qwen3", *MOE_TYPES))
ADAPTERS: dict[str, Adapter] = {t: _LLAMA_LIKE for t in _LLAMA_LIKE.model_types}


def supported_architectures() -> list[str]:
    return sorted(ADAPTERS)


def adapter_for_type(model_type: str) -> Adapter:
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise QuantError(
            f"unsupported architecture {model_type!r}; supported: {', '.join(supported_architectures())}"
        ) from None


def adapter_for(model: nn.Module) -> Adapter:
    return adapter_for_type(getattr(model.config, "model_type", type(model).__name__))
