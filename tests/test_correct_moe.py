"""MoE calibration and routing metrics against references computed here from first principles: the
router's top-k is recomputed from ``mlp.gate.weight``, each expert's moments from the tokens captured at
the MLP's input, and the routing metrics from small hand-made logits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_moe import tiny_moe

from moe.experts import unfuse_experts
from moe.routing import LayerRouting, compare_routing, max_violation, summarize
from quant.engine.blockwise import call_block
from quant.engine.loop import capture
from quant.engine.structure import structure_of

E, K, D, FF = 4, 2, 64, 128  # tiny Mixtral: experts, top-k, hidden, expert intermediate


def mlp_inputs(model, calib, layer: int = 0) -> torch.Tensor:
    """Every calibration token's input to ``layer``'s MoE block ``[tokens, D]``, captured by a hook (float64)."""
    got = []
    h = model.model.layers[layer].mlp.register_forward_pre_hook(lambda _m, a: got.append(a[0].reshape(-1, D)))
    with torch.no_grad():
        for row in calib:
            model(row[None], use_cache=False)
    h.remove()
    return torch.cat(got).double()


def moment(x: torch.Tensor) -> torch.Tensor:
    return x.T @ x / x.shape[0]


def expert_input(model, x: torch.Tensor, e: int, layer: int = 0) -> torch.Tensor:
    """down_proj's input for expert e: act(gate(x)) * up(x) = SiLU for Mixtral, from the expert's weights."""
    ex = model.model.layers[layer].mlp.experts[e]
    return F.silu(x @ ex.gate_proj.weight.double().T) * (x @ ex.up_proj.weight.double().T)


def solver_hessians(model, calib, monkeypatch, block: int = 0) -> dict:
    """The Hessian the gptq pass hands the solver for each linear of ``block`` (names inside the block).
    Nothing is installed, so the model stays float and the float inputs captured here are the reference."""
    import quant.methods.blockquant as bq
    from quant import GPTQConfig, QuantContext, run_pipeline

    names = {id(m.weight): n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    got = {}

    def record(w, H, *args, **kw):
        got[names[id(w)]] = H

    monkeypatch.setattr(bq, "gptq_quantize", record)
    monkeypatch.setattr(bq.QuantizeStep, "_install", lambda *a, **k: None)
    ctx = QuantContext(model, None, calib_ids=calib, progress=False)
    run_pipeline(ctx, [("gptq", GPTQConfig(bits=4, group_size=32))])
    prefix = f"model.layers.{block}."
    return {n[len(prefix):]: H for n, H in got.items() if n.startswith(prefix)}


def test_expert_hessians_hold_exactly_the_routed_tokens_moments(calib, monkeypatch):
    model = tiny_moe("mixtral")
    unfuse_experts(model)
    block = model.model.layers[0]
    x = mlp_inputs(model, calib)  # [1024, 64]
    # Mixtral routes on softmax(x Wᵀ): top-k of the probabilities is top-k of the logits
    logits = x @ block.mlp.gate.weight.double().T
    top = logits.topk(K + 1, -1).values
    assert (top[:, K - 1] - top[:, K]).min() > 1e-4  # no near-tie at the k-th choice: the reference is sharp
    chosen = logits.topk(K, -1).indices
    hs = solver_hessians(model, calib, monkeypatch)
    counts = []
    for e in range(E):
        mine = (chosen == e).any(-1)  # tokens whose top-k holds e
        xe = x[mine]
        counts.append(len(xe))
        for p in ("gate_proj", "up_proj"):
            torch.testing.assert_close(hs[f"mlp.experts.{e}.{p}"].double(), moment(xe), rtol=1e-4, atol=1e-5)
        H = hs[f"mlp.experts.{e}.down_proj"]
        assert H.shape == (FF, FF)
        torch.testing.assert_close(H.double(), moment(expert_input(model, xe, e)), rtol=1e-4, atol=1e-6)
    assert sum(counts) == K * calib.numel() and min(counts) > D  # top-2: every token counted twice; all well fed
    # the routed moments really differ from the all-token one (else the comparison above proves nothing)
    assert min((hs[f"mlp.experts.{e}.gate_proj"] - moment(x).float()).abs().max() for e in range(E)) > 1e-2


def test_run_staged_gives_each_expert_its_routed_rows(calib):
    # D²Quant's driver: the MoE groups' visit gets {name: rows}; rows must be exactly the routed tokens
    from quant.engine.blockwise import run_staged

    model = tiny_moe("mixtral")
    unfuse_experts(model)
    block = model.model.layers[0]
    x = mlp_inputs(model, calib)
    chosen = (x @ block.mlp.gate.weight.double().T).topk(K, -1).indices
    xs, kws = capture(model, model.model.layers, calib)
    seen = {}

    def visit(group, inputs):
        if isinstance(inputs, dict):
            seen.update(inputs)

    with torch.no_grad():
        out = run_staged(block, structure_of(model), xs, kws[0], visit)
        # the block's output is the plain forward's, window by window
        torch.testing.assert_close(out, torch.cat([call_block(block, w[None], kws[0]) for w in xs]))
    torch.testing.assert_close(seen[""].double(), x, rtol=1e-5, atol=1e-5)  # all tokens, in order
    for e in range(E):
        xe = x[(chosen == e).any(-1)]  # in token order, as the rows are
        for p in ("gate_proj", "up_proj"):
            torch.testing.assert_close(seen[f"mlp.experts.{e}.{p}"].double(), xe, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(seen[f"mlp.experts.{e}.down_proj"].double(), expert_input(model, xe, e),
                                   rtol=1e-4, atol=1e-5)  # fmt: skip


STARVED, FEW = 3, 24  # expert 3 only gets the FEW tokens whose first MLP input feature is largest


def starve(model, calib, layer: int = 0) -> torch.Tensor:
    """Hook ``layer``'s router so expert STARVED gets only the tokens whose first input feature exceeds a
    threshold that FEW of the float model's calibration tokens pass (a per-token rule: the drivers route all
    windows in one call or one window per call alike); returns the mask of those tokens."""
    first = mlp_inputs(model, calib, layer)[:, 0]
    thr = float(first.topk(FEW + 1).values[-1])

    def hook(mod, args, _out):
        logits = F.linear(args[0].reshape(-1, mod.hidden_dim), mod.weight)
        forced = args[0].reshape(-1, mod.hidden_dim)[:, 0] > thr
        logits[:, STARVED] = -float("inf")
        logits[forced, STARVED] = logits[forced].max(-1).values + 10  # forced into those tokens' top-k
        top, idx = torch.topk(torch.softmax(logits, -1), mod.top_k, dim=-1)
        return logits, top / top.sum(-1, keepdim=True), idx

    model.model.layers[layer].mlp.gate.register_forward_hook(hook)
    return first > thr


def test_under_routed_expert_gets_the_all_token_hessian_and_no_down_hessian(calib, monkeypatch):
    model = tiny_moe("mixtral")
    unfuse_experts(model)
    forced = starve(model, calib)
    x = mlp_inputs(model, calib)  # nothing is installed: these are the inputs the solver sees
    got = solver_hessians(model, calib, monkeypatch)
    assert 0 < int(forced.sum()) == FEW < D  # fewer tokens than gate/up's 64 inputs
    for p in ("gate_proj", "up_proj"):  # README: the Hessian of ALL the block's tokens
        torch.testing.assert_close(got[f"mlp.experts.{STARVED}.{p}"].double(), moment(x), rtol=1e-4, atol=1e-5)
    assert f"mlp.experts.{STARVED}.down_proj" not in got  # README: round-to-nearest, no Hessian
    # a well-fed expert keeps its own routed moment (not the all-token one): recompute its routing by hand
    logits = x @ model.model.layers[0].mlp.gate.weight.double().T
    logits[:, STARVED] = -math.inf
    routed = (logits.topk(K, -1).indices == 0).any(-1)
    # the forced tokens' top-2 is {STARVED, best of the rest}: expert 0 there only as the best of the rest
    routed[forced] = logits[forced].argmax(-1) == 0
    assert routed.sum() >= FF
    torch.testing.assert_close(got["mlp.experts.0.gate_proj"].double(), moment(x[routed]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got["mlp.experts.0.down_proj"].double(),
                               moment(expert_input(model, x[routed], 0)), rtol=1e-4, atol=1e-6)  # fmt: skip


def test_gptq_pass_rounds_a_starved_experts_down_proj_to_nearest(tokenizer, calib):
    from quant import GPTQConfig, QuantContext, run_pipeline
    from quant.methods.gptq import gptq_quantize
    from quant.numerics.grid import quantize_rtn

    model = tiny_moe("mixtral")
    unfuse_experts(model)
    starve(model, calib)
    experts = model.model.layers[0].mlp.experts
    float_w = {(e, p): getattr(experts[e], p).weight.detach().clone() for e in (0, STARVED)
               for p in ("gate_proj", "down_proj")}  # fmt: skip
    config = GPTQConfig(bits=4, group_size=32)
    ctx = QuantContext(model, tokenizer, calib_ids=calib, progress=False)
    summary = run_pipeline(ctx, [("gptq", config)])[0]["summary"]
    assert summary["rtn_fallback_experts"] == [f"model.layers.0.mlp.experts.{STARVED}.down_proj"]

    def same_as_rtn(e, p) -> bool:  # RTN is defined by quantize_rtn with the pass's spec (mse clip, 4 bits, g32)
        q, r = getattr(experts[e], p), quantize_rtn(float_w[e, p], config.spec())
        return torch.equal(q.codes(), r.codes) and torch.equal(q.scales, r.scales) and torch.equal(q.zeros, r.zeros)

    assert same_as_rtn(STARVED, "down_proj")
    assert not same_as_rtn(0, "down_proj")  # GPTQ with a real Hessian moves codes away from RTN
    assert not same_as_rtn(STARVED, "gate_proj")
    # gate/up get GPTQ with the all-token moment of the stream the MLP saw (block 0's attention already
    # quantized: the quantized model's own block-0 MLP inputs), not with their 24 routed tokens
    x = mlp_inputs(model, calib)
    gate = experts[STARVED].gate_proj.codes()

    def agreement(H: torch.Tensor) -> float:
        ref = gptq_quantize(float_w[STARVED, "gate_proj"].clone(), H.float(), config.spec(), config.damp,
                            config.act_order, config.block_size)  # fmt: skip
        return float((gate == ref.codes).float().mean())

    assert agreement(moment(x)) > 0.99  # bit-exact here; margin for float summation order
    assert agreement(moment(x[x[:, 0] > x[:, 0].topk(FEW + 1).values[-1]])) < 0.9


# ---- routing metrics on hand-made logits: 4 tokens x 4 experts, k = 2 --------------------------------
# Every row is a permutation of (0, 1, 2, 3), so every softmax has the same Z = 1 + e + e² + e³.
REF = torch.tensor([[3.0, 2, 1, 0], [0, 3, 2, 1], [1, 0, 3, 2], [2, 1, 0, 3]])
# top-2 sets {0,1}, {1,2}, {2,3}, {3,0}; top-1 0, 1, 2, 3; loads [2, 2, 2, 2]
OTHER = torch.tensor([[3.0, 2, 1, 0], [0, 2, 3, 1], [3, 0, 2, 1], [0, 3, 1, 2]])
# top-2 sets {0,1}, {2,1}, {0,2}, {1,3}; top-1 0, 2, 0, 1; loads [2, 3, 2, 1]


def hand_kl() -> float:
    # KL(p_ref ‖ p) = Σ_i p_ref,i (a_i − b_i) per token (same Z cancels in log p_ref − log p)
    e = math.e
    Z = 1 + e + e**2 + e**3
    t0 = 0.0  # identical rows
    t1 = (e**3 * (3 - 2) + e**2 * (2 - 3)) / Z  # a − b = [0, 1, −1, 0], p_ref ∝ [1, e³, e², e]
    t2 = (e * (1 - 3) + e**3 * (3 - 2) + e**2 * (2 - 1)) / Z  # a − b = [−2, 0, 1, 1], p_ref ∝ [e, 1, e³, e²]
    t3 = (e**2 * 2 + e * (1 - 3) + 1 * (0 - 1) + e**3 * (3 - 2)) / Z  # a − b = [2, −2, −1, 1]
    return (t0 + t1 + t2 + t3) / 4


def test_compare_routing_matches_hand_computed_metrics():
    got = compare_routing({"l0": REF, "l1": REF}, {"l0": OTHER, "l1": REF.clone()}, k=2)
    r = got["l0"]
    assert r.topk_overlap == pytest.approx((1 + 1 + 0.5 + 0.5) / 4)  # |S_ref ∩ S| / k: 2/2, 2/2, {2}, {3}
    assert r.exact_set_match == pytest.approx(2 / 4)  # tokens 0 and 1 keep their set
    assert r.top1_agreement == pytest.approx(1 / 4)  # only token 0 keeps its first choice
    assert r.kl == pytest.approx(hand_kl(), rel=1e-5)
    assert hand_kl() != pytest.approx(float((F.softmax(OTHER, -1) * (OTHER - REF)).sum(-1).mean()))  # direction
    assert r.maxvio_ref == pytest.approx(0.0)  # loads [2, 2, 2, 2]
    assert r.maxvio == pytest.approx((3 - 2) / 2)  # loads [2, 3, 2, 1]: (max − mean) / mean
    assert got["l1"] == LayerRouting(1.0, 1.0, 1.0, 0.0, 0.0, 0.0)  # same logits: perfect agreement
    s = summarize(got)  # plain means over the two layers
    assert s["topk_overlap"] == pytest.approx((0.75 + 1) / 2) and s["top1_agreement"] == pytest.approx(0.625)
    assert s["kl"] == pytest.approx(hand_kl() / 2, rel=1e-5) and s["maxvio"] == pytest.approx(0.25)


def test_max_violation_counts_idle_experts():
    # 6 expert slots over 4 experts: loads [3, 2, 1, 0] (expert 3 idle), mean 1.5: (3 − 1.5) / 1.5 = 1
    assert max_violation(torch.tensor([[0, 1], [0, 1], [0, 2]]), 4) == pytest.approx(1.0)
    assert max_violation(torch.tensor([[0, 1], [2, 3]]), 4) == pytest.approx(0.0)  # perfectly balanced
