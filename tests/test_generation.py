"""Generation on the CPU: the quantized lm_head, ``quantize generate``/``bench`` and the bench's decode loop."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model
from test_cli import assert_one_line_error, run

import kernels_cuda
from quant import QuantContext, RTNConfig, load_quantized, run_pipeline, save_quantized
from quant.methods.lmhead import LMHeadConfig
from quant.runtime.generation import decode_bytes, head_kind, timed_run
from quant.runtime.quantlinear import QuantLinear


def quantized_tiny(head_bits: int, tokenizer=None):
    model = tiny_model("llama", seed=3)
    ctx = QuantContext(model, progress=False)
    steps = [("rtn", RTNConfig(bits=4, group_size=32)), ("lmhead", LMHeadConfig(bits=head_bits, group_size=32))]
    run_pipeline(ctx, steps)
    return model, ctx


@pytest.mark.parametrize("bits", [8, 4])
def test_lm_head_is_quantized_untied_and_reloads(tmp_path, tokenizer, bits):
    ref = tiny_model("llama", seed=3)
    model, ctx = quantized_tiny(bits)
    head = model.lm_head
    assert isinstance(head, QuantLinear) and head.bits == bits and ctx.modules["lm_head"]["bits"] == bits
    assert not model.config.tie_word_embeddings
    # the embeddings keep the float matrix the head was tied to
    assert torch.equal(model.model.embed_tokens.weight, ref.model.embed_tokens.weight)
    err = (head.dequantize() - ref.lm_head.weight).abs().max() / ref.lm_head.weight.abs().max()
    assert 0 < err < (0.01 if bits == 8 else 0.1)
    ids = torch.randint(0, 49152, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    out = save_quantized(model, tokenizer, tmp_path / "q", {"method": "rtn", "modules": ctx.modules})
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    loaded, _ = load_quantized(out)
    assert isinstance(loaded.lm_head, QuantLinear) and loaded.lm_head.bits == bits
    assert loaded.lm_head.qweight.data_ptr() != loaded.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, before)
    if bits == 4:  # transformers' own loader (quant_method "lowbit") builds the same untied, packed head
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(out)
        assert isinstance(hf.lm_head, QuantLinear)
        with torch.no_grad():
            assert torch.equal(hf(ids).logits, before)


def test_lm_head_bits_16_leaves_the_head_alone():
    model = tiny_model("llama", seed=3)
    ctx = QuantContext(model, progress=False)
    run_pipeline(ctx, [("lmhead", LMHeadConfig(bits=16))])
    assert model.lm_head.weight is model.model.embed_tokens.weight and not ctx.modules


def test_bench_loop_decodes_what_generate_decodes():
    """The timed loop (prefill, then one cached forward per token) picks the tokens ``model.generate`` picks."""
    model, _ = quantized_tiny(4)
    ids = torch.randint(0, 49152, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ours = timed_run(model, ids, 6)
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             pad_token_id=0)
    assert torch.equal(ours["tokens"], ref[:, 10:])
    assert ours["decode_tok_s"] > 0 and ours["ttft_s"] > 0


def test_compiled_decode_matches_eager_and_uses_the_kernel_operators():
    """``bench --compile``: the decode step through torch.compile, packed linears and the attention as
    torch.ops.lowbit_cpu.*."""
    model, _ = quantized_tiny(4)
    ids = torch.randint(0, 49152, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        eager = timed_run(model, ids, 5)
        timed_run(model, ids, 3, compiled=True, max_len=15)  # compiles for these shapes
        with torch.profiler.profile() as prof:
            compiled = timed_run(model, ids, 5, compiled=True, warm=True)
    prepared = [m for m in model.modules() if "_cpu_prepared" in m.__dict__]
    assert len(prepared) == 15  # 14 block linears and the head
    assert prepared[0].__dict__["_cpu_prepared"][0] == "uniform_gemv"
    ops = [e.name for e in prof.events()]
    assert model.config._attn_implementation == "lowbit_cpu" and "lowbit_cpu::decode_attention" in ops, ops
    # q/k/v and gate/up are one call each: 4 a block (2 blocks) and the head's, in each of the 4 decode steps
    assert ops.count("lowbit_cpu::uniform_gemv") == 4 * (2 * 4 + 1)
    assert torch.equal(compiled["tokens"], eager["tokens"])


def test_siblings_share_one_kernel_call_and_compute_what_each_computes():
    """q/k/v and gate/up (one input each) are grouped; the first of a group computes all their outputs in one
    call over their rows stored together, which each layer's own arguments are views of; a sibling called on
    another input computes its own; nothing is held once all have taken theirs."""
    from kernels_cpu.dispatch import prepare_for_decode

    model, _ = quantized_tiny(4)
    prepare_for_decode(model)
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    group = attn.q_proj.__dict__["_cpu_siblings"][0]
    assert [attn.k_proj.__dict__["_cpu_siblings"], attn.v_proj.__dict__["_cpu_siblings"]] == [(group, 1), (group, 2)]
    assert mlp.up_proj.__dict__["_cpu_siblings"] == (mlp.gate_proj.__dict__["_cpu_siblings"][0], 1)
    assert all("_cpu_siblings" not in m.__dict__ for m in (attn.o_proj, mlp.down_proj, model.lm_head))
    layers = [attn.q_proj, attn.k_proj, attn.v_proj]
    fused = group.args[0].untyped_storage().data_ptr()
    assert all(m.__dict__["_cpu_kernel_plan"][4][0].untyped_storage().data_ptr() == fused for m in layers)

    x = torch.randn(2, 1, attn.q_proj.in_features, generator=torch.Generator().manual_seed(4))
    x2 = x.reshape(2, -1)
    gemv = torch.ops.lowbit_cpu.uniform_gemv
    with torch.inference_mode():
        outs = [group.output(i, x, x2, gemv) for i in range(3)]
        assert group.x is None and not group.pending
        for m, y in zip(layers, outs, strict=True):
            ref = x2.double() @ m.dequantize(torch.float64).T
            assert y.shape == ref.shape and torch.allclose(y.double(), ref, rtol=1e-4, atol=1e-4)
        group.output(0, x, x2, gemv)
        other = x.clone()
        assert group.output(1, other, other.reshape(2, -1), gemv) is None  # not the input q_proj read: its own
        assert torch.equal(group.output(2, x, x2, gemv), outs[2])


def test_prepared_eager_decoding_calls_each_kernel_once_and_matches_the_unprepared_forward(monkeypatch):
    """``quantize generate``/``bench`` prepare the model: an eager decode step is then one kernel call per layer or
    sibling group, with the unprepared forward's outputs; autograd and disabled kernels still fall back."""
    import kernels_cpu
    from kernels_cpu import dispatch

    model, _ = quantized_tiny(4)
    ids = torch.randint(0, 49152, (1, 6), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        before = model(input_ids=ids[:, -1:]).logits
    assert dispatch.prepare_for_decode(model) == 15
    calls = []
    ext = kernels_cpu.EXTENSION.module
    for name in ("uniform_gemv", "dsq_gemv"):
        real = getattr(ext, name)
        monkeypatch.setattr(ext, name, lambda *a, _real=real: calls.append(1) or _real(*a))
    with monkeypatch.context() as m, torch.inference_mode():
        m.setattr(dispatch, "kernel_forward", lambda *a: pytest.fail("the unprepared path ran"))
        after = model(input_ids=ids[:, -1:]).logits
    assert len(calls) == 4 * 2 + 1  # q/k/v, o, gate/up, down in each of 2 blocks, and the head
    assert torch.allclose(after, before, rtol=1e-5, atol=1e-5)
    head = model.lm_head
    x = torch.randn(1, head.in_features, requires_grad=True)
    calls.clear()
    head(x).sum().backward()  # autograd: the dequantize path
    with torch.no_grad(), kernels_cuda.disabled():
        head(x)
    assert not calls and x.grad is not None


def test_decode_bytes_count_what_a_token_reads():
    float_model = tiny_model("llama", seed=3)
    linears = [m for m in float_model.modules() if isinstance(m, torch.nn.Linear)]
    assert decode_bytes(float_model)["bytes_per_token"] == sum(4 * m.weight.numel() for m in linears)
    assert head_kind(float_model) == "fp32 (tied)"
    model, _ = quantized_tiny(4)
    head = model.lm_head
    want_head = head.in_features * head.out_features // 2 + 3 * head.scales.numel()  # int4 codes, fp16 scale, u8 zero
    got = decode_bytes(model)
    assert got["lm_head_bytes"] == want_head and head_kind(model) == "int4 g32"
    assert got["bytes_per_token"] < decode_bytes(float_model)["bytes_per_token"] / 6


def test_generate_and_bench_commands(tmp_path, tiny_dir):
    out = tmp_path / "q"
    r = run("model", tiny_dir, "--method", "rtn", "--bits", "4", "--group-size", "32", "--lm-head-bits", "8",
            "--no-eval", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "quantized 15 linears" in r.stdout  # 14 block linears and the head
    r = run("generate", out, "--prompt", "Hello there", "--max-new-tokens", "5")
    assert r.returncode == 0, r.stderr
    assert "5 tokens in" in r.stderr and r.stdout.startswith("Hello there")
    r = run("generate", tiny_dir, "--max-new-tokens", "3", "--sample", "--top-p", "0.9", "--dtype", "bfloat16")
    assert r.returncode == 0, r.stderr
    js = tmp_path / "bench.json"
    r = run("bench", out, "--prompt-tokens", "16", "--new-tokens", "4", "--batch", "1,2", "--json", js)
    assert r.returncode == 0, r.stderr
    res = json.loads(js.read_text())
    assert res["quantized"] and res["lm_head"] == "int8 g64" and set(res["batches"]) == {"1", "2"}
    for row in res["batches"].values():
        assert row["decode_tok_s"] > 0 and row["prefill_tok_s"] > 0 and row["peak_rss_bytes"] > 2**20
    assert "batch 2: prefill" in r.stdout


@pytest.mark.parametrize(
    "args,pattern",
    [
        (["model", "--lm-head-bits", "5", "--method", "rtn"], "--lm-head-bits must be one of (4, 8, 16)"),
        (["model", "--lm-head-bits", "4", "--method", "rtn", "--stream"], "--lm-head-bits needs the whole model"),
        (["generate", "--top-p", "0", "--sample"], "--top-p must be in (0, 1]"),
        (["bench", "--batch", "1,x"], "--batch must be comma-separated integers"),
        (["bench", "--dtype", "int8"], "unknown --dtype 'int8'"),
    ],
)
def test_bad_generation_options(tmp_path, tiny_dir, args, pattern):
    cmd, *rest = args
    r = run(cmd, tiny_dir, *rest, *(["--out", tmp_path / "o"] if cmd == "model" else []))
    assert_one_line_error(r, pattern)
    assert not (tmp_path / "o").exists()
