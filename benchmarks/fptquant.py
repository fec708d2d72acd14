"""FPTQuant on SmolLM2-135M: W4A4 and W4A8 with and without transforms, and FPT as a pre-pass for GPTQ w3.

Weights: RTN 4-bit, group 128 (576-input layers use 64), asymmetric, min-max. Activations: the input
of every block linear quantized per token, dynamically, symmetric INT4 (INT8 for W4A8); KV cache,
embeddings and lm_head in float. Rows:

- ``w4a4-rtn``: no transforms;
- ``w4a4-rotation``: the residual Hadamard rotation only (QuaRot-like, no online ops);
- ``w4a4-fpt-local``: every FPTQuant transform (residual rotation, pre-RoPE, value, MLP scaler,
  online Hadamard before down_proj), local data-free fit;
- ``w4a4-fpt-e2e``: the same, then the end-to-end student–teacher fit;
- ``w4a8-fpt-e2e``: as above with INT8 activations (fitted for them);
- ``w3-gptq`` and ``w3-gptq-fpt``: weight-only GPTQ 3-bit, group 128, without and with the
  mergeable transforms (local fit) in front.

Every setting quantizes a fresh float model, saves and reloads the checkpoint (logits must be
identical: activation settings and online ops included) and measures WikiText-2 perplexity on the
full test split. Calibration (end-to-end fit and GPTQ): the bundled C4 sample, never WikiText-2.

    python benchmarks/fptquant.py                      # everything (hours on 2 cores)
    python benchmarks/fptquant.py --max-windows 8      # quick look

Results go to benchmarks/results/fptquant.{json,md} after every setting; a rerun skips settings
already measured with the same window count.
"""

from __future__ import annotations

from common import RESULTS, bits_per_weight, run_calibrated_bench, setup_line

from quant import ActQuantConfig, FPTConfig, GPTQConfig, QuantSpec, RTNConfig
from quant.methods.rotation import RotationConfig

E2E_STEPS = 32  # the --method fptquant default
A4, A8 = ActQuantConfig(bits=4), ActQuantConfig(bits=8)
W4 = RTNConfig(bits=4, group_size=128)


def fpt(act: ActQuantConfig | None, e2e: bool) -> FPTConfig:
    return FPTConfig(
        down_hadamard=act is not None,
        e2e_steps=E2E_STEPS if e2e else 0,
        weight=QuantSpec(bits=4, group_size=128, clip="minmax"),
        act=act,
    )


def settings() -> dict[str, list]:
    return {
        "float": [],
        "w4a4-rtn": [("rtn", W4), ("actquant", A4)],
        "w4a4-rotation": [("rotate", RotationConfig()), ("rtn", W4), ("actquant", A4)],
        "w4a4-fpt-local": [("fpt", fpt(A4, e2e=False)), ("rtn", W4), ("actquant", A4)],
        "w4a4-fpt-e2e": [("fpt", fpt(A4, e2e=True)), ("rtn", W4), ("actquant", A4)],
        "w4a8-fpt-e2e": [("fpt", fpt(A8, e2e=True)), ("rtn", W4), ("actquant", A8)],
        "w3-gptq": [("gptq", GPTQConfig(bits=3))],
        "w3-gptq-fpt": [("fpt", FPTConfig()), ("gptq", GPTQConfig(bits=3))],
    }


def _fit_seconds(r: dict) -> str:
    s = next((p["summary"] for p in r.get("passes", []) if p["name"] == "fpt"), None)
    if not s:
        return "-"
    return f"{s['local_seconds']} + {s['e2e_seconds']}" if "e2e_seconds" in s else str(s["local_seconds"])


def write_markdown(results: dict, meta: dict) -> None:
    lines = [
        "# FPTQuant: SmolLM2-135M-Instruct, WikiText-2 raw test",
        "",
        f"{setup_line(meta)} Weights RTN w4 g128 asym (W4 rows) or GPTQ w3 g128; "
        "activations of every block linear per-token dynamic symmetric INT4/INT8. Fit time = local + end-to-end.",
        "",
        "| setting | ppl | windows | bits/weight | fit (s) | quantize total (s) | reload identical |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['ppl']['ppl']:.2f} | {r['ppl']['windows']}/{r['ppl']['total_windows']} "
            f"| {bits_per_weight(r)} | {_fit_seconds(r)} | {r.get('quantize_seconds', '-')} "
            f"| {r.get('reload_identical', '-')} |"
        )
    (RESULTS / "fptquant.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    run_calibrated_bench("fptquant", __doc__, settings(), write_markdown, 0)


if __name__ == "__main__":
    main()
