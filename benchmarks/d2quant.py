"""D²Quant against RTN, GPTQ and GPTAQ at 3 and 2 bits, with its ablations, on SmolLM2-135M.

Every setting quantizes a fresh float model (group 64: SmolLM2's 576-wide inputs take 64 anyway),
saves and reloads the checkpoint (logits must be identical), and measures perplexity on the full
WikiText-2 test split and on the first 32 windows of the bundled C4 evaluation slice. Calibration
is the `c4` source, which never reads the C4 evaluation slice (and nothing reads WikiText-2 test).
Bits per weight count every packed code, scale and zero-point of the quantized linears.

    python benchmarks/d2quant.py                    # everything: several hours on 2 cores
    python benchmarks/d2quant.py --only d2quant-w3 gptq-w3 --max-windows 4    # quick look

Results are written after every setting to benchmarks/results/d2quant.{json,md}; a rerun skips
settings already measured with the same window count.
"""

from __future__ import annotations

from common import RESULTS, c4_table, run_calibrated_bench, setup_line

from quant import GPTQConfig, RTNConfig
from quant.methods.d2quant import D2QuantConfig
from quant.methods.rotation import RotationConfig

GROUP = 64
C4_WINDOWS = 32


def settings() -> dict[str, list]:
    """Every setting, in the order the table shows them: baselines, D²Quant, then its ablations."""
    out: dict[str, list] = {"float": []}
    for b in (3, 2):
        rot = ("rotate", RotationConfig(mode="hadamard"))
        out[f"rtn-w{b}"] = [("rtn", RTNConfig(bits=b, group_size=GROUP))]
        out[f"gptq-w{b}"] = [("gptq", GPTQConfig(bits=b, group_size=GROUP))]
        out[f"gptaq-w{b}"] = [("d2quant", D2QuantConfig(bits=b, group_size=GROUP, dsq=False, dac=False))]
        out[f"d2quant-w{b}"] = [rot, ("d2quant", D2QuantConfig(bits=b, group_size=GROUP))]
        out[f"d2quant-w{b}-no-dsq"] = [rot, ("d2quant", D2QuantConfig(bits=b, group_size=GROUP, dsq=False))]
        out[f"d2quant-w{b}-dac"] = [rot, ("d2quant", D2QuantConfig(bits=b, group_size=GROUP, dac=True))]
        out[f"d2quant-w{b}-no-rotation"] = [("d2quant", D2QuantConfig(bits=b, group_size=GROUP))]
        # DAC toward the float model's own activations (methods.md §1.3 as worded; measured far worse)
        float_dac = D2QuantConfig(bits=b, group_size=GROUP, dac=True, dac_teacher="float")
        out[f"d2quant-w{b}-float-dac"] = [rot, ("d2quant", float_dac)]
        out[f"d2quant-w{b}-float-dac-no-rotation"] = [("d2quant", float_dac)]
    # DAC with a backend that does not see the drift (GPTQ): where DAC could still pay off
    gptq_backend = {"bits": 2, "group_size": GROUP, "backend": "gptq"}
    out["d2quant-w2-gptq"] = [rot, ("d2quant", D2QuantConfig(**gptq_backend))]
    out["d2quant-w2-gptq-dac"] = [rot, ("d2quant", D2QuantConfig(**gptq_backend, dac=True))]
    return out


def write_markdown(results: dict, meta: dict) -> None:
    lines = [
        "# D²Quant vs RTN / GPTQ / GPTAQ: SmolLM2-135M-Instruct, group 64",
        "",
        f"{setup_line(meta)} WikiText-2: raw test split, all windows of 2048. "
        f"C4: the first {C4_WINDOWS} windows of 2048 of the bundled evaluation slice.",
        "",
        *c4_table(results, list(settings())),
    ]
    (RESULTS / "d2quant.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    run_calibrated_bench("d2quant", __doc__, settings(), write_markdown, C4_WINDOWS)


if __name__ == "__main__":
    main()
