"""3-bit (and 2-/4-bit) quality on SmolLM2-135M: the solvers alone against the solvers plus block-wise learned
rounding and ranges (``--finetune block``), with bits per weight counting every scale and the quantize wall time.

Every setting quantizes a fresh float model, saves and reloads the checkpoint (logits must be identical), and
measures perplexity on WikiText-2 test and on the first 32 windows of the bundled C4 evaluation slice. Calibration
is the ``c4`` source (never the C4 evaluation slice; nothing reads WikiText-2 test), 128 x 512 tokens, except in
the settings of :data:`CALIBRATION` (``-wv``: WikiText-2 validation, ``-c4wv``: both). Headline
rows use the full split (148 windows); ablations use the first 40 (``--max-windows 40``): the table says which.

    python benchmarks/quality.py --only d2quant-w3 d2quant-w3-ft --max-windows 40     # an ablation
    python benchmarks/quality.py --only d2quant-w3-ft                                   # a headline row

Results are written after every setting to benchmarks/results/quality.{json,md}; a rerun skips settings already
measured on the same number of windows.
"""

from __future__ import annotations

from dataclasses import replace

from common import RESULTS, c4_table, run_calibrated_bench, setup_line

from quant import AllocationConfig, GPTQConfig
from quant.engine.recipe import load_recipe, presets
from quant.methods.d2quant import D2QuantConfig
from quant.methods.finetune import FinetuneConfig
from quant.methods.rotation import RotationConfig

GROUP = 64
C4_WINDOWS = 32
# calibration (source, windows, length), where not c4 --nsamples x --seqlen (128 x 512)
CALIBRATION = {f"d2quant-w{b}-nodsq-s8-c512-{r}": ("c4", 512, 512) for b in (3, 4)
               for r in ("e2e200", "e2e200-rounding", "ft-e2e200", "e2e300-warm-rounding-bf16",
                         "downh-e2e100-warm-rounding-bf16", "downh-headh-e2e100-warm-rounding-bf16",
                         "downh-e2e200-warm-rounding-bf16", "downh-headh-ft-e2e200-warm-bf16",
                         "downh-headh-ft-e2e-bf16")}
CALIBRATION["d2quant-w3-nodsq-s8-len2048-downh-headh-ft-e2e-bf16"] = ("c4", 32, 2048)
CALIBRATION["d2quant-w4-nodsq-s8-c512-km-downh-e2e100-warm-rounding-bf16"] = ("c4", 512, 512)
# the literature's domain-matched protocol (OmniQuant, D²Quant and GPTVQ calibrate on WikiText-2 train, which is not
# bundled): our best recipes unchanged but for the text, WikiText-2 *validation* (never the test split the rows are
# scored on), and half and half with C4 (does a little text like the evaluation's keep both gains?).
# Name -> (the C4 row whose recipe it runs, calibration source, windows)
OTHER_TEXT = {
    "d2quant-w3-nodsq-s8-wv-downh-headh-ft-e2e-bf16": (
        "d2quant-w3-nodsq-s8-downh-headh-ft-e2e-bf16", "wikitext2-valid", 128),
    "d2quant-w4-nodsq-s8-c512-wv-downh-e2e100-warm-rounding-bf16": (
        "d2quant-w4-nodsq-s8-c512-downh-e2e100-warm-rounding-bf16", "wikitext2-valid", 512),
    "d2quant-w3-nodsq-s8-c4wv-downh-headh-ft-e2e-bf16": (
        "d2quant-w3-nodsq-s8-downh-headh-ft-e2e-bf16", "c4+wikitext2-valid", 128),
    # the same on 512 windows (262k tokens: the issue asks the end-to-end pass for several hundred thousand; 128
    # windows are 65k), the C4 row's recipe on 512 windows unchanged
    "d2quant-w3-nodsq-s8-c4wv-c512-downh-headh-ft-e2e-bf16": (
        "d2quant-w3-nodsq-s8-c512-downh-headh-ft-e2e-bf16", "c4+wikitext2-valid", 512),
    # vector codes (vq3 g96) under this protocol: on C4 they lowered every C4 measure and lost on WikiText-2; do
    # they keep their gain when half the text is like the evaluation's?
    "d2quant-w3-nodsq-s8-c4wv-vq3g96-downh-headh-ft-e2e-bf16": (
        "d2quant-w3-nodsq-s8-vq3g96-downh-headh-ft-e2e-bf16", "c4+wikitext2-valid", 128),
    # data-free: text the float model samples itself (LLM-QAT's distillation data), not chosen to be like any
    # evaluation text, so these rows stand on our protocol beside the C4 rows
    "d2quant-w3-nodsq-s8-self-downh-headh-ft-e2e-bf16": (
        "d2quant-w3-nodsq-s8-downh-headh-ft-e2e-bf16", "self", 128),
    "d2quant-w3-nodsq-s8-c4self-downh-headh-ft-e2e-bf16": (
        "d2quant-w3-nodsq-s8-downh-headh-ft-e2e-bf16", "c4+self", 128),
}
CALIBRATION.update({name: (source, n, 512) for name, (_, source, n) in OTHER_TEXT.items()})


def settings() -> dict[str, list]:
    """Names: ``nsdsB`` NSDS widths at budget B (storage-matched to uniform), ``fisherB`` measured widths (Fisher-
    weighted rounding error) there, ``-nodsq`` uniform down_proj (no dual-scale
    quantizer), ``-s8`` 8-bit scales and 4-bit zero-points (``--scale-bits 8``), ``-g128`` / ``-g32`` group 128 /
    32, ``-ft`` the block-wise finetune after the solver, ``-e2e`` the end-to-end distillation of the scales,
    ``-e2e-norms`` that with the norms' weights trained too, ``-ft-e2e`` both, ``-rounding`` the rounding learned
    too, ``-warm`` a 10% learning-rate warm-up, ``-downh`` the online Hadamard before down_proj
    (``--down-hadamard``), ``-headh`` the per-head Hadamard on the values (``--head-hadamard``), ``-bf16`` the
    finetune in bfloat16, ``-c512`` 512 calibration windows, ``-len2048`` 32 windows of 2048 tokens, ``-wv``
    calibrated on WikiText-2 validation, ``-c4wv`` on both, half and half (:data:`CALIBRATION`); ``preset-NAME``
    the bundled recipe ``quant/recipes/NAME.yaml``."""
    rot = ("rotate", RotationConfig(mode="hadamard"))
    ft = ("finetune", FinetuneConfig(mode="block"))
    e2e = ("finetune", FinetuneConfig(mode="e2e"))
    e2e_norms = ("finetune", FinetuneConfig(mode="e2e", e2e_norms=True))
    both = ("finetune", FinetuneConfig(mode="both"))
    # 200 end-to-end steps: the held-out KL was still falling at step 100 in every end-to-end run
    e2e200 = ("finetune", FinetuneConfig(mode="e2e", e2e_steps=200))
    # the codes move too: each weight's rounding learned end to end (signed steps, as the block pass learns it)
    e2e200_rounding = ("finetune", FinetuneConfig(mode="e2e", e2e_steps=200, rounding=True))
    out: dict[str, list] = {"float": []}
    for b in (3, 2, 4):
        d2q = ("d2quant", D2QuantConfig(bits=b, group_size=GROUP))
        gptq = ("gptq", GPTQConfig(bits=b, group_size=GROUP))
        out[f"d2quant-w{b}"] = [rot, d2q]
        out[f"d2quant-w{b}-ft"] = [rot, d2q, ft]
        out[f"d2quant-w{b}-ft-rounding"] = [rot, d2q, ("finetune", FinetuneConfig(mode="block", rounding=True))]
        out[f"gptq-w{b}-ft"] = [gptq, ft]
        for name, kw in (("-s8", {"scale_bits": 8}), ("-nodsq", {"dsq": False}),
                         ("-nodsq-s8", {"dsq": False, "scale_bits": 8}),
                         ("-g128-s8", {"group_size": 128, "scale_bits": 8}),
                         ("-g32-s8", {"group_size": 32, "scale_bits": 8})):
            d2q = ("d2quant", D2QuantConfig(bits=b, **{"group_size": GROUP, **kw}))
            out[f"d2quant-w{b}{name}"] = [rot, d2q]
            out[f"d2quant-w{b}{name}-ft"] = [rot, d2q, ft]
            out[f"d2quant-w{b}{name}-e2e"] = [rot, d2q, e2e]
            out[f"d2quant-w{b}{name}-e2e-norms"] = [rot, d2q, e2e_norms]
            out[f"d2quant-w{b}{name}-ft-e2e"] = [rot, d2q, both]
            out[f"d2quant-w{b}{name}-e2e200"] = [rot, d2q, e2e200]
            out[f"d2quant-w{b}{name}-e2e200-rounding"] = [rot, d2q, e2e200_rounding]
    # NSDS widths (2-4 bits a linear) at the bytes of uniform 3-bit, and at 2.25 (2.49 bits per weight at group 64)
    for budget in (3.0, 2.25):
        nsds = ("allocate", AllocationConfig(budget=budget, group_size=GROUP, scale_bits=8))
        d2q = ("d2quant", D2QuantConfig(bits=4, group_size=GROUP, dsq=False, scale_bits=8))
        out[f"d2quant-nsds{budget:g}-nodsq-s8"] = [nsds, rot, d2q]
        out[f"d2quant-nsds{budget:g}-nodsq-s8-e2e"] = [nsds, rot, d2q, e2e]
        out[f"d2quant-nsds{budget:g}-nodsq-s8-e2e200"] = [nsds, rot, d2q, e2e200]
    # measured widths (Fisher-weighted rounding error on 32 calibration windows, after the rotation), same budgets
    for budget in (3.0, 2.25):
        fisher = ("allocate", AllocationConfig(budget=budget, allocator="fisher", group_size=GROUP, scale_bits=8))
        d2q = ("d2quant", D2QuantConfig(bits=4, group_size=GROUP, dsq=False, scale_bits=8))
        out[f"d2quant-fisher{budget:g}-nodsq-s8"] = [rot, fisher, d2q]
        out[f"d2quant-fisher{budget:g}-nodsq-s8-ft-e2e"] = [rot, fisher, d2q, both]
        # the NSDS row's 200 end-to-end steps, in bf16 (the same KL for 0.62x the time: finetune_dtype.md)
        out[f"d2quant-fisher{budget:g}-nodsq-s8-e2e200-bf16"] = [rot, fisher, d2q,
                                                                ("finetune", replace(e2e200[1], dtype="bf16"))]
    # 4x the calibration text (512 windows, 262k tokens; CALIBRATION): the end-to-end pass saw its 112 training windows
    # 3.6 times in 200 steps; the held-out windows stay 16 (1/32), as many as at 128 windows
    e2e200_h32 = FinetuneConfig(mode="e2e", e2e_steps=200, holdout=1 / 32)
    for b in (3, 4):
        d2q = ("d2quant", D2QuantConfig(bits=b, group_size=GROUP, dsq=False, scale_bits=8))
        out[f"d2quant-w{b}-nodsq-s8-c512-e2e200"] = [rot, d2q, ("finetune", e2e200_h32)]
        out[f"d2quant-w{b}-nodsq-s8-c512-e2e200-rounding"] = [rot, d2q,
                                                             ("finetune", replace(e2e200_h32, rounding=True))]
        out[f"d2quant-w{b}-nodsq-s8-c512-ft-e2e200"] = [rot, d2q, ("finetune", replace(e2e200_h32, mode="both"))]
        # a 10% warm-up (the held-out KL rose over the first steps of every 4-bit run), the rounding learned too,
        # and bf16 to afford 300 steps in the time of 200
        out[f"d2quant-w{b}-nodsq-s8-c512-e2e300-warm-rounding-bf16"] = [
            rot, d2q, ("finetune", replace(e2e200_h32, e2e_steps=300, warmup=0.1, rounding=True, dtype="bf16"))]
    # the online Hadamard before down_proj (--down-hadamard): down_proj's input is the one the residual rotation
    # cannot reach; DSQ was D²Quant's answer to it and is off in these rows (its fp16 row scales cost 0.4 bits)
    rot_down = ("rotate", RotationConfig(mode="hadamard", down_hadamard=True))
    for b in (3, 4):
        d2q = ("d2quant", D2QuantConfig(bits=b, group_size=GROUP, dsq=False, scale_bits=8))
        out[f"d2quant-w{b}-nodsq-s8-downh"] = [rot_down, d2q]
        out[f"d2quant-w{b}-nodsq-s8-downh-ft-e2e"] = [rot_down, d2q, both]
        out[f"d2quant-w{b}-nodsq-s8-downh-e2e200"] = [rot_down, d2q, e2e200]
        # preset w3-best with it, the finetune in bf16 (the same KL as fp32 in finetune_dtype.md, in 0.6x the time)
        out[f"d2quant-w{b}-nodsq-s8-downh-ft-e2e-bf16"] = [rot_down, d2q, ("finetune", replace(both[1], dtype="bf16"))]
        # the 512-window warm-up row with it, 100 end-to-end steps: at 4 bits the held-out KL was lowest at step 20
        # of that row, and 100 keep the run near the hour with the 4x longer solver
        out[f"d2quant-w{b}-nodsq-s8-c512-downh-e2e100-warm-rounding-bf16"] = [
            rot_down, d2q, ("finetune", replace(e2e200_h32, e2e_steps=100, warmup=0.1, rounding=True, dtype="bf16"))]
        # 200 steps: with the Hadamard the held-out KL was still falling at step 100 (best step 100 in both
        # 4-bit rows, with and without the head Hadamard)
        out[f"d2quant-w{b}-nodsq-s8-c512-downh-e2e200-warm-rounding-bf16"] = [
            rot_down, d2q, ("finetune", replace(e2e200_h32, warmup=0.1, rounding=True, dtype="bf16"))]
    # and the per-head Hadamard on the values (--head-hadamard, merged): o_proj's input spread head by head
    rot_heads = ("rotate", RotationConfig(mode="hadamard", down_hadamard=True, head_hadamard=True))
    for b in (3, 4):
        d2q = ("d2quant", D2QuantConfig(bits=b, group_size=GROUP, dsq=False, scale_bits=8))
        out[f"d2quant-w{b}-nodsq-s8-downh-headh"] = [rot_heads, d2q]
        out[f"d2quant-w{b}-nodsq-s8-downh-headh-ft-e2e-bf16"] = [rot_heads, d2q,
                                                                ("finetune", replace(both[1], dtype="bf16"))]
        # the same with the rounding learned per block and end to end: on 128 x 512 calibration windows (held-out
        # block error, first 4 blocks, bf16) the bounded offsets cut block 3's error 10% below the scales alone
        # (0.239 vs 0.265), where on 32 x 512 in fp32 they had measured worse
        out[f"d2quant-w{b}-nodsq-s8-downh-headh-ft-e2e-rounding-bf16"] = [
            rot_heads, d2q, ("finetune", replace(both[1], dtype="bf16", rounding=True))]
        out[f"d2quant-w{b}-nodsq-s8-c512-downh-headh-e2e100-warm-rounding-bf16"] = [
            rot_heads, d2q, ("finetune", replace(e2e200_h32, e2e_steps=100, warmup=0.1, rounding=True, dtype="bf16"))]
        # the best 3-bit row on 512 calibration windows, nothing else changed: at 4 bits 512 windows lowered the
        # full split 0.9% against 128 (23.02 vs 23.23), and what fits the 128 windows more closely (the rounding
        # per block, 200 end-to-end steps) lowered C4 and held-out KL but not WikiText-2
        out[f"d2quant-w{b}-nodsq-s8-c512-downh-headh-ft-e2e-bf16"] = [
            rot_heads, d2q, ("finetune", replace(both[1], dtype="bf16", holdout=1 / 32))]  # 16 held out, as at 128
        # the best 3-bit row (block pass, then end to end) with the 4-bit rows' longer end-to-end pass: 512 windows,
        # 200 steps, warm-up (the 4-bit downh row's held-out KL still fell from step 100 to 200); no rounding, which
        # would be learned per block too, where it measured worse than the scales alone
        out[f"d2quant-w{b}-nodsq-s8-c512-downh-headh-ft-e2e200-warm-bf16"] = [
            rot_heads, d2q, ("finetune", replace(e2e200_h32, mode="both", warmup=0.1, dtype="bf16"))]
    # the per-head Hadamard alone (free at run time, unlike the down Hadamard): the presets' recipes with it
    rot_h = ("rotate", RotationConfig(mode="hadamard", head_hadamard=True))
    d2q = ("d2quant", D2QuantConfig(bits=3, group_size=GROUP, dsq=False, scale_bits=8))
    out["d2quant-w3-nodsq-s8-headh"] = [rot_h, d2q]
    out["d2quant-w3-nodsq-s8-headh-ft-e2e"] = [rot_h, d2q, both]
    # the best 3-bit row calibrated on 32 windows of 2048 tokens (the evaluation's length) instead of 128 of 512:
    # the same tokens, and one window a step where that row took 4 (block pass) and 2 (end to end), for the same
    # tokens a step (block) and a run (end to end, 50 steps). The 4-bit end-to-end pass lowered the held-out KL on
    # 512-token windows from step 100 to 200 and perplexity on 2048-token windows rose: is the window length it
    # trains on what holds it back?
    out["d2quant-w3-nodsq-s8-len2048-downh-headh-ft-e2e-bf16"] = [
        rot_heads, d2q, ("finetune", replace(both[1], dtype="bf16", batch=1, e2e_batch=1, e2e_steps=50))]
    # each layer's own codebook (--codebook kmeans: non-uniform levels, no zero-points, 4 bits a group fewer) in the
    # best recipe of each width, nothing else changed. Chosen on a probe that never read WikiText-2's test split:
    # rotation + GPTQ, 5.0% (3 bits) and 6.8% (4 bits) less held-out output error on C4 calibration windows
    # (benchmarks/results/codebook.md)
    km = {"dsq": False, "scale_bits": 8, "codebook": "kmeans"}
    out["d2quant-w3-nodsq-s8-km-downh-headh"] = [rot_heads, ("d2quant", D2QuantConfig(bits=3, group_size=GROUP, **km))]
    out["d2quant-w3-nodsq-s8-km-downh-headh-ft-e2e-bf16"] = [
        rot_heads, ("d2quant", D2QuantConfig(bits=3, group_size=GROUP, **km)),
        ("finetune", replace(both[1], dtype="bf16"))]
    # vector codes (--codebook vq3: each layer's 512 entries of 3 weights, the codes still 3 bits a weight, group 96)
    # in the best 3-bit recipe, nothing else changed. Chosen on a probe that never read WikiText-2's test split, by
    # a rule fixed before it ran (15% less held-out output error than uniform levels within 3.25 bits): vq3 g96
    # -17.7% at 3.18 bits, vq2 g48 -15.2%, vq2 g64 -13.5% (benchmarks/results/vector_codebook.md)
    vq3 = ("d2quant", D2QuantConfig(bits=3, group_size=96, **{**km, "codebook": "vq3"}))
    out["d2quant-w3-nodsq-s8-vq3g96-downh-headh"] = [rot_heads, vq3]  # the solver alone (ablation, 40 windows)
    out["d2quant-w3-nodsq-s8-vq3g96-downh-headh-ft-e2e-bf16"] = [
        rot_heads, vq3, ("finetune", replace(both[1], dtype="bf16"))]
    out["d2quant-w4-nodsq-s8-c512-km-downh-e2e100-warm-rounding-bf16"] = [
        rot_down, ("d2quant", D2QuantConfig(bits=4, group_size=GROUP, **km)),
        ("finetune", replace(e2e200_h32, e2e_steps=100, warmup=0.1, rounding=True, dtype="bf16"))]
    # the bundled presets (quantize model --recipe NAME) as shipped: their headline rows on the full split
    for name in presets():
        out[f"preset-{name}"] = load_recipe(name)
    out.update({name: out[recipe] for name, (recipe, *_) in OTHER_TEXT.items()})
    return out


def _ft(r: dict) -> str:
    s = next((p["summary"] for p in r.get("passes", []) if p["name"] == "finetune"), None)
    return f"{100 * s['mean_reduction']:.1f}%" if s and s.get("curves") else "-"


def _e2e(r: dict) -> str:
    s = next((p["summary"] for p in r.get("passes", []) if p["name"] == "finetune"), None)
    return f"{100 * s['e2e']['kl_reduction']:.1f}%" if s and s.get("e2e") else "-"


def _calibration(r: dict) -> str:
    source, n, seqlen = (r.get(k, d) for k, d in (("calibration_source", "c4"), ("calibration_windows", 128),
                                                  ("calibration_seqlen", 512)))
    return f"{source} {n} x {seqlen}"


def write_markdown(results: dict, meta: dict) -> None:
    lines = [
        "# 3-bit quality: solvers, then block-wise learned rounding and ranges (SmolLM2-135M-Instruct, group 64)",
        "",
        f"{setup_line(meta)} WikiText-2: raw test split, windows of 2048 (the count is beside each perplexity: "
        f"148 is the full split, 40 an ablation). C4: the first {C4_WINDOWS} windows of 2048 of the bundled "
        "evaluation slice. Block loss: the mean drop of the held-out block-output error that the finetune pass "
        "reached (per block, against the solver's). End-to-end KL: the drop of the held-out KL(float || quantized) "
        "per token that the end-to-end distillation reached. Calibration: source, windows x tokens (the -wv rows: "
        "WikiText-2 *validation*, the literature's domain-matched protocol; never the test split; self: text the "
        "float model sampled itself, data-free).",
        "",
        *c4_table(results, list(settings()), {"calibration": _calibration, "block loss": _ft, "end-to-end KL": _e2e}),
    ]
    (RESULTS / "quality.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    run_calibrated_bench("quality", __doc__, settings(), write_markdown, C4_WINDOWS, CALIBRATION)


if __name__ == "__main__":
    main()
