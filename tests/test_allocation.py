"""Bit allocation: honest budgets, the allocators' contracts, the pass, reload, and the map."""

import dataclasses

import pytest
import torch
from conftest import tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

from quant import AllocationConfig, QuantContext, QuantError, allocate, load_quantized, run_pipeline, save_quantized
from quant.methods.allocation import allocation_table
from quant.methods.allocation_plot import plot_allocation
from quant.methods.quantizers import RTNConfig
from quant.runtime.quantlinear import quantized_sizes

LAYERS = 8


@pytest.fixture(scope="module")
def model():
    m = tiny_model(num_hidden_layers=LAYERS, hidden_size=128, intermediate_size=256, head_dim=32)
    with torch.no_grad():  # spread the sensitivities: heavy tails in a few blocks
        for i, k in ((1, 60), (5, 20), (6, 8)):
            for lin in (m.model.layers[i].mlp.down_proj, m.model.layers[i].self_attn.q_proj):
                lin.weight[::5, ::3] *= k
    return m


@pytest.mark.parametrize("budget", [1.5, 4.5, float("nan")])
def test_infeasible_budget_names_the_range(model, budget):
    with pytest.raises(QuantError, match="feasible range is 2 to 4 bits"):
        allocate(model, AllocationConfig(budget=budget))


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"allocator": "greedy"}, "unknown allocator"),
        ({"scheme": "ilp"}, "unknown allocation scheme"),
        ({"granularity": "head"}, "unknown granularity"),
        ({"importance": "rank"}, "importance must be"),
        ({"error_model": "hessian"}, "error_model must be"),
        ({"candidates": (2, 5)}, "candidate widths"),
        ({"allocator": "uniform", "budget": 2.5}, "uniform allocation needs"),
    ],
)
def test_bad_config(model, kw, msg):
    with pytest.raises(QuantError, match=msg):
        allocate(model, AllocationConfig(**kw))


def test_uniform_spends_exactly_the_budget(model):
    a = allocate(model, AllocationConfig(budget=3, allocator="uniform"))
    assert set(a.bits) == {3} and a.used_bytes == a.budget_bytes


@settings(max_examples=25, deadline=None)
@given(
    budget=st.floats(2.0, 4.0), scheme=st.sampled_from(["knapsack", "tiers"]), gran=st.sampled_from(["layer", "module"])
)
def test_budget_respected_and_nearly_spent(model, budget, scheme, gran):
    a = allocate(model, AllocationConfig(budget=budget, scheme=scheme, granularity=gran, group_size=32))
    assert a.used_bytes <= a.budget_bytes
    # nothing affordable left: no unit could move up one candidate within the remaining bytes
    left = a.budget_bytes - a.used_bytes
    for u, b in zip(a.units, a.bits, strict=True):
        if b < 4:
            nxt = min(c for c in (2, 3, 4) if c > b)
            assert u.bytes_at(nxt, a.config.layout()) - u.bytes_at(b, a.config.layout()) > left or scheme == "tiers"


# one width per block, odds importance, the ideal 4^-b error: the rule whose ordering is provable
LAYER_RULE = dict(granularity="layer", importance="odds", error_model="ideal")


def test_more_sensitive_layers_never_get_fewer_bits(model):
    for budget in (2.25, 2.5, 3.0, 3.5):
        a = allocate(model, AllocationConfig(budget=budget, **LAYER_RULE))
        order = sorted(range(LAYERS), key=lambda j: -a.units[j].score)
        assert all(a.bits[i] >= a.bits[j] for i, j in zip(order, order[1:], strict=False)), (budget, a.bits)
    a = allocate(model, AllocationConfig(budget=3.0, **LAYER_RULE))
    assert a.bits[1] == 4 and min(a.bits) == 2  # the outlier block is protected; the budget is traded


def test_tiers_is_the_papers_rule(model):
    a = allocate(model, AllocationConfig(budget=3.0, scheme="tiers", candidates=(2, 4), granularity="layer"))
    order = sorted(range(LAYERS), key=lambda j: -a.units[j].score)
    n4 = a.bits.count(4)
    assert n4 >= LAYERS // 2 and all(a.bits[j] == 4 for j in order[:n4])


def test_random_shuffles_the_same_mix(model):
    ref = allocate(model, AllocationConfig(budget=2.5))
    draws = [allocate(model, AllocationConfig(budget=2.5, allocator="random", seed=s)) for s in range(5)]
    for d in draws:
        assert sorted(d.bits) == sorted(ref.bits) and d.used_bytes == ref.used_bytes
    assert any(d.bits != ref.bits for d in draws)
    assert allocate(model, AllocationConfig(budget=2.5, allocator="random", seed=3)).bits == draws[3].bits


def test_module_granularity_shares_role_scores(model):
    a = allocate(model, AllocationConfig(budget=3.0, granularity="module"))
    assert len(a.units) == 7 * LAYERS
    by = {u.label: u.score for u in a.units}
    assert by["2.q"] == by["2.k"] and by["2.v"] == by["2.o"]
    assert len(a.module_bits()) == 7 * LAYERS


@pytest.mark.parametrize(("scale_bits", "codebook"), [(16, "uniform"), (8, "uniform"), (8, "kmeans")])
def test_pass_sets_bits_and_checkpoint_reloads_exactly(tmp_path, model, tokenizer, scale_bits, codebook):
    m = tiny_model(num_hidden_layers=LAYERS, hidden_size=128, intermediate_size=256, head_dim=32)
    m.load_state_dict(model.state_dict())
    ctx = QuantContext(m, tokenizer, progress=False)
    layout = {"group_size": 32, "scale_bits": scale_bits, "codebook": codebook}
    records = run_pipeline(ctx, [("allocate", AllocationConfig(budget=2.5, **layout)), ("rtn", RTNConfig(**layout))])
    alloc = ctx.allocation
    assert {n: v["bits"] for n, v in ctx.modules.items()} == alloc.module_bits()
    assert len(set(alloc.bits)) > 1
    # the bytes the allocator counted are the bytes the model holds
    assert quantized_sizes(m)["quantized_linear_bytes"] == alloc.used_bytes
    assert records[0]["summary"]["bits_per_weight"] == pytest.approx(quantized_sizes(m)["bits_per_weight"], abs=1e-3)
    out = save_quantized(m, tokenizer, tmp_path / "q", {"method": "rtn", "modules": ctx.modules})
    m2, _ = load_quantized(out)
    for name, b in alloc.module_bits().items():
        assert m2.get_submodule(name).bits == b
    ids = torch.randint(0, 49152, (1, 24))
    with torch.no_grad():
        assert torch.equal(m(ids).logits, m2(ids).logits)


@pytest.mark.parametrize("gran", ["layer", "module"])
def test_plot_and_table(tmp_path, model, gran):
    a = allocate(model, AllocationConfig(budget=3.0, granularity=gran))
    png = plot_allocation(a, tmp_path / "map.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    text = allocation_table(a)
    assert "bits/weight" in text and len(text.splitlines()) == len(a.units) + 2
    u = allocate(model, AllocationConfig(budget=3.0, allocator="uniform"))
    assert plot_allocation(u, tmp_path / "u.png").exists()


def test_rtn_error_model_measures_each_unit(model):
    """The data-free RTN error model: errors fall with width, unevenly across units (unlike 4^-b), budget holds."""
    alloc = allocate(model, AllocationConfig(budget=3.0, error_model="rtn", group_size=32))
    errs = {u.label: u.error for u in alloc.units}
    assert all(e[2] > e[3] > e[4] > 0 for e in errs.values())
    assert len({round(e[2] / e[3], 3) for e in errs.values()}) > 1
    assert alloc.used_bytes <= alloc.budget_bytes


def _ids(n: int = 3, seqlen: int = 16) -> torch.Tensor:
    return torch.randint(0, 49152, (n, seqlen), generator=torch.Generator().manual_seed(0))


def test_fisher_diagonal_is_the_mean_squared_gradient(model):
    """Against the textbook route: every parameter trainable, loss.backward(), .grad squared and averaged."""
    from quant.methods.fisher import fisher_diagonal

    names = ["model.layers.1.mlp.down_proj", "model.layers.6.self_attn.q_proj"]
    ids = _ids()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    model.model.embed_tokens.weight.requires_grad_(False)  # a mix of flags, each to be restored
    trainable.discard("model.embed_tokens.weight")
    got = fisher_diagonal(model, ids, names, progress=False)
    ref = {n: torch.zeros_like(model.get_submodule(n).weight) for n in names}
    m = tiny_model(num_hidden_layers=LAYERS, hidden_size=128, intermediate_size=256, head_dim=32)
    m.load_state_dict(model.state_dict())
    for row in ids:
        m.zero_grad()
        m(input_ids=row[None], labels=row[None]).loss.backward()
        for n in names:
            ref[n] += m.get_submodule(n).weight.grad.pow(2) / len(ids)
    for n in names:
        assert got[n].shape == ref[n].shape and got[n].sum() > 0
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-12)
    # the model is left as it was: same weights, the same parameters trainable, no gradients kept
    assert all(torch.equal(p, before[n]) and p.grad is None for n, p in model.named_parameters())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    model.model.embed_tokens.weight.requires_grad_(True)


def test_fisher_allocation_minimises_the_predicted_loss(model):
    """The widths it picks predict a smaller Fisher-weighted loss than any other allocation of the same bytes
    (NSDS's, a shuffle, uniform), each scored here from the Fisher diagonal and the units' RTN errors."""
    from quant.methods.fisher import fisher_diagonal

    cfg = AllocationConfig(budget=3.0, allocator="fisher", group_size=32, fisher_windows=3)
    ids = _ids(5)
    a = allocate(model, cfg, ids, progress=False)
    assert a.used_bytes <= a.budget_bytes and len(set(a.bits)) > 1
    fisher = fisher_diagonal(model, ids[:3], list(a.module_bits()), progress=False)
    err = {u.label: u.error for u in a.units}
    assert all(e[2] > e[3] > e[4] > 0 for e in err.values())
    u0 = a.units[0]
    name = u0.modules[0][0]  # the unit's error is the Fisher-weighted squared RTN error, recomputed here
    from quant.numerics.grid import quantize_rtn

    w = model.get_submodule(name).weight.detach()
    q = quantize_rtn(w, dataclasses.replace(cfg.layout(3), clip="minmax")).dequantize()  # plain min-max RTN
    assert u0.error[3] == pytest.approx(float((fisher[name] * (w - q).pow(2)).sum()), rel=1e-4)

    def predicted(bits):
        return sum(err[u.label][b] for u, b in zip(a.units, bits, strict=True))

    others = [allocate(model, AllocationConfig(budget=3.0, group_size=32, allocator=k)).bits
              for k in ("nsds", "random", "uniform")]
    assert all(predicted(a.bits) < predicted(b) for b in others)


def test_fisher_allocation_needs_calibration_and_the_knapsack(model):
    with pytest.raises(QuantError, match="needs calibration windows"):
        allocate(model, AllocationConfig(allocator="fisher"))
    with pytest.raises(QuantError, match="knapsack"):
        allocate(model, AllocationConfig(allocator="fisher", scheme="tiers"), _ids())
