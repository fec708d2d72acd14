"""One real run on SmolLM2-135M: GPTQ 4-bit g64 on real calibration text, the first WikiText-2 window (against
float and RTN), save -> reload identical, and a checkpoint whose quantized linears take 35/128 of fp16."""

import copy

import pytest
import torch

from calibrate import calibration_windows
from quant import GPTQConfig, QuantContext, QuantLinear, RTNConfig, load_quantized, run_pipeline, save_quantized
from quant.runtime.perplexity import perplexity, tokenize_eval

pytestmark = pytest.mark.slow


def test_smollm2_gptq_w4_end_to_end(smollm2, tmp_path):
    model = copy.deepcopy(smollm2.model)
    tok = smollm2.tokenizer
    ids = tokenize_eval(tok)
    assert ids.numel() == 304_986  # the protocol's token count for this tokenizer (148 windows)
    float_ppl = perplexity(smollm2.model, ids, max_windows=1, progress=False)["ppl"]

    calib = calibration_windows(tok, "c4", 16, 256, seed=0)
    ctx = QuantContext(model, tok, calib_ids=calib, progress=False)
    passes = run_pipeline(ctx, [("gptq", GPTQConfig(bits=4, group_size=64))])
    q_ppl = perplexity(model, ids, max_windows=1, progress=False)["ppl"]
    # 4 bits cost perplexity, and GPTQ costs less of it than rounding to nearest at the same bits and groups
    rtn = copy.deepcopy(smollm2.model)
    run_pipeline(QuantContext(rtn, tok, progress=False), [("rtn", RTNConfig(bits=4, group_size=64))])
    rtn_ppl = perplexity(rtn, ids, max_windows=1, progress=False)["ppl"]
    del rtn
    assert float_ppl < q_ppl < rtn_ppl, (float_ppl, q_ppl, rtn_ppl)

    out = save_quantized(model, tok, tmp_path / "q", {"method": "gptq", "modules": ctx.modules, "passes": passes})
    reloaded, _ = load_quantized(out)
    probe = ids[:256][None]
    with torch.no_grad():
        assert torch.equal(model(probe).logits, reloaded(probe).logits)

    q = [m for m in reloaded.modules() if isinstance(m, QuantLinear)]
    assert len(q) == 210
    qbytes = sum(b.numel() * b.element_size() for m in q for b in (m.qweight, m.scales, m.zeros))
    fp16 = sum(m.in_features * m.out_features * 2 for m in q)
    # 4 bits of 16, plus an fp16 scale and a uint8 zero per 64 weights, nothing else (576 and 1536 inputs: whole
    # words, whole groups): exactly 0.25 + 3/128 = 35/128 of fp16
    assert qbytes * 128 == fp16 * 35
