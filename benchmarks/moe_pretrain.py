"""Pretrain two tiny MoE language models, with and without MPI routers, then quantize both.

Same seed, data, order and steps; the only difference is the router: plain (``x Rᵀ``) or MPI
(``x R'ᵀ``, ``R' = C·normalize(R W_gᵀ W_g)`` per expert, ``C = C′/√N``; expert weights detached in the
power step). Mixtral architecture from transformers: 4 layers, width 192, 8 experts (SwiGLU, 384
wide), top-2, 4 heads, the standard load-balancing loss (coefficient 0.01) for both runs.

Data: the bundled 2,000 C4 validation records, tokenized with SmolLM2's tokenizer and mapped to
its 8,191 most frequent ids in that text plus one "other" id (a vocabulary of 8,192 keeps the
output layer from dominating a 2-core CPU). WikiText-2 test (never trained on) is the validation
text, with the same mapping, in windows of 256: its perplexity is over this reduced vocabulary,
comparable between the two runs, not with published numbers.

Logged during training: loss, validation perplexity, MaxVio load balance and router alignment
(cosine and normalized Rayleigh quotient of each router row with its expert's principal
direction). Then both models (MPI routers merged into plain ones: a standard checkpoint) are
quantized with GPTQ at 4 and 3 bits (group 64, C4 calibration) and compared with their float
selves: routing agreement and perplexity.

    python benchmarks/moe_pretrain.py                  # about an hour on 2 cores
    python benchmarks/moe_pretrain.py --steps 20 --eval-every 10 --tag smoke   # a quick check

Writes benchmarks/results/moe_pretrain{_tag}.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = Path(__file__).parent / "results"

from calibrate.data import C4_SAMPLE, _jsonl_docs, eval_text  # noqa: E402
from moe.mpi import MPIRouter, alignment, moe_blocks  # noqa: E402
from moe.routing import compare_routing, max_violation, router_logits, summarize  # noqa: E402
from quant import GPTQConfig, QuantContext, run_pipeline  # noqa: E402
from quant.formats.models import load_model  # noqa: E402

VOCAB = 8192
SEQ = 256


def build_vocab(tokenizer):
    """Token streams of the C4 records (training) and WikiText-2 test (validation), in the reduced vocabulary."""
    train = [torch.tensor(tokenizer(d).input_ids) for d in _jsonl_docs(C4_SAMPLE)]
    counts = Counter(torch.cat(train).tolist())
    keep = [t for t, _ in counts.most_common(VOCAB - 1)]
    table = torch.full((len(tokenizer),), VOCAB - 1, dtype=torch.long)
    table[torch.tensor(keep)] = torch.arange(VOCAB - 1)
    eos = tokenizer.eos_token_id or 0
    stream = torch.cat([torch.cat([t, torch.tensor([eos])]) for t in train])
    valid = tokenizer(eval_text(), return_tensors="pt").input_ids[0]
    coverage = float((table[stream] != VOCAB - 1).float().mean())
    return table[stream], table[valid], coverage


def make_model(mpi: bool, c_prime: float, seed: int):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    cfg = MixtralConfig(
        vocab_size=VOCAB, hidden_size=192, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=SEQ,
        tie_word_embeddings=True, router_aux_loss_coef=0.01, output_router_logits=True, rope_theta=10000.0,
    )  # fmt: skip
    model = MixtralForCausalLM(cfg)
    if mpi:
        for m in moe_blocks(model).values():
            m.gate = MPIRouter(m.gate, m.experts, c_prime)
    return model


@torch.no_grad()
def evaluate(model, valid: torch.Tensor, max_windows: int | None = None) -> dict:
    """Perplexity over non-overlapping windows of SEQ, plus the mean MaxVio of the routers on that text."""
    model.eval()
    n = valid.numel() // SEQ if max_windows is None else min(max_windows, valid.numel() // SEQ)
    ids = valid[: n * SEQ].view(n, SEQ)
    nll, vio = 0.0, []
    for i in range(0, n, 16):
        batch = ids[i : i + 16]
        out = model(batch, labels=batch, use_cache=False, output_router_logits=False)
        nll += float(out.loss) * batch.shape[0]
    k = model.config.num_experts_per_tok
    for logits in router_logits(model, ids[: min(n, 32)]).values():
        vio.append(max_violation(logits.topk(k, -1).indices, logits.shape[-1]))
    model.train()
    return {"ppl": math.exp(nll / n), "windows": n, "maxvio": sum(vio) / len(vio)}


def align_summary(model) -> dict:
    per = [a.summary() for a in alignment(model).values()]
    return {k: sum(p[k] for p in per) / len(per) for k in ("cosine_mean", "rayleigh_mean", "row_norm_cv")}


def train(name: str, mpi: bool, train_ids, valid, args) -> tuple[torch.nn.Module, dict]:
    model = make_model(mpi, args.c_prime, args.seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(args.seed)  # same batches for both runs
    starts_max = train_ids.numel() - SEQ - 1
    log: list[dict] = []
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        lr = args.lr * min(1.0, step / args.warmup) * 0.5 * (1 + math.cos(math.pi * min(step / args.steps, 1.0)))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, starts_max, (args.batch,), generator=g)
        batch = torch.stack([train_ids[s : s + SEQ] for s in starts])
        out = model(batch, labels=batch, use_cache=False)
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % args.eval_every == 0 or step == args.steps:
            entry = {"step": step, "loss": out.loss.item(), "aux_loss": out.aux_loss.item(),
                     **evaluate(model, valid, args.eval_windows), **align_summary(model),
                     "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
            log.append(entry)
            print(f"{name} step {step}: loss {entry['loss']:.3f} val ppl {entry['ppl']:.2f} "
                  f"maxvio {entry['maxvio']:.3f} align RQ {entry['rayleigh_mean']:.3f}", flush=True)  # fmt: skip
    if mpi:  # serve with R' stored: plain routers, a standard checkpoint
        for m in moe_blocks(model).values():
            m.gate = m.gate.merge()
    model.eval()
    return model, {"log": log, "train_seconds": round(time.perf_counter() - t0, 1)}


def quantize_and_compare(model, valid, calib, bits: int) -> dict:
    import copy

    q = copy.deepcopy(model)
    ids = valid[: 32 * SEQ].view(32, SEQ)
    ref = router_logits(model, ids)
    ctx = QuantContext(q, None, calib_ids=calib, progress=False)
    t0 = time.perf_counter()
    run_pipeline(ctx, [("gptq", GPTQConfig(bits=bits, group_size=64))])
    seconds = time.perf_counter() - t0
    routing = summarize(compare_routing(ref, router_logits(q, ids), model.config.num_experts_per_tok))
    return {"bits": bits, **routing, **{f"q_{k}": v for k, v in evaluate(q, valid).items()},
            "quantize_seconds": round(seconds, 1)}  # fmt: skip


def plot(runs: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name, r in runs.items():
        steps = [e["step"] for e in r["log"]]
        axes[0].plot(steps, [e["ppl"] for e in r["log"]], label=name)
        axes[1].plot(steps, [e["maxvio"] for e in r["log"]], label=name)
        axes[2].plot(steps, [e["rayleigh_mean"] for e in r["log"]], label=name)
    for ax, title in zip(axes, ("validation perplexity (WikiText-2, reduced vocab)", "MaxVio (load imbalance)",
                                "router alignment (normalized Rayleigh quotient)"), strict=True):  # fmt: skip
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.legend()
    axes[0].set_yscale("log")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--c-prime", type=float, default=1.0, help="MPI: C' in C = C'/sqrt(N)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--eval-windows", type=int, default=64, help="validation windows during training")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    tok = load_model().tokenizer
    train_ids, valid, coverage = build_vocab(tok)
    print(f"train tokens {train_ids.numel()}, valid tokens {valid.numel()}, vocab coverage {coverage:.3f}")
    calib_g = torch.Generator().manual_seed(1)
    starts = torch.randint(0, train_ids.numel() - SEQ, (64,), generator=calib_g)
    calib = torch.stack([train_ids[s : s + SEQ] for s in starts])
    runs: dict = {}
    for name, mpi in (("plain", False), ("mpi", True)):
        model, r = train(name, mpi, train_ids, valid, args)
        r["final"] = {**evaluate(model, valid), **align_summary(model)}
        r["quantized"] = [quantize_and_compare(model, valid, calib, b) for b in (4, 3)]
        runs[name] = r
        print(name, json.dumps(r["final"]), json.dumps(r["quantized"]), flush=True)
    suffix = f"_{args.tag}" if args.tag else ""
    RESULTS.mkdir(exist_ok=True)
    meta = {"args": vars(args), "train_tokens": train_ids.numel(), "valid_tokens": valid.numel(),
            "vocab_coverage": coverage, "torch": torch.__version__, "threads": torch.get_num_threads()}  # fmt: skip
    (RESULTS / f"moe_pretrain{suffix}.json").write_text(json.dumps({"meta": meta, "runs": runs}, indent=2))
    plot(runs, RESULTS / f"moe_pretrain{suffix}.png")
    lines = [
        "# Tiny MoE pretraining: plain router vs MPI router, then GPTQ at 4 and 3 bits",
        "",
        f"{args.steps} steps x {args.batch} x {SEQ} tokens (C4, reduced vocabulary {VOCAB}), seed {args.seed}, "
        f"C' = {args.c_prime}. Validation: WikiText-2 test, all {runs['plain']['final']['windows']} windows of {SEQ}.",
        "",
        "| router | val ppl | MaxVio | align cos | align RQ | row-norm cv | train s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in runs.items():
        f = r["final"]
        lines.append(f"| {name} | {f['ppl']:.2f} | {f['maxvio']:.3f} | {f['cosine_mean']:.3f} | "
                     f"{f['rayleigh_mean']:.3f} | {f['row_norm_cv']:.3f} | {r['train_seconds']} |")  # fmt: skip
    lines += ["", "| router | bits | ppl float -> quantized | top-k overlap | exact set | top-1 | KL | MaxVio q |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in runs.items():
        for q in r["quantized"]:
            lines.append(f"| {name} | {q['bits']} | {r['final']['ppl']:.2f} -> {q['q_ppl']:.2f} | "
                         f"{q['topk_overlap']:.4f} | {q['exact_set_match']:.4f} | {q['top1_agreement']:.4f} | "
                         f"{q['kl']:.4f} | {q['maxvio']:.3f} |")  # fmt: skip
    (RESULTS / f"moe_pretrain{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
