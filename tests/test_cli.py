"""The `quantize` command: help, a real run on a tiny model, and one-line errors for bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run(*args, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    return subprocess.run(
        [sys.executable, "-c", "import cli; cli.main()", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )


def assert_one_line_error(r, pattern):
    assert r.returncode != 0, r.stdout
    assert "Traceback" not in r.stderr, r.stderr
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and pattern in err[0], r.stderr


def test_help_explains_every_option():
    r = run("model", "--help")
    assert r.returncode == 0
    for opt in (
        "--bits",
        "--method",
        "--group-size",
        "--sym",
        "--clip",
        "--calib",
        "--nsamples",
        "--seqlen",
        "--act-order",
        "--damp",
        "--seed",
        "--out",
        "--overwrite",
        "--eval",
        "--max-windows",
        "--trust-remote-code",
        "--allocation",
        "--candidates",
        "--granularity",
        "--scheme",
        "--alloc-seed",
        "--backend",
        "--dsq",
        "--no-dsq",
        "--dac",
        "--no-dac",
        "--dac-teacher",
        "--rotation",
        "--no-rotation",
        "--rotation-mode",
    ):
        assert opt in r.stdout, opt
    for cmd in ("eval", "inspect", "allocate"):
        assert run(cmd, "--help").returncode == 0, cmd


def test_quantize_inspect_eval_tiny(tmp_path, tiny_dir):
    out = tmp_path / "q"
    r = run(
        "model",
        tiny_dir,
        "--method",
        "gptq",
        "--bits",
        "3",
        "--group-size",
        "32",
        "--nsamples",
        "4",
        "--seqlen",
        "64",
        "--max-windows",
        "1",
        "--out",
        out,
    )
    assert r.returncode == 0, r.stderr
    assert "float" in r.stdout and "gptq w3" in r.stdout
    report = json.loads((out / "quant_report.json").read_text())
    assert report["perplexity_quantized"]["windows"] == 1 and report["quantize_seconds"] >= 0
    r = run("inspect", out)
    assert r.returncode == 0 and "14 quantized linears" in r.stdout and "{3: 14}" in r.stdout
    r = run("eval", out, "--max-windows", "1", "--json", tmp_path / "ppl.json")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "ppl.json").read_text())
    assert res["quantized"] is True
    assert res["ppl"] == pytest.approx(report["perplexity_quantized"]["ppl"], rel=1e-6)


@pytest.mark.parametrize(
    "args,pattern",
    [
        (["--method", "awq"], "unknown method or pass 'awq'"),
        (["--bits", "5"], "bits must be one of"),
        (["--group-size", "100"], "group size must be one of"),
        (["--clip", "max"], "clip must be one of"),
        (["--bits", "2.5"], "fractional average needs --allocation"),
        (["--bits", "1.5", "--allocation", "nsds"], "feasible range is 2 to 4 bits"),
        (["--allocation", "magic"], "unknown allocator"),
        (["--method", "d2quant", "--backend", "awq"], "unknown backend"),
        (["--method", "d2quant", "--rotation-mode", "dct"], "unknown rotation mode"),
        (["--allocation", "nsds", "--candidates", "2,x"], "comma-separated integers"),
        (["--method", "rtn", "--backend", "gptq"], "--backend applies to d2quant, which this run does not"),
        (["--act-mode", "static"], "--act-mode applies to actquant"),
        (["--fpt-e2e-steps", "2"], "--fpt-e2e-steps applies to fpt"),
        (["--act-bits", "8", "--act-mode", "static", "--act-asym"], "static activation scales are symmetric"),
        (["--finetune", "e2e2"], "unknown --finetune 'e2e2'"),
        (["--scale-bits", "12"], "scale bits must be one of"),
        (["--method", "gptq", "--finetune", "e2e", "--stream"], "needs the whole model in memory"),
        (["--finetune-steps", "5"], "--finetune-steps applies to finetune"),
        (["--finetune", "block", "--finetune-steps", "0"], "must be at least 1"),
    ],
)
def test_bad_options(tmp_path, tiny_dir, args, pattern):
    r = run("model", tiny_dir, "--out", tmp_path / "q", *args)
    assert_one_line_error(r, pattern)
    assert not (tmp_path / "q").exists()


def test_missing_model(tmp_path):
    assert_one_line_error(run("model", tmp_path / "nope", "--out", tmp_path / "q"), "not found")
    assert_one_line_error(run("eval", tmp_path / "nope"), "not found")


def test_existing_output_refused(tmp_path, tiny_dir):
    out = tmp_path / "q"
    out.mkdir()
    assert_one_line_error(run("model", tiny_dir, "--out", out), "already exists")


def test_nan_weights_refused(tmp_path, tiny_dir):
    from safetensors.torch import load_file, save_file

    f = tiny_dir / "model.safetensors"
    state = load_file(str(f))
    state["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(state, str(f), metadata={"format": "pt"})
    r = run("model", tiny_dir, "--method", "rtn", "--out", tmp_path / "q", "--no-eval")
    assert_one_line_error(r, "NaN")
    assert not (tmp_path / "q").exists()


def test_unsupported_architecture(tmp_path):
    from transformers import ViTConfig, ViTModel

    d = tmp_path / "vit"  # not a causal language model: nothing to quantize it as
    config = ViTConfig(num_hidden_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64)
    ViTModel(config).save_pretrained(d)
    assert_one_line_error(run("model", d, "--out", tmp_path / "q"), "unsupported architecture 'vit'")


def test_pickle_only_model_refused(tmp_path, tiny_dir):
    (tiny_dir / "model.safetensors").rename(tiny_dir / "pytorch_model.bin")
    assert_one_line_error(run("eval", tiny_dir), "only safetensors")


def test_corrupt_checkpoint(tmp_path, tiny_dir):
    out = tmp_path / "q"
    assert run("model", tiny_dir, "--method", "rtn", "--no-eval", "--out", out).returncode == 0
    f = out / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    assert_one_line_error(run("eval", out, "--max-windows", "1"), "corrupt checkpoint")


def test_bad_calibration_source(tmp_path, tiny_dir):
    r = run("model", tiny_dir, "--calib", tmp_path / "missing.txt", "--out", tmp_path / "q", "--no-eval")
    assert_one_line_error(r, "calibration source")


def test_tiny_model_is_really_quantized(tmp_path, tiny_dir):
    from quant import load_quantized

    out = tmp_path / "q"
    assert run("model", tiny_dir, "--method", "rtn", "--bits", "2", "--no-eval", "--out", out).returncode == 0
    model, _ = load_quantized(out)
    q = model.model.layers[0].self_attn.q_proj
    assert q.bits == 2
    # 2-bit RTN of the float weight from first principles (quant/numerics/grid.py, asymmetric min-max): the default
    # group 128 exceeds the 64 inputs, so one group per row; range widened to hold 0, scale rounded to fp16
    from safetensors.torch import load_file

    w = load_file(tiny_dir / "model.safetensors")["model.layers.0.self_attn.q_proj.weight"].float()
    lo, hi = w.amin(1, keepdim=True).clamp(max=0), w.amax(1, keepdim=True).clamp(min=0)
    s = ((hi - lo) / 3).half().float()
    z = torch.round(-lo / s).clamp(0, 3)
    codes = torch.clamp(torch.round(w / s) + z, 0, 3)
    assert torch.equal(q.codes().float(), codes)
    assert torch.allclose(q.dequantize(), (codes - z) * s, rtol=0, atol=1e-7)
    assert torch.unique(q.codes()).tolist() == [0, 1, 2, 3]  # every level used


def test_allocate_and_quantize_with_allocation(tmp_path, tiny_dir):
    png, js = tmp_path / "map.png", tmp_path / "alloc.json"
    layer = ("--granularity", "layer")  # one width per block, so the map below is per layer
    r = run("allocate", tiny_dir, "--bits", "2.5", "--group-size", "32", *layer, "--png", png, "--json", js)
    assert r.returncode == 0, r.stderr
    assert "bits/weight" in r.stdout and "qk.nv" in r.stdout and png.stat().st_size > 0
    res = json.loads(js.read_text())
    assert sorted(res["bits"].values()) == [2, 3] and len(res["nsds"]["layer_score"]) == 2
    out = tmp_path / "q"
    r = run(
        "model",
        tiny_dir,
        "--method",
        "rtn",
        "--bits",
        "2.5",
        "--allocation",
        "nsds",
        *layer,
        "--group-size",
        "32",
        "--no-eval",
        "--out",
        out,
    )
    assert r.returncode == 0, r.stderr
    assert (out / "allocation.png").is_file()
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["allocation"] == "nsds" and cfg["bits"] == 2.5
    layer_bits = {name.split(".")[2]: m["bits"] for name, m in cfg["modules"].items()}
    assert layer_bits == {k: res["bits"][k] for k in ("0", "1")}
    r = run("inspect", out)
    assert r.returncode == 0 and "2: 7" in r.stdout and "3: 7" in r.stdout


def test_finetune_writes_its_curves(tmp_path, tiny_dir):
    out = tmp_path / "q"
    r = run("model", tiny_dir, "--method", "gptq", "--bits", "3", "--group-size", "32", "--nsamples", "6",
            "--seqlen", "64", "--finetune", "both", "--finetune-steps", "6", "--finetune-e2e-steps", "3",
            "--scale-bits", "8", "--no-eval", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "held-out block error" in r.stdout and "held-out KL to the float model" in r.stdout
    assert (out / "finetune.png").stat().st_size > 0
    qc = json.loads((out / "config.json").read_text())["quantization_config"]  # tuned scales stay 8-bit codes
    assert qc["format_version"] == 2 and {m["format"] for m in qc["modules"].values()} == {"uniform-dq8"}
    report = json.loads((out / "quant_report.json").read_text())
    tuned = next(p for p in report["passes"] if p["name"] == "finetune")
    assert tuned["engine_run"] == "gptq+finetune" and len(tuned["summary"]["curves"]) == 2
    assert len(tuned["summary"]["e2e"]["train"]) <= 3
    passes = json.loads((out / "config.json").read_text())["quantization_config"]["passes"]
    assert [p["name"] for p in passes] == ["gptq", "finetune"]


def test_codebook_codes_from_the_command_line(tmp_path, tiny_dir):
    out = tmp_path / "q"
    r = run("model", tiny_dir, "--method", "d2quant", "--no-dsq", "--bits", "3", "--group-size", "32",
            "--nsamples", "4", "--seqlen", "64", "--scale-bits", "8", "--codebook", "kmeans", "--no-eval", "--out", out)
    assert r.returncode == 0, r.stderr
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format_version"] == 3 and {m["format"] for m in qc["modules"].values()} == {"codebook-dq8"}
    bad = tmp_path / "bad"
    r = run("model", tiny_dir, "--method", "rtn", "--bits", "3", "--codebook", "kmeans", "--no-eval", "--out", bad)
    assert r.returncode == 2 and "--scale-bits 8" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr and not bad.exists()


def test_vector_codebook_codes_from_the_command_line(tmp_path, tiny_dir):
    out = tmp_path / "q"
    r = run("model", tiny_dir, "--method", "gptq", "--bits", "3", "--group-size", "32", "--nsamples", "4",
            "--seqlen", "64", "--scale-bits", "8", "--codebook", "vq2", "--no-eval", "--out", out)
    assert r.returncode == 0, r.stderr
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format_version"] == 4 and {m["format"] for m in qc["modules"].values()} == {"vq2-dq8"}
    bad = tmp_path / "bad"
    r = run("model", tiny_dir, "--method", "gptq", "--bits", "3", "--group-size", "32", "--scale-bits", "8",
            "--codebook", "vq3", "--no-eval", "--out", bad)
    assert r.returncode == 2 and "multiple of 3; got 32" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "Traceback" not in r.stderr and not bad.exists()


def test_d2quant_and_its_ablation_flags(tmp_path, tiny_dir):
    common = ["--bits", "2", "--group-size", "32", "--nsamples", "4", "--seqlen", "64", "--no-eval"]
    out = tmp_path / "d2"
    r = run("model", tiny_dir, "--method", "d2quant", *common, "--dac", "--out", out)
    assert r.returncode == 0, r.stderr
    cfg = json.loads((out / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert [p["name"] for p in qc["passes"]] == ["rotate", "d2quant"] and cfg["tie_word_embeddings"] is False
    assert qc["modules"]["model.layers.0.mlp.down_proj"]["format"] == "dsq" and len(qc["norm_biases"]) == 2
    r = run("eval", out, "--max-windows", "1")
    assert r.returncode == 0, r.stderr
    out2 = tmp_path / "ablate"
    r = run(
        "model",
        tiny_dir,
        "--method",
        "d2quant",
        *common,
        "--no-dsq",
        "--no-dac",
        "--no-rotation",
        "--backend",
        "rtn",
        "--out",
        out2,
    )
    assert r.returncode == 0, r.stderr
    qc = json.loads((out2 / "config.json").read_text())["quantization_config"]
    assert [p["name"] for p in qc["passes"]] == ["d2quant"] and qc["norm_biases"] == []
    assert {m["format"] for m in qc["modules"].values()} == {"uniform"}


def test_fptquant_act_bits_and_fpt_prepass(tmp_path, tiny_dir):
    common = ["--group-size", "32", "--nsamples", "4", "--seqlen", "64", "--no-eval"]
    fpt = ["--fpt-local-steps", "3"]
    out = tmp_path / "fpt"
    r = run("model", tiny_dir, "--method", "fptquant", "--bits", "4", "--act-bits", "4", "--fpt-e2e-steps", "2",
            *common, *fpt, "--out", out)  # fmt: skip
    assert r.returncode == 0, r.stderr
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert [p["name"] for p in qc["passes"]] == ["fptquant", "actquant"]
    assert qc["activations"]["bits"] == 4 and qc["activations"]["mode"] == "dynamic"
    assert len(qc["activations"]["modules"]) == 14
    assert {n.split(".")[-1] for n, s in qc["input_ops"].items() if s["hadamard"]} == {"down_proj"}
    r = run("inspect", out)
    assert "linear inputs int4 dynamic sym (14 linears); KV cache float" in r.stdout
    assert "Hadamard on 2 inputs" in r.stdout
    r = run("model", tiny_dir, "--method", "rtn", "--bits", "4", "--act-bits", "8", "--kv-bits", "4", *common,
            "--out", tmp_path / "r")  # fmt: skip
    assert r.returncode == 0, r.stderr
    act = json.loads((tmp_path / "r" / "config.json").read_text())["quantization_config"]["activations"]
    assert (act["bits"], act["kv_bits"]) == (8, 4)
    r = run(
        "model",
        tiny_dir,
        "--method",
        "gptq",
        "--bits",
        "3",
        "--transforms",
        "fpt",
        *common,
        *fpt,
        "--out",
        tmp_path / "g",
    )
    assert r.returncode == 0, r.stderr
    qc = json.loads((tmp_path / "g" / "config.json").read_text())["quantization_config"]
    assert [p["name"] for p in qc["passes"]] == ["fpt", "gptq"] and "input_ops" not in qc
    r = run("model", tiny_dir, "--act-bits", "3", *common, "--out", tmp_path / "bad")
    assert r.returncode != 0 and "activation bits" in r.stderr and not (tmp_path / "bad").exists()


@pytest.mark.parametrize("method", ["gptq", "d2quant", "fptquant"])
def test_allocation_composes_with_every_quantizer(tmp_path, tiny_dir, method):
    # rtn is covered above; each quantizer must honour the per-layer widths that allocate chose
    out = tmp_path / method
    fpt = ["--fpt-local-steps", "2"] if method == "fptquant" else []  # a flag for a pass not run is refused
    r = run("model", tiny_dir, "--method", method, "--bits", "2.5", "--allocation", "nsds", "--granularity", "layer",
            "--group-size", "32", "--nsamples", "4", "--seqlen", "64", *fpt, "--no-eval", "--out", out)  # fmt: skip
    assert r.returncode == 0, r.stderr
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    layer_bits: dict[str, set] = {}
    for name, m in qc["modules"].items():
        layer_bits.setdefault(name.split(".")[2], set()).add(m["bits"])
    assert sorted(layer_bits.values(), key=min) == [{2}, {3}]
    if method == "d2quant":
        assert {m["format"] for n, m in qc["modules"].items() if n.endswith("down_proj")} == {"dsq"}
    r = run("eval", out, "--max-windows", "1")
    assert r.returncode == 0, r.stderr


def test_fisher_allocation_and_a_split_engine_run_refused(tmp_path, tiny_dir):
    """--allocation fisher takes its gradients on calibration text (loaded even for rtn, which needs none), before
    the quantizer's engine run (a whole-model pass between two block passes is refused in a resumable run)."""
    js = tmp_path / "alloc.json"
    r = run("allocate", tiny_dir, "--bits", "2.5", "--allocation", "fisher", "--fisher-windows", "2",
            "--group-size", "32", "--png", tmp_path / "map.png", "--json", js)
    assert r.returncode == 0, r.stderr
    assert json.loads(js.read_text())["allocator"] == "fisher"
    for method in ("d2quant", "rtn"):
        out = tmp_path / method
        r = run("model", tiny_dir, "--method", method, "--bits", "2.5", "--allocation", "fisher", "--fisher-windows",
                "2", "--group-size", "32", "--nsamples", "4", "--seqlen", "64", "--no-eval", "--out", out)
        assert r.returncode == 0, r.stderr
        qc = json.loads((out / "config.json").read_text())["quantization_config"]
        names = [p["name"] for p in qc["passes"]]
        assert names == (["allocate", "rotate", "d2quant"] if method == "d2quant" else ["allocate", "rtn"])
        assert len({m["bits"] for m in qc["modules"].values()}) > 1 and qc["allocation"] == "fisher"
    recipe = tmp_path / "split.yaml"  # a recipe that splits the engine run is refused, not run half-way
    recipe.write_text("- name: rotate\n- name: allocate\n  config: {allocator: fisher, budget: 2.5}\n"
                      "- name: d2quant\n  config: {bits: 4, group_size: 32}\n")
    r = run("model", tiny_dir, "--recipe", recipe, "--nsamples", "4", "--seqlen", "64", "--no-eval",
            "--out", tmp_path / "split")
    assert r.returncode != 0 and "in one row" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "split").exists() and not (tmp_path / ".split.partial").exists()


def test_inspect_model_and_d2quant_degrades_without_its_rotation(tmp_path, tokenizer):
    """Gemma 2's post-norms cannot absorb a rotation: inspect-model says so, and d2quant (whose default
    includes the rotation) runs without it and records why; asking for --rotation is refused in one line."""
    from arch_matrix import family_model

    d = tmp_path / "gemma2"
    family_model("gemma2").save_pretrained(d)
    tokenizer.save_pretrained(d)
    r = run("inspect-model", d, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["block 0"]["writes residual"] == {
        "self_attn.o_proj": "through post_attention_layernorm",
        "mlp.down_proj": "through post_feedforward_layernorm",
    }
    assert info["passes"]["rotate"].startswith("post-norms sit between its writers and the residual stream")
    assert info["passes"]["gptq"] == "yes"
    quick = ["--bits", "3", "--group-size", "32", "--nsamples", "4", "--seqlen", "64", "--no-eval"]
    r = run("model", d, "--method", "d2quant", *quick, "--out", tmp_path / "q")
    assert r.returncode == 0, r.stderr
    assert "d2quant runs without its default rotation: in this model post-norms sit" in r.stdout
    report = json.loads((tmp_path / "q" / "quant_report.json").read_text())
    assert report["rotation_skipped"].startswith("post-norms sit")
    r = run("model", d, "--method", "d2quant", "--rotation", *quick, "--out", tmp_path / "q2")
    assert_one_line_error(r, "rotation cannot run on this gemma2 model: post-norms sit between its writers")
    assert not (tmp_path / "q2").exists()
    # an option of the rotation is refused with it, not dropped with it
    r = run("model", d, "--method", "d2quant", "--head-hadamard", *quick, "--out", tmp_path / "q3")
    assert_one_line_error(r, "--head-hadamard comes with the rotation, which this model cannot take: post-norms")
    assert not (tmp_path / "q3").exists()


def test_self_calibration_runs_and_a_streamed_model_is_refused(tmp_path, tiny_dir):
    """``--calib self``: the float model samples its calibration windows (progress shown, source reported); a
    streamed model has no resident weights to sample from, so it is refused in one line before anything is written."""
    out = tmp_path / "q"
    args = ("--method", "gptq", "--bits", "4", "--calib", "self", "--nsamples", "4", "--seqlen", "16", "--no-eval")
    r = run("model", tiny_dir, *args, "--out", out)
    assert r.returncode == 0, r.stderr
    assert "sampling calibration text" in r.stderr
    assert json.loads((out / "quant_report.json").read_text())["calibration"]["source"] == "self"
    r = run("model", tiny_dir, *args, "--stream", "--out", tmp_path / "s")
    assert_one_line_error(r, "must be resident")
    assert not (tmp_path / "s").exists()
