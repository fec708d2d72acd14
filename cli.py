"""``quantize``: the command line of the lowbit toolchain.

quantize model [MODEL] --bits 4 --method gptq --out DIR     quantize, save, compare perplexity
quantize model --bits 2.5 --allocation nsds                 mixed precision at an average budget
quantize allocate [MODEL] --bits 3                          NSDS scores and bits, without quantizing
quantize eval MODEL_OR_DIR                                  WikiText-2 perplexity
quantize generate MODEL_OR_DIR --prompt ...                 continue a prompt (CPU kernels for our checkpoints)
quantize bench MODEL_OR_DIR                                 prefill/decode tokens/s, time to first token, memory
quantize inspect DIR                                        what a checkpoint holds
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import typer

from quant.engine.options import cli_options, given_fields
from quant.engine.passes import PASSES, check_resumable, get_pass  # importing quant registers the built-in passes
from quant.errors import QuantError
from quant.methods.quantizers import GROUP_HELP

app = typer.Typer(
    help="Low-bit weight quantization for Hugging Face causal LMs (RTN, GPTQ; more methods as passes).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DEVICE_HELP = "Where blocks compute: auto (CUDA when present, else CPU), cpu, cuda or cuda:N."
MODEL_HELP = (
    "A local Hugging Face model folder, a Hub id (org/name; needs a network), or 'smollm2-135m' "
    "(default: the embedded SmolLM2-135M-Instruct)."
)

# the model argument of the commands that read float models and our checkpoints alike (eval, generate, bench)
MODEL_OR_CHECKPOINT = typer.Argument(
    None, help=MODEL_HELP + " Also one of our quantized checkpoint folders.", show_default=False
)


def _eval(lm, max_windows: int, seqlen: int, label: str, dataset: str = "wikitext2", source=None,
          window_batch: int = 0) -> dict:
    """Perplexity of ``lm``'s model, or with ``source`` (a ``quant.engine.streaming.DiskSource``) of the model it
    reads block by block."""
    from quant.runtime.perplexity import perplexity, tokenize_eval

    ids = tokenize_eval(lm.tokenizer, dataset=dataset)
    model = None if source is not None else lm.model
    return perplexity(model, ids, seqlen, max_windows or None, desc=label, dataset=dataset, source=source,
                      window_batch=window_batch or None)


def _routing_sample(tokenizer, windows: int = 4, seqlen: int = 512):
    """Held-out text for routing comparisons: the first windows of the WikiText-2 test split."""
    from quant.runtime.perplexity import tokenize_eval

    ids = tokenize_eval(tokenizer)
    return ids[: windows * seqlen].view(windows, seqlen)


def _write_json_atomic(path: Path, data: dict) -> None:
    """Write ``data`` as JSON to a temporary sibling renamed over ``path``: an error or a kill never leaves a
    half-written file, and what a killed run left is removed by the next write
    (``quant.formats.atomic.atomic_file``)."""
    from quant.formats.atomic import atomic_file

    with atomic_file(path) as f:
        json.dump(data, f, indent=2)


def pass_options(*only: str):
    """Give a command the flags that the pass configs declare (``quant.engine.options``; all passes, or ``only``
    these), except those it declares itself. Their values reach it as ``pass_values`` (dest -> value, None when
    not given): a new pass brings its own flags and help, and the command does not grow."""

    def deco(fn):
        sig = inspect.signature(fn, eval_str=True)
        own = set(sig.parameters)
        wanted = [o for o in cli_options(PASSES) if not only or any(p in only for p, _ in o.targets)]
        opts = [o for o in wanted if o.dest not in own]
        params = [p for p in sig.parameters.values() if p.name != "pass_values"]
        for o in opts:
            decls = o.flag if "/" in o.flag or o.type is not bool else f"{o.flag}/--no-{o.flag[2:]}"
            info = typer.Option(None, decls, help=o.help_text(), show_default=False, rich_help_panel="Pass options")
            params.append(inspect.Parameter(o.dest, inspect.Parameter.KEYWORD_ONLY, default=info,
                                            annotation=o.type | None))

        @functools.wraps(fn)
        def command(**kwargs):
            pass_values = {o.dest: kwargs.pop(o.dest) for o in opts}
            return fn(**kwargs, pass_values=pass_values)

        command.__signature__ = sig.replace(parameters=params)
        return command

    return deco


def _pass_config(name: str, values: dict, base=None, **fixed):
    """Pass ``name``'s config: the flags given (``values``) over ``base`` (default: the config's own defaults),
    then ``fixed`` (what the command sets itself); validated by the config."""
    cls = get_pass(name).config_cls
    kw = {**given_fields(cls, name, cli_options(PASSES), values), **fixed}
    config = dataclasses.replace(base, **kw) if base is not None else cls(**kw)
    if hasattr(config, "validate"):
        config.validate()
    return config


def _check_flags_apply(pass_values: dict, passes: set[str], recipe: bool) -> None:
    """A pass flag the run would ignore is an error, not a silent no-op."""
    for o in cli_options(PASSES):
        if pass_values.get(o.dest) is None:
            continue
        flag = o.flag.split("/")[0]
        if recipe:
            raise QuantError(f"--recipe replaces the pass options; drop {flag} (or set it in the recipe)")
        if not passes & {p for p, _ in o.targets}:
            targets = ", ".join(dict.fromkeys(p for p, _ in o.targets))
            run = ", ".join(sorted(passes))
            raise QuantError(f"{flag} applies to {targets}, which this run does not include (its passes: {run})")


@app.command("model")
@pass_options()
def model_cmd(
    model: str = typer.Argument(None, help=MODEL_HELP, show_default=False),
    bits: float = typer.Option(
        4,
        help="Weight bit width: 2, 3, 4 or 8. With --allocation, the average budget (fractions allowed, e.g. 2.5): "
        "the quantized linears take no more bytes than uniform quantization at that width would.",
    ),
    method: str = typer.Option(
        "gptq",
        help="Quantizer: rtn (round to nearest, no data), gptq (calibrated), d2quant (sub-4-bit: dual-scale "
        "down_proj, deviation-aware norm correction, GPTAQ, Hadamard rotation), or fptquant (function-preserving "
        "transforms fitted locally and end to end, then RTN; pair with --act-bits 4 for W4A4). Each method's own "
        "options are listed under 'Pass options'.",
    ),
    rotation: bool = typer.Option(
        None,
        "--rotation/--no-rotation",
        help="Mergeable Hadamard rotation of the residual stream before quantizing (default: on for d2quant, "
        "off otherwise). Unties tied embeddings.",
        show_default=False,
    ),
    transforms: str = typer.Option(
        "none",
        help="Function-preserving transforms before the quantizer: none, or fpt (FPTQuant's residual rotation, "
        "pre-RoPE Q/K, value and MLP transforms, fitted locally; plus the online Hadamard before down_proj when "
        "activations are quantized and the method is not d2quant). --method fptquant always applies them.",
    ),
    allocation: str = typer.Option(
        "none",
        help="Per-layer bit widths: none (every layer at --bits), nsds (data-free sensitivity), fisher (measured "
        "sensitivity: Fisher-weighted rounding error on --fisher-windows calibration windows), "
        "uniform, or random (NSDS's mix of widths, shuffled; a baseline).",
    ),
    group_size: int = typer.Option(128, help=GROUP_HELP),
    calib: str = typer.Option(
        "c4",
        help="Calibration text (gptq, d2quant): c4 (bundled C4 sample minus its evaluation slice) | c4-all | "
        "wikitext2-valid, self (text the float model samples itself: data-free), a .txt/.jsonl file, or "
        "hf:NAME[:CONFIG[:SPLIT]]; A+B mixes sources, the windows split evenly (e.g. c4+wikitext2-valid: general "
        "text with text like yours).",
    ),
    nsamples: int = typer.Option(128, help="Number of calibration windows (gptq)."),
    seqlen: int = typer.Option(512, help="Tokens per calibration window (gptq)."),
    seed: int = typer.Option(0, help="Seed for drawing calibration windows (and for random rotations)."),
    out: Path = typer.Option(None, help="Output folder (default: ./<model>-<method>-w<bits>g<group>)."),
    overwrite: bool = typer.Option(False, help="Replace the output folder if it exists."),
    evaluate: bool = typer.Option(True, "--eval/--no-eval", help="Measure WikiText-2 perplexity, float and quantized."),
    max_windows: int = typer.Option(
        32, help="Perplexity windows of 2048 tokens (0 = the full test split, 148 windows for SmolLM2)."
    ),
    device: str = typer.Option("auto", help=DEVICE_HELP + " Under torchrun, cuda means each rank's own GPU."),
    dtype: str = typer.Option(
        "auto",
        help="Compute dtype of the blocks: auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16 or float16. "
        "Hessians and the solvers stay in float32/float64.",
    ),
    stream: bool = typer.Option(
        None,
        "--stream/--no-stream",
        help="Read the model block by block from its safetensors files instead of loading it whole: memory "
        "stays near one block. Default: stream when the model in the compute dtype would take more than half "
        "the available memory. A streamed run skips the perplexity (run quantize eval on the output) and "
        "refuses whole-model passes (fptquant, --transforms fpt, --allocation, static activation scales, "
        "--lm-head-bits).",
        show_default=False,
    ),
    offload_activations: bool = typer.Option(
        False,
        help="Keep the calibration activations (the streams between blocks and each stage's inputs, for every "
        "window: tokens x the widest layer's inputs, often more than a block) in memory-mapped files in the "
        "run's work folder instead of in memory; the kernel writes them back and drops them when memory runs "
        "short. Same results, more disk traffic. CPU only.",
    ),
    restart: bool = typer.Option(
        False,
        help="Discard an unfinished run of the same output folder. Without it, a run that was killed resumes "
        "after its last finished block (same model, calibration and options only; kept in .<out>.partial).",
    ),
    recipe: Path = typer.Option(
        None,
        help="A YAML or JSON recipe: the ordered passes and their configs ([{name, config}], or a checkpoint's "
        "config.json to replay its run), or a bundled preset by name: w3-fast (3.24 bits per weight, about 13 "
        "minutes for SmolLM2 on 2 cores) or w3-best (the same plus both finetunes, 35-50). It replaces the pass "
        "options above; model, calibration, output, device and stream options still apply.",
        show_default=False,
    ),
    trust_remote_code: bool = typer.Option(False, help="Allow model code from the Hub to run (off by default)."),
    pass_values: dict | None = None,
) -> None:
    """Quantize a model's linear layers and write a packed safetensors checkpoint.

    With no arguments: GPTQ 4-bit, group 128, on the embedded SmolLM2-135M, then prints its perplexity
    next to the float model's on the first 32 WikiText-2 test windows.
    """
    import torch
    import transformers

    from calibrate import calibration_windows
    from quant import QuantContext, run_pipeline, save_quantized
    from quant.engine.passes import get_pass, quantizer_methods
    from quant.engine.streaming import ResidentSource
    from quant.engine.structure import structure_of
    from quant.formats.checkpoint import check_output_dir
    from quant.formats.models import base_model_info, load_model
    from quant.runtime.quantlinear import quantized_sizes

    info = get_pass(method)
    if not info.quantizer:
        raise QuantError(f"{method!r} is not a quantization method; use one of {', '.join(quantizer_methods())}")
    pass_values = pass_values or {}
    values = {**pass_values, "group_size": group_size, "seed": seed}
    steps: list = []
    budget = None
    if allocation != "none":
        alloc = _pass_config("allocate", values, budget=bits, allocator=allocation)
        steps.append(("allocate", alloc))
        budget = bits
        bits = max(alloc.candidates)  # the quantizer's default width; allocate sets every layer's
    elif bits != int(bits):
        raise QuantError(f"--bits {bits} is fractional: a fractional average needs --allocation nsds|fisher|random")
    bits = int(bits)
    act = _pass_config("actquant", values)
    act = act if (act.bits, act.kv_bits) != (16, 16) else None  # 16: not quantized
    head = _pass_config("lmhead", values)
    config = _pass_config(method, values, bits=bits)
    fpt = None
    if transforms not in ("none", "fpt"):
        raise QuantError(f"unknown --transforms {transforms!r}; choose none or fpt")
    if transforms == "fpt" or method == "fptquant":
        from quant.numerics.grid import QuantSpec

        fpt = _pass_config(
            "fpt",
            values,
            base=getattr(config, "transforms", None),  # fptquant's own defaults (end-to-end steps) for its transforms
            # the online Hadamard pays off for quantized inputs; DSQ's column scale cannot pass it
            down_hadamard=act is not None and act.bits != 16 and method != "d2quant",
            weight=QuantSpec(bits, group_size, config.sym, "minmax"),
            act=act,
        )
        if rotation:
            raise QuantError("--transforms fpt already rotates the residual stream; drop --rotation")
        rotation = False
    if method == "fptquant":
        config = dataclasses.replace(config, transforms=fpt)
    elif fpt is not None:
        steps.append(("fpt", fpt))
    if rotation if rotation is not None else method == "d2quant":
        steps.append(("rotate", _pass_config("rotate", values, block=group_size if group_size > 0 else 64)))
    ft = _pass_config("finetune", values)
    pipeline = [*steps, (method, config), *([("finetune", ft)] if ft.enabled else []),
                *([("lmhead", head)] if head.enabled else []),
                *([("actquant", act)] if act else [])]  # the run's recipe
    used = {n for n, _ in pipeline} | ({"fpt"} if fpt else set())  # fptquant's transforms take the fpt flags
    if pass_values.get("act_bits") is not None or pass_values.get("kv_bits") is not None:
        used.add("actquant")  # --act-bits 16 is a stated "off", not a stray flag
    if pass_values.get("lm_head_bits") is not None:
        used.add("lmhead")  # likewise --lm-head-bits 16
    if pass_values.get("finetune") is not None:
        used.add("finetune")  # and --finetune none
    _check_flags_apply(pass_values, used, recipe is not None)
    if recipe is not None:  # the file replaces the pass options
        from quant.engine.recipe import load_recipe

        pipeline = load_recipe(recipe)
        method, config = next((n, c) for n, c in pipeline if get_pass(n).quantizer)
        info = get_pass(method)
        bits, group_size = config.bits, config.group_size
        alloc = next((c for n, c in pipeline if n == "allocate"), None)
        budget, allocation = (alloc.budget, alloc.allocator) if alloc else (None, "none")
        act = next((c for n, c in pipeline if n == "actquant"), None)
        fpt = next((c for n, c in pipeline if n == "fpt"), getattr(config, "transforms", None))
        transforms = "fpt" if fpt is not None else "none"
        rotation = any(n == "rotate" for n, _ in pipeline)  # stated: refused, not skipped, where it cannot run
        head = next((c for n, c in pipeline if n == "lmhead"), head)
        ft = next((c for n, c in pipeline if n == "finetune"), ft)
    act_bits, kv_bits = (act.bits, act.kv_bits) if act else (16, 16)
    slug = Path(model).name if model else "smollm2-135m"
    width = f"w{bits}" if budget is None else f"{allocation}{budget:g}"
    width += (f"a{act_bits}" if act_bits != 16 else "") + (f"kv{kv_bits}" if kv_bits != 16 else "")
    width += f"h{head.bits}" if head.enabled else ""
    width += "s8" if getattr(config, "scale_bits", 16) == 8 else ""
    width += "km" if getattr(config, "codebook", "uniform") == "kmeans" else ""
    out = check_output_dir(out or Path(f"{slug}-{method}-{width}g{group_size}{'-ft' if ft.enabled else ''}"),
                           overwrite)

    from quant.engine import distributed as dist
    from quant.engine.loop import parse_device, parse_dtype

    dev = parse_device(device)
    dist.init(dev)
    dev = dist.local_device(dev)
    cdtype = parse_dtype(dtype, dev)
    whole_model = [
        n
        for n, used in (
            (f"--method {method}", method == "fptquant"),
            ("--transforms fpt", transforms == "fpt"),
            ("--allocation", allocation != "none"),
            ("static activation scales", act is not None and act.mode == "static"),
            ("--lm-head-bits", head.enabled),
        )
        if used
    ]
    streaming = _choose_stream(model, stream, cdtype, whole_model)
    evaluate = evaluate and dist.rank() == 0  # under torchrun, rank 0 measures and writes
    torch.manual_seed(seed)
    source = None
    if streaming:
        from quant.engine.streaming import DiskSource
        from quant.formats.models import LoadedModel, resolve
        from quant.formats.reader import load_tokenizer

        source = DiskSource(resolve(model), dev, cdtype)
        lm = LoadedModel(source.skeleton(), load_tokenizer(source.path), str(source.path), quantized=False)
    else:
        lm = load_model(model, trust_remote_code=trust_remote_code)
    if lm.quantized:
        raise QuantError(f"{lm.source} is already quantized; pass the float model")
    skipped = None
    if rotation is None and any(name == "rotate" for name, _ in pipeline):  # d2quant's default, not asked for
        from quant.methods.rotation import ROTATION_NEEDS

        skipped = (source.structure(lm.model) if source else structure_of(lm.model)).missing(ROTATION_NEEDS)
        if skipped:  # the documented degraded form: the residual stays unrotated
            rot = next(c for n, c in pipeline if n == "rotate")
            for flag, on in (("--down-hadamard", rot.down_hadamard), ("--head-hadamard", rot.head_hadamard)):
                if on:
                    raise QuantError(f"{flag} comes with the rotation, which this model cannot take: {skipped}")
            pipeline = [st for st in pipeline if st[0] != "rotate"]
            typer.echo(f"d2quant runs without its default rotation: in this model {skipped}")
    report: dict = {
        "model": lm.source,
        "base_model": base_model_info(lm.source),
        **({"rotation_skipped": skipped} if skipped else {}),
        "method": method,
        "versions": {"lowbit": "0.1.0", "torch": torch.__version__, "transformers": transformers.__version__},
    }
    if evaluate:
        float_source = DiskSource(source.path, dev, cdtype) if streaming else None  # its own skeleton
        report["perplexity_float"] = _eval(lm, max_windows, 2048, "float ppl", source=float_source)
    calib_ids = None
    needs_data = any(get_pass(n).needs_calibration or getattr(c, "allocator", None) == "fisher"
                     for n, c in pipeline)
    if needs_data or (fpt is not None and fpt.e2e_steps) or (act is not None and act.mode == "static"):
        calib_ids = calibration_windows(lm.tokenizer, calib, nsamples, seqlen, seed, model=lm.model)
        report["calibration"] = {"source": calib, "nsamples": nsamples, "seqlen": seqlen, "seed": seed}
    routing_ids = routing_ref = None
    if not streaming and structure_of(lm.model).is_moe():  # routing fidelity: float routers vs the quantized model's
        from moe.routing import router_logits

        routing_ids = _routing_sample(lm.tokenizer)
        routing_ref = router_logits(lm.model, routing_ids)
    check_resumable(pipeline, True)  # before the work folder exists: a refused recipe leaves nothing behind
    work = _work_dir(out, lm.source, calib_ids, pipeline, dev, cdtype, restart)
    store = None
    if offload_activations:
        from quant.engine.blockwise import ActivationStore

        if dev.type != "cpu":
            raise QuantError("--offload-activations works with --device cpu (on a GPU the activations stay there)")
        store = ActivationStore(work.path / "activations")
    ctx = QuantContext(lm.model, lm.tokenizer, calib_ids=calib_ids, device=str(dev), work=work,
                       source=source or ResidentSource(dev, cdtype), activations=store)
    t0 = time.perf_counter()
    passes = run_pipeline(ctx, pipeline)
    report["quantize_seconds"] = round(time.perf_counter() - t0, 1)
    report["passes"] = passes
    report["sizes"] = quantized_sizes(lm.model)
    if routing_ref is not None:
        from moe.routing import compare_routing, router_logits, summarize

        k = lm.model.config.num_experts_per_tok
        report["routing"] = summarize(compare_routing(routing_ref, router_logits(lm.model, routing_ids), k))
        typer.echo("routing vs float: " + ", ".join(f"{key} {v:.4f}" for key, v in report["routing"].items()))
    qc = {
        "method": method,
        "bits": bits if budget is None else budget,
        "allocation": allocation,
        "group_size": group_size,
        "sym": config.sym,
        "modules": ctx.modules,
        "not_quantized": ["embeddings", *([] if head.enabled else ["lm_head"]), "norms"],
        "norm_biases": ctx.norm_biases,
        "passes": [{"name": p["name"], "config": p["config"]} for p in passes],
        "calibration": report.get("calibration"),
    }
    if dist.rank() != 0:  # rank 0 writes the checkpoint and reports
        dist.barrier()
        return
    out = save_quantized(lm.model, lm.tokenizer, out, qc, report, overwrite=overwrite,
                         tensors=work.tensor if streaming else None)
    work.remove()
    dist.barrier()
    typer.echo(
        f"quantized {len(ctx.modules)} linears in {report['quantize_seconds']} s; "
        f"{report['sizes']['bits_per_weight']} bits/weight including scales and zeros"
    )
    if group_size != -1:
        fallback = Counter(m["group_size"] for m in ctx.modules.values() if m["group_size"] != group_size)
        for g, n in sorted(fallback.items()):
            typer.echo(f"note: group {group_size} does not divide the inputs of {n} layers; they use group {g}")
    if ctx.allocation is not None:
        from quant.methods.allocation import allocation_table
        from quant.methods.allocation_plot import plot_allocation

        typer.echo(allocation_table(ctx.allocation).splitlines()[-1])
        typer.echo(f"allocation map: {plot_allocation(ctx.allocation, out / 'allocation.png')}")
    tuned = next((p["summary"] for p in passes if p["name"] == "finetune"), None)
    if tuned and (tuned["curves"] or tuned.get("e2e")):
        from quant.methods.finetune_plot import plot_finetune

        said = [f"held-out block error {100 * tuned['mean_reduction']:.1f}% lower on average"] * bool(tuned["curves"])
        if tuned.get("e2e"):
            e2e = tuned["e2e"]
            said.append(f"held-out KL to the float model {100 * e2e['kl_reduction']:.1f}% lower "
                        f"({e2e['held'][0]:.4g} -> {e2e['held_best']:.4g})")
        typer.echo(f"finetune: {'; '.join(said)}; curves: {plot_finetune(tuned, out / 'finetune.png')}")
    typer.echo(f"wrote {out}")
    if evaluate:
        written = DiskSource(out, dev, cdtype, checkpoint=True) if streaming else None
        report["perplexity_quantized"] = _eval(lm, max_windows, 2048, "quantized ppl", source=written)
        _write_json_atomic(out / "quant_report.json", report)
        f, q = report["perplexity_float"], report["perplexity_quantized"]
        typer.echo(
            f"WikiText-2 perplexity ({q['windows']}/{q['total_windows']} windows of 2048): "
            f"float {f['ppl']:.3f}  ->  {method} {width} {q['ppl']:.3f}"
        )


def _choose_stream(model: str | None, stream: bool | None, dtype, whole_model: list[str]) -> bool:
    """Stream when asked, or (by default) when a local float model would not fit comfortably in memory."""
    from quant.formats.models import resolve
    from quant.formats.reader import available_memory

    if stream is False:
        return False
    path = Path(resolve(model))
    if stream is None:
        # regular files only: links, devices and the like are the loader's to refuse, in one line
        files = [f for f in path.glob("*.safetensors") if f.is_file()] if path.is_dir() else []
        avail = available_memory()
        need = sum(f.stat().st_size for f in files) * (4 if dtype.itemsize >= 4 else 2) // 2  # stored mostly bf16
        if not files or avail is None or need <= avail // 2:
            return False
    if not path.is_dir():
        raise QuantError(f"--stream reads a local model folder; {model!r} is not one (download it first)")
    if whole_model:
        raise QuantError(f"{whole_model[0]} needs the whole model in memory: use --no-stream")
    return True


def _work_dir(out: Path, source: str, calib_ids, pipeline: list, device, dtype, restart: bool):
    """The run's work folder: finished blocks are kept there, and the same command resumes after a kill."""
    import dataclasses

    from quant.engine import distributed as dist
    from quant.engine.resume import WorkDir, fingerprint, model_fingerprint, work_dir_for

    path = Path(source)
    fp = fingerprint(
        model=model_fingerprint(path) if path.is_dir() else source,
        calibration=calib_ids if calib_ids is not None else "none",
        recipe=[(n, dataclasses.asdict(c)) for n, c in pipeline],
        compute=[str(device.type), str(dtype), dist.world()],
    )
    return WorkDir(work_dir_for(out), fp, resume=not restart)


@app.command("allocate")
@pass_options("allocate")
def allocate_cmd(
    model: str = typer.Argument(None, help=MODEL_HELP, show_default=False),
    bits: float = typer.Option(3.0, help="Average budget in bits (storage-matched to uniform at that width)."),
    png: Path = typer.Option(Path("allocation.png"), help="Where to write the allocation map."),
    json_out: Path = typer.Option(None, "--json", help="Also write scores and bits as JSON to this file."),
    calib: str = typer.Option("c4", help="Calibration text of --allocation fisher (as quantize model's --calib); "
                              "windows of 512 tokens, seed 0."),
    trust_remote_code: bool = typer.Option(False, help="Allow model code from the Hub to run (off by default)."),
    pass_values: dict | None = None,
) -> None:
    """Score every layer (NSDS: weights only, no data; fisher: gradients on calibration text, the weights as they
    are, unrotated) and print the bits each would get; no quantization."""
    from calibrate import calibration_windows
    from quant.formats.models import load_model
    from quant.methods.allocation import allocate, allocation_table
    from quant.methods.allocation_plot import plot_allocation

    config = _pass_config("allocate", pass_values, budget=bits)
    lm = load_model(model, trust_remote_code=trust_remote_code)
    if lm.quantized:
        raise QuantError(f"{lm.source} is already quantized; pass the float model")
    fisher = config.allocator == "fisher"
    ids = calibration_windows(lm.tokenizer, calib, config.fisher_windows, 512, model=lm.model) if fisher else None
    t0 = time.perf_counter()
    alloc = allocate(lm.model, config, ids)
    seconds = time.perf_counter() - t0
    if alloc.scores is not None:
        from quant.methods.nsds import score_table

        typer.echo(score_table(alloc.scores))
        typer.echo(f"unembedding subspace: {alloc.scores.unembed_rank} of {alloc.scores.hidden} directions")
    typer.echo(allocation_table(alloc))
    typer.echo(f"scored and allocated in {seconds:.1f} s")
    typer.echo(f"allocation map: {plot_allocation(alloc, png)}")
    if json_out:
        res = {"model": lm.source, "seconds": round(seconds, 2), **alloc.summary()}
        if alloc.scores is not None:
            res["nsds"] = alloc.scores.to_dict()
        _write_json_atomic(json_out, res)


@app.command("passes")
def passes_cmd(
    name: str = typer.Argument(None, help="One pass (default: all).", show_default=False),
) -> None:
    """The passes a recipe (quantize model --recipe FILE) can list, and every field of their configs: type,
    default, command-line flag where there is one, and what it does."""
    from quant.engine.options import describe

    for info in [get_pass(name)] if name else PASSES.values():
        kind = ("quantizer, " if info.quantizer else "") + ("block pass" if info.block else "whole-model pass")
        data = ", needs calibration" if info.needs_calibration else ""
        doc = (info.config_cls.__doc__ or "").strip().splitlines()[0] if info.config_cls.__doc__ else ""
        typer.echo(f"{info.name} ({kind}{data}): {doc}")
        typer.echo("\n".join(describe(info.config_cls)))


@app.command("eval")
def eval_cmd(
    model: str = MODEL_OR_CHECKPOINT,
    max_windows: int = typer.Option(0, help="Evaluate only the first N windows (0 = the full test split)."),
    seqlen: int = typer.Option(2048, help="Window length in tokens (2048 is the standard protocol)."),
    dataset: str = typer.Option(
        "wikitext2", help="wikitext2 (raw test split) or c4 (the bundled C4 evaluation slice, 1,000 records)."
    ),
    json_out: Path = typer.Option(None, "--json", help="Also write the result as JSON to this file."),
    device: str = typer.Option("auto", help=DEVICE_HELP),
    dtype: str = typer.Option(
        "auto", help="Compute dtype: auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16 or float16."
    ),
    stream: bool = typer.Option(
        None,
        "--stream/--no-stream",
        help="Read the model (a float model folder or one of our checkpoints) block by block from its "
        "safetensors files and run batches of windows through one block at a time: memory stays near one "
        "block plus the windows' activations. Default: stream when the model would take more than half the "
        "available memory.",
    ),
    window_batch: int = typer.Option(
        0, help="With --stream: windows per pass over the blocks (0 = as many as fit in a quarter of the "
        "available memory). Each pass reads the whole model from disk once.",
    ),
    trust_remote_code: bool = typer.Option(False, help="Allow model code from the Hub to run (off by default)."),
) -> None:
    """Perplexity on WikiText-2 (raw, test) or the C4 slice: non-overlapping windows, ppl = exp(mean window NLL)."""
    import torch

    from quant.engine.loop import parse_device, parse_dtype
    from quant.formats.models import LoadedModel, load_model, resolve
    from quant.formats.reader import load_tokenizer
    from quant.runtime.perplexity import EVAL_SETS

    if dataset not in EVAL_SETS:
        raise QuantError(f"unknown dataset {dataset!r}; choose from {', '.join(EVAL_SETS)}")
    if window_batch < 0:
        raise QuantError("--window-batch must be 0 (automatic) or a positive number of windows")
    dev = parse_device(device)
    cdtype = parse_dtype(dtype, dev)
    if _choose_stream(model, stream, cdtype, []):
        from quant.engine.streaming import DiskSource

        source = DiskSource(resolve(model), dev, cdtype, checkpoint=True)
        lm = LoadedModel(None, load_tokenizer(source.path), str(source.path), quantized=source.qc is not None)
    else:
        source = None
        lm = load_model(model, dtype=torch.float32 if dtype == "auto" else cdtype, trust_remote_code=trust_remote_code)
        lm = LoadedModel(lm.model.to(dev), lm.tokenizer, lm.source, lm.quantized)
    res = {"model": lm.source, "quantized": lm.quantized,
           **_eval(lm, max_windows, seqlen, "ppl", dataset, source=source, window_batch=window_batch)}
    typer.echo(json.dumps(res, indent=2))
    if json_out:
        _write_json_atomic(json_out, res)


def _load_for_inference(model: str | None, dtype: str, threads: int, int8_tokens: bool, trust_remote_code: bool):
    """A float model (in ``dtype``) or one of our checkpoints (in its stored dtype), on the CPU, for generation."""
    import torch

    from kernels_cpu.dispatch import use_int8_tokens
    from quant.formats.models import load_model

    use_int8_tokens(int8_tokens)
    if threads < 0:
        raise QuantError("--threads must be 0 (torch's default) or positive")
    if threads:
        torch.set_num_threads(threads)
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise QuantError(f"unknown --dtype {dtype!r}; choose from {', '.join(dtypes)}")
    return load_model(model, dtype=dtypes[dtype], trust_remote_code=trust_remote_code)


INFER_DTYPE_HELP = "Dtype of a float model: float32, bfloat16 or float16 (our checkpoints run in their stored dtype)."
TOKENS_HELP = (
    "On CPUs with AVX2 or AVX-512 VNNI, the low-bit kernels quantize the tokens to int8 per group (faster, as "
    "llama.cpp does; on SmolLM2 INT4 the next-token loss stayed within 1% of the float path) or keep them float32 "
    "(matches the dequantize path)."
)
THREADS_HELP = "CPU threads (0: torch's default, one per core)."


@app.command("generate")
def generate_cmd(
    model: str = MODEL_OR_CHECKPOINT,
    prompt: str = typer.Option("The capital of France is", help="The text to continue."),
    max_new_tokens: int = typer.Option(64, help="Tokens to generate at most (fewer if the model ends the text)."),
    chat: bool = typer.Option(False, help="Wrap the prompt in the tokenizer's chat template (instruct models)."),
    do_sample: bool = typer.Option(False, "--sample/--greedy", help="Sample instead of greedy decoding."),
    temperature: float = typer.Option(1.0, help="With --sample: softmax temperature."),
    top_k: int = typer.Option(50, help="With --sample: keep the k most likely tokens (0: all)."),
    top_p: float = typer.Option(1.0, help="With --sample: keep the smallest set of tokens with this much mass."),
    repetition_penalty: float = typer.Option(1.0, help="Penalty on tokens already in the text (1.0: none)."),
    seed: int = typer.Option(0, help="Seed of the sampler."),
    dtype: str = typer.Option("float32", help=INFER_DTYPE_HELP),
    threads: int = typer.Option(0, help=THREADS_HELP),
    int8_tokens: bool = typer.Option(True, "--int8-tokens/--float-tokens", help=TOKENS_HELP),
    trust_remote_code: bool = typer.Option(False, help="Allow model code from the Hub to run (off by default)."),
) -> None:
    """Continue a prompt on the CPU, printing the text as it is generated (speed on stderr).

    Our checkpoints decode through the low-bit CPU kernels (kernels_cpu); float models run as transformers runs them.
    """
    import torch
    from transformers import TextStreamer

    from quant.runtime.generation import SamplingConfig, generate, prompt_ids

    if max_new_tokens < 1:
        raise QuantError("--max-new-tokens must be at least 1")
    sampling = SamplingConfig(do_sample, temperature, top_k, top_p, repetition_penalty)
    sampling.validate()
    lm = _load_for_inference(model, dtype, threads, int8_tokens, trust_remote_code)
    ids = prompt_ids(lm.tokenizer, prompt, chat)
    torch.manual_seed(seed)
    streamer = TextStreamer(lm.tokenizer, skip_prompt=chat, skip_special_tokens=True)
    new, seconds = generate(lm.model, lm.tokenizer, ids, max_new_tokens, sampling, streamer)
    typer.echo(f"{new.shape[1]} tokens in {seconds:.2f} s ({new.shape[1] / seconds:.1f} tokens/s, prompt "
               f"{ids.shape[1]} tokens included in the time)", err=True)


@app.command("bench")
def bench_cmd(
    model: str = MODEL_OR_CHECKPOINT,
    prompt_tokens: int = typer.Option(256, help="Prompt length (WikiText-2 test text)."),
    new_tokens: int = typer.Option(128, help="Tokens decoded after the prompt (greedy)."),
    batch: str = typer.Option("1,4", help="Comma-separated batch sizes; each is timed on its own."),
    repeats: int = typer.Option(1, help="Timed runs per batch size; the run of median decode speed is reported."),
    compile_: bool = typer.Option(
        False, "--compile/--no-compile",
        help="Run the decode step torch.compile'd over a static KV cache (packed linears become graph operators): "
        "removes the per-layer Python that dominates a small model's decode on a CPU. Compiles once per batch "
        "size (a minute or more on 2 cores, reported as compile_s, not counted in the speed).",
    ),
    dtype: str = typer.Option("float32", help=INFER_DTYPE_HELP),
    threads: int = typer.Option(0, help=THREADS_HELP),
    json_out: Path = typer.Option(None, "--json", help="Also write the result as JSON to this file."),
    int8_tokens: bool = typer.Option(True, "--int8-tokens/--float-tokens", help=TOKENS_HELP),
    trust_remote_code: bool = typer.Option(False, help="Allow model code from the Hub to run (off by default)."),
) -> None:
    """Inference speed on the CPU: prefill and decode tokens/s, time to first token, peak memory (RSS).

    One forward over the prompt, then one per new token with the KV cache, after an untimed warm-up. Peak RSS
    is reset after loading, so it is the memory of generation; the load's peak is reported beside it.
    """
    from quant.runtime.generation import bench, peak_rss

    try:
        batches = tuple(int(b) for b in batch.split(","))
    except ValueError:
        raise QuantError(f"--batch must be comma-separated integers, got {batch!r}") from None
    if compile_:
        import torch._inductor.config as inductor

        # compile in this process: inductor's pool of compile workers boots in the background (each imports torch)
        # and took CPU from the timed runs that followed (prefill at half speed in those rows)
        inductor.compile_threads = 1
    t0 = time.perf_counter()
    lm = _load_for_inference(model, dtype, threads, int8_tokens, trust_remote_code)
    load = {"load_seconds": round(time.perf_counter() - t0, 2), "peak_rss_load_bytes": peak_rss()}
    res = {"model": lm.source, "quantized": lm.quantized, "dtype": dtype if not lm.quantized else "stored",
           "int8_tokens": int8_tokens,
           **load, **bench(lm.model, lm.tokenizer, prompt_tokens, new_tokens, batches, repeats, compile_)}
    for b, r in res["batches"].items():
        decode = f"decode {r['decode_tok_s']:.1f} tok/s, " if "decode_tok_s" in r else ""
        typer.echo(f"batch {b}: prefill {r['prefill_tok_s']:.1f} tok/s, {decode}time to first token "
                   f"{r['ttft_s'] * 1000:.0f} ms, peak RSS {r['peak_rss_bytes'] / 2**20:.0f} MiB")
    typer.echo(f"lm_head {res['lm_head']}; {res['bytes_per_token'] / 1e6:.1f} MB of weights read per decoded token; "
               f"{res['threads']} threads")
    if json_out is not None:
        _write_json_atomic(json_out, res)


@app.command("inspect")
def inspect_cmd(
    ckpt: Path = typer.Argument(..., help="A checkpoint folder: ours (`quantize model`) or a GPTQ-format one."),
) -> None:
    """Summarise a quantized checkpoint: method, bits and groups per layer, sizes, recorded perplexity."""
    from quant.formats.checkpoint import read_quantization_config
    from quant.formats.gptq_format import read_gptq_config
    from quant.formats.models import checkpoint_kind
    from quant.formats.reader import read_config, read_json

    if not ckpt.is_dir():
        raise QuantError(f"{ckpt} is not a folder")
    raw = read_config(ckpt)
    kind = checkpoint_kind(ckpt, raw)
    if kind is None:
        raise QuantError(f"{ckpt} is not a quantized checkpoint (no quantization_config): a float model")
    weights = sum(f.stat().st_size for f in ckpt.glob("*.safetensors") if f.is_file())
    if kind == "gptq":
        gc = read_gptq_config(ckpt, raw)
        typer.echo(
            f"{ckpt}: GPTQ ({gc.get('checkpoint_format', 'gptq')}), {gc['bits']} bits, group size "
            f"{gc.get('group_size', -1)}, sym {gc.get('sym')}, desc_act {gc.get('desc_act', False)}"
        )
        typer.echo(f"  weights on disk: {weights / 2**20:.1f} MiB")
        return
    qc = read_quantization_config(ckpt, raw)
    mods = qc["modules"]
    typer.echo(f"{ckpt}: method {qc.get('method')}, format {qc['format_version']}, packing {qc['packing']}")
    typer.echo(
        f"  {len(mods)} quantized linears; bits {dict(Counter(m['bits'] for m in mods.values()))}; "
        f"group sizes {dict(Counter(m['group_size'] for m in mods.values()))}; "
        f"sym {dict(Counter(m.get('sym') for m in mods.values()))}"
    )
    act, ops = qc.get("activations"), qc.get("input_ops") or {}
    if act:
        linear = "float" if act["bits"] == 16 else f"int{act['bits']} {act['mode']} {'sym' if act['sym'] else 'asym'}"
        kv = "float" if act.get("kv_bits", 16) == 16 else f"int{act['kv_bits']}"
        typer.echo(f"  activations: linear inputs {linear} ({len(act['modules'])} linears); KV cache {kv}")
    if ops:
        had = sum(1 for o in ops.values() if o.get("hadamard"))
        scaled = sum(1 for o in ops.values() if o.get("token_scale"))
        typer.echo(f"  online ops: Hadamard on {had} inputs, dynamic per-token scaling on {scaled}")
    typer.echo(f"  weights on disk: {weights / 2**20:.1f} MiB")
    rep = ckpt / "quant_report.json"
    if os.path.lexists(rep):
        _echo_report(read_json(rep, ckpt))


@app.command("inspect-model")
def inspect_model_cmd(
    model: str = typer.Argument(None, help="A model folder or Hub id (default: the embedded SmolLM2-135M)."),
    as_json: bool = typer.Option(False, "--json", help="Print the structure as JSON instead of text."),
    trust_remote_code: bool = typer.Option(False, help="Allow a Hub model's own code to run (off by default)."),
) -> None:
    """Show the structure discovered from a model (blocks, stages of linears, norms, what reads and writes the
    residual stream, roles) and which passes apply to it: those that do not say what the model lacks."""
    from quant.engine.structure import structure_of
    from quant.formats.models import load_model

    lm = load_model(model, trust_remote_code=trust_remote_code)
    s = structure_of(lm.model)
    out = {**s.summary(), "passes": s.passes()}
    if as_json:
        typer.echo(json.dumps(out, indent=2))
        return
    for key, value in out.items():
        if isinstance(value, dict):
            typer.echo(f"{key}:")
            for k, v in value.items():
                text = json.dumps(v) if isinstance(v, (dict, list)) else str(v)
                typer.echo(f"  {k}: {text}")
        else:
            typer.echo(f"{key}: {value}")


def _echo_report(r: dict) -> None:
    """The report's headline numbers; a field of the wrong type is skipped (the report is informative only)."""

    def num(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    bpw = r.get("sizes", {}).get("bits_per_weight") if isinstance(r.get("sizes"), dict) else None
    if num(bpw):
        typer.echo(f"  quantized linears: {bpw} bits/weight including scales and zeros")
    for key in ("perplexity_float", "perplexity_quantized"):
        p = r.get(key)
        if isinstance(p, dict) and num(p.get("ppl")):
            typer.echo(f"  {key}: {p['ppl']:.3f} ({p.get('windows', '?')}/{p.get('total_windows', '?')} windows)")
    if num(r.get("quantize_seconds")):
        typer.echo(f"  quantization wall time: {r['quantize_seconds']} s")


@app.command("export")
def export_cmd(
    ckpt: Path = typer.Argument(..., help="A checkpoint folder written by `quantize model`."),
    to_hub: str = typer.Option(None, help="Upload to this Hub repo (ORG/NAME); it is created if needed."),
    private: bool = typer.Option(False, help="Create the Hub repo as private."),
    revision: str = typer.Option(None, help="Upload to this branch (created if needed) instead of main."),
    token: str = typer.Option(
        None, help="Hub token (default: HF_TOKEN or the token stored by `hf auth login`).", show_default=False
    ),
    fmt: str = typer.Option(
        "lowbit",
        "--format",
        help="lowbit: the checkpoint as is (loads with lowbit, or transformers after `import quant`). "
        "gptq: the standard GPTQ layout that transformers+gptqmodel and vLLM load (uniform 2/4/8-bit only).",
    ),
    checkpoint_format: str = typer.Option(
        "gptq", help="--format gptq: gptq (legacy v1 zero-points, read everywhere) or gptq_v2 (GPTQModel)."
    ),
    out: Path = typer.Option(None, help="Output folder: of --format gptq, or of --dry-run."),
    dry_run: bool = typer.Option(False, help="Write exactly what would be uploaded into --out and list it."),
    base_model: str = typer.Option(None, help="Base model id for the model card (default: recorded by the run)."),
    license: str = typer.Option(None, help="License for the model card (default: the base model's)."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
) -> None:
    """Ship a checkpoint: upload it to the Hub with a model card, or convert it to the GPTQ format.

    An interrupted upload resumes when run again: content already on the Hub is not sent twice.
    """
    import tempfile

    from quant.formats.checkpoint import check_output_dir, read_quantization_config
    from quant.formats.gptq_format import export_gptq
    from quant.formats.hub import stage, upload

    if fmt not in ("lowbit", "gptq"):
        raise QuantError(f"unknown --format {fmt!r}; choose lowbit or gptq")
    if not ckpt.is_dir():
        raise QuantError(f"{ckpt} is not a folder")
    read_quantization_config(ckpt)
    if dry_run and out is None:
        raise QuantError("--dry-run writes what would be uploaded into --out FOLDER; pass --out")
    if not (to_hub or dry_run or (fmt == "gptq" and out)):
        raise QuantError("nothing to do: pass --to-hub ORG/NAME, --dry-run --out FOLDER, or --format gptq --out FOLDER")
    if out is not None:
        check_output_dir(out, overwrite)
    card = {"base_model": base_model, "license": license, "fmt": fmt}
    repo_id = to_hub or f"your-org/{ckpt.absolute().name}"
    with tempfile.TemporaryDirectory() as tmp:
        files = None
        if fmt == "gptq":
            direct = out is not None and not to_hub and not dry_run
            files = export_gptq(ckpt, out if direct else Path(tmp) / "gptq", checkpoint_format, overwrite)
            if direct:
                typer.echo(
                    f"wrote GPTQ-format checkpoint {files}: {', '.join(sorted(f.name for f in files.iterdir()))}"
                )
                return
        if dry_run:
            names = stage(ckpt, out, repo_id, files=files, overwrite=overwrite, **card)
            typer.echo(f"dry run: {len(names)} files that would be uploaded to {repo_id}, written to {out}:")
            for n in names:
                typer.echo(f"  {n}  ({(out / n).stat().st_size} bytes)")
            return
        url = upload(ckpt, to_hub, private=private, revision=revision, token=token, files=files, **card)
    typer.echo(f"uploaded to {to_hub}: {url}")


moe_app = typer.Typer(help="Mixture-of-Experts tools: MPI router alignment and its diagnostic.")
app.add_typer(moe_app, name="moe")


@moe_app.command("align")
def moe_align_cmd(
    model: str = typer.Argument(..., help="A float MoE model: a local folder or a Hub id (Mixtral, Qwen-MoE, OLMoE)."),
    finetune_steps: int = typer.Option(
        0, help="Router-only distillation steps against the original model (0: one MPI step applied blindly)."
    ),
    lr: float = typer.Option(1e-3, help="Learning rate of the router fine-tune (Adam)."),
    power_steps: int = typer.Option(1, help="Power iterations per MPI step (1 is the paper's default and best)."),
    calib: str = typer.Option("c4", help="Calibration text for the router fine-tune (see `quantize model --help`)."),
    nsamples: int = typer.Option(32, help="Calibration windows for the fine-tune."),
    seqlen: int = typer.Option(256, help="Tokens per calibration window."),
    out: Path = typer.Option(None, help="Write the re-aligned model here (safetensors; omit for the diagnostic only)."),
    overwrite: bool = typer.Option(False, help="Replace --out if it exists."),
    json_out: Path = typer.Option(None, "--json", help="Also write the diagnostic and routing numbers as JSON."),
    trust_remote_code: bool = typer.Option(False, help="Allow model code from the Hub to run (off by default)."),
) -> None:
    """Post-training MPI: pull each router row toward its expert's principal direction, then report how
    aligned the routers are (cosine, normalized Rayleigh quotient, row-norm spread) before and after,
    and how much routing changed on held-out text (top-k overlap, top-1, KL, MaxVio)."""
    from tqdm.auto import tqdm

    from calibrate import calibration_windows
    from moe.mpi import AlignConfig, align_routers, alignment
    from moe.routing import compare_routing, router_logits, summarize
    from quant.engine.structure import structure_of
    from quant.formats.atomic import atomic_dir
    from quant.formats.checkpoint import check_output_dir
    from quant.formats.models import load_model

    if out is not None:
        check_output_dir(out, overwrite)
    lm = load_model(model, trust_remote_code=trust_remote_code)
    if lm.quantized or not structure_of(lm.model).is_moe():
        raise QuantError(f"{lm.source} is not a float Mixture-of-Experts model (Mixtral, Qwen2/3-MoE, OLMoE)")
    held_out = _routing_sample(lm.tokenizer)
    ref = router_logits(lm.model, held_out)
    before = {n: a.summary() for n, a in alignment(lm.model).items()}
    ids = calibration_windows(lm.tokenizer, calib, nsamples, seqlen, 0, model=lm.model) if finetune_steps else None
    cfg = AlignConfig(power_steps=power_steps, finetune_steps=finetune_steps, lr=lr)
    fit = align_routers(lm.model, cfg, ids, progress=lambda r: tqdm(r, desc="router fine-tune", unit="step"))
    after = {n: a.summary() for n, a in alignment(lm.model).items()}
    routing = summarize(compare_routing(ref, router_logits(lm.model, held_out), lm.model.config.num_experts_per_tok))
    typer.echo(f"{'layer':<28} {'cos before':>10} {'cos after':>10} {'RQ before':>10} {'RQ after':>10} {'norm cv':>8}")
    for n in before:
        b, a = before[n], after[n]
        typer.echo(
            f"{n:<28} {b['cosine_mean']:>10.3f} {a['cosine_mean']:>10.3f} {b['rayleigh_mean']:>10.3f} "
            f"{a['rayleigh_mean']:>10.3f} {b['row_norm_cv']:>8.3f}"
        )
    typer.echo("routing vs the original: " + ", ".join(f"{k} {v:.4f}" for k, v in routing.items()))
    result = {"model": lm.source, "config": vars(cfg), "before": before, "after": after, "routing": routing, **fit}
    if json_out:
        _write_json_atomic(json_out, result)
    if out is not None:
        with atomic_dir(out) as tmp:
            lm.model.save_pretrained(tmp)
            lm.tokenizer.save_pretrained(tmp)
            (tmp / "mpi_align.json").write_text(json.dumps(result, indent=2))
        typer.echo(f"wrote {out}")


def main() -> None:
    try:
        app()
    except QuantError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted; no partial output was written", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
