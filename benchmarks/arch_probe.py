"""Did a structural change move the real numbers? Quantize the first blocks of SmolLM2 and keep every tensor.

Runs one method (``gptq`` or ``d2quant``, defaults otherwise) on SmolLM2-135M cut to its first
``--blocks`` decoder blocks, calibrated on ``--samples`` C4 windows of ``--seqlen`` tokens, and writes
the quantized model's state dict to a safetensors file. ``--compare A B`` then says whether two such
files hold byte-identical tensors (and, where not, by how much they differ). Run it once with the old
code (``PYTHONPATH`` pointing at a checkout of it) and once with the new:

    PYTHONPATH=/tmp/old python benchmarks/arch_probe.py --method gptq --out /tmp/old_gptq.safetensors
    python benchmarks/arch_probe.py --method gptq --out /tmp/new_gptq.safetensors
    python benchmarks/arch_probe.py --compare /tmp/old_gptq.safetensors /tmp/new_gptq.safetensors
"""

from __future__ import annotations

import argparse
import sys

import torch
from safetensors.torch import load_file, save_file


def quantize(method: str, blocks: int, samples: int, seqlen: int, out: str) -> None:
    from calibrate import calibration_windows
    from quant import QuantContext, run_pipeline
    from quant.formats.models import load_model
    from quant.methods.d2quant import D2QuantConfig
    from quant.methods.quantizers import GPTQConfig

    lm = load_model()
    model = lm.model
    model.model.layers = model.model.layers[:blocks]
    model.config.num_hidden_layers = blocks
    ids = calibration_windows(lm.tokenizer, "c4", samples, seqlen, 0)
    config = GPTQConfig() if method == "gptq" else D2QuantConfig()
    ctx = QuantContext(model, lm.tokenizer, ids, progress=False)
    torch.manual_seed(0)
    run_pipeline(ctx, [(method, config)])
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, out)
    print(f"{method}: {len(state)} tensors -> {out}")


def compare(a: str, b: str) -> int:
    ta, tb = load_file(a), load_file(b)
    if set(ta) != set(tb):
        only_a, only_b = sorted(set(ta) - set(tb))[:5], sorted(set(tb) - set(ta))[:5]
        print(f"different tensors: only in A {only_a}, only in B {only_b}")
        return 1
    diff = [k for k in ta if ta[k].dtype != tb[k].dtype or not torch.equal(ta[k], tb[k])]
    for k in diff[:10]:
        d = (ta[k].double() - tb[k].double()).abs().max().item() if ta[k].shape == tb[k].shape else "shape"
        print(f"  {k}: max |A-B| = {d}")
    print(f"{len(ta)} tensors, {len(diff)} differ" + ("" if diff else ": byte-identical"))
    return 1 if diff else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", choices=("gptq", "d2quant"), default="gptq")
    ap.add_argument("--blocks", type=int, default=3, help="decoder blocks kept")
    ap.add_argument("--samples", type=int, default=32, help="calibration windows")
    ap.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window")
    ap.add_argument("--out", help="safetensors file for the quantized state dict")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"), help="compare two files written by --out")
    args = ap.parse_args()
    if args.compare:
        sys.exit(compare(*args.compare))
    quantize(args.method, args.blocks, args.samples, args.seqlen, args.out)


if __name__ == "__main__":
    main()
