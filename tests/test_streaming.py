"""The block engine on a model read from disk block by block, resumed after SIGKILL, and run data-parallel
under torchrun: each must write the checkpoint an uninterrupted, resident, one-process run writes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

ROOT = Path(__file__).resolve().parents[1]
QUICK = ("--no-eval", "--nsamples", "4", "--seqlen", "64", "--group-size", "32", "--device", "cpu")


def quantize(*args, env: dict | None = None, timeout: int = 600, launcher: tuple = (),
             command: str = "model") -> subprocess.CompletedProcess:
    e = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), **(env or {})}
    cmd = [sys.executable, *launcher, str(ROOT / "tests" / "run_cli.py"), command, *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=e)


def weights(folder: Path) -> dict[str, str]:
    """sha256 of every weight file, and the quantization_config (what the checkpoint computes with)."""
    out = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.glob("*.safetensors"))}
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    out["quantization_config"] = json.dumps(qc, sort_keys=True)
    return out


def float_dir(tmp_path: Path, tokenizer, family: str, **kw) -> Path:
    d = tmp_path / f"float-{family}"
    tiny_model(family, num_hidden_layers=3, **kw).save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


def ok(r: subprocess.CompletedProcess) -> None:
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize(
    "family,method",
    [("llama", "gptq"), ("llama", "d2quant"), ("gemma", "d2quant"), ("gpt_neox", "gptq"), ("gpt2", "rtn")],
)
def test_streamed_run_writes_the_resident_checkpoint(tmp_path, tokenizer, family, method):
    src = float_dir(tmp_path, tokenizer, family)
    bits = ("--bits", "3") if method == "d2quant" else ()
    ok(quantize(src, "--method", method, *bits, *QUICK, "--no-stream", "--out", tmp_path / "resident"))
    r = quantize(src, "--method", method, *bits, *QUICK, "--stream", "--out", tmp_path / "streamed")
    ok(r)
    assert weights(tmp_path / "streamed") == weights(tmp_path / "resident")
    assert not (tmp_path / ".streamed.partial").exists()  # the work folder goes once the checkpoint is in place


# Evaluation streamed block by block must give the resident model's window NLLs. gemma2's logit soft-capping is
# made tight (0.5) so a tail that skipped the model's own head code would show; gpt2 has learned positions.
@pytest.mark.parametrize("family,kw", [("llama", {}), ("gemma2", {"final_logit_softcapping": 0.5}), ("gpt2", {})])
def test_streamed_perplexity_is_the_resident_one(tmp_path, tokenizer, family, kw):
    from quant.engine.streaming import DiskSource
    from quant.formats.models import load_model
    from quant.runtime.perplexity import perplexity

    d = float_dir(tmp_path, tokenizer, family, **kw)
    ids = torch.randint(0, 49152, (5 * 64 + 7,), generator=torch.Generator().manual_seed(0))
    resident = perplexity(load_model(str(d)).model, ids, seqlen=64, progress=False)
    streamed = perplexity(None, ids, seqlen=64, progress=False, source=DiskSource(d), window_batch=2)  # 3 passes
    assert streamed["windows"] == resident["windows"] == 5 and streamed["streamed"]
    assert streamed["window_nll"] == pytest.approx(resident["window_nll"], rel=1e-5, abs=1e-5)


def test_eval_streams_a_quantized_checkpoint(tmp_path, tokenizer):
    """`quantize eval --stream` on one of our checkpoints (rotation, DSQ sign planes, DAC norm biases: d2quant)
    gives the perplexity of the checkpoint loaded whole."""
    src = float_dir(tmp_path, tokenizer, "llama")
    ckpt = tmp_path / "d2q"
    ok(quantize(src, "--method", "d2quant", "--bits", "3", *QUICK, "--out", ckpt))
    res = {}
    for mode in ("--stream", "--no-stream"):
        r = quantize(ckpt, mode, "--max-windows", "3", "--seqlen", "64", "--window-batch", "2", "--json",
                     tmp_path / f"{mode}.json", command="eval")
        ok(r)
        res[mode] = json.loads((tmp_path / f"{mode}.json").read_text())
    assert res["--stream"]["streamed"] and res["--stream"]["quantized"] and "streamed" not in res["--no-stream"]
    assert res["--stream"]["window_nll"] == pytest.approx(res["--no-stream"]["window_nll"], rel=1e-5)


def test_activation_store_maps_files_it_unlinks(tmp_path):
    from quant.engine.blockwise import ActivationStore

    store = ActivationStore(tmp_path / "act")
    t = store.empty((3, 5, 7), torch.float32, torch.device("cpu"))
    t.copy_(torch.arange(105.0).view(3, 5, 7))
    assert t.untyped_storage().filename is not None  # backed by a file mapping, not anonymous memory
    assert not any((tmp_path / "act").iterdir())  # unlinked at once: nothing is left behind after a kill
    assert torch.equal(t, torch.arange(105.0).view(3, 5, 7))


def test_offloaded_activations_change_no_number(tmp_path, tokenizer, calib, monkeypatch):
    """With an activation store in files, the streams and stage inputs go there (every allocation the engine
    makes for them) and the quantized model is the same to the bit, in process and through the CLI."""
    from quant import QuantContext, run_pipeline
    from quant.engine.blockwise import ActivationStore
    from quant.methods.d2quant import D2QuantConfig

    made: list[tuple[int, tuple, bool]] = []  # (run, shape, in a file)
    empty = ActivationStore.empty

    def spy(self, shape, dtype, device):
        t = empty(self, shape, dtype, device)
        made.append((len(models), tuple(shape), t.untyped_storage().filename is not None))
        return t

    monkeypatch.setattr(ActivationStore, "empty", spy)
    step = ("d2quant", D2QuantConfig(bits=3, group_size=32))  # GPTAQ's float stream, DSQ and DAC too
    models = []
    for store in (None, ActivationStore(tmp_path / "act")):
        model = tiny_model()
        run_pipeline(QuantContext(model, tokenizer, calib_ids=calib, progress=False, activations=store), [step])
        models.append(model.state_dict())
    windows = tuple(calib.shape)
    calibration = [(run, f) for run, shape, f in made if shape[:2] == windows]  # not structure discovery's probe
    assert {f for run, f in calibration if run == 0} == {False} and {f for run, f in calibration if run == 1} == {True}
    assert models[0].keys() == models[1].keys()
    assert all(torch.equal(models[0][k], models[1][k]) for k in models[0])
    src = float_dir(tmp_path, tokenizer, "llama")
    ok(quantize(src, "--method", "gptq", *QUICK, "--no-stream", "--out", tmp_path / "memory"))
    ok(quantize(src, "--method", "gptq", *QUICK, "--stream", "--offload-activations", "--out", tmp_path / "disk"))
    assert weights(tmp_path / "disk") == weights(tmp_path / "memory")


# A kill after block 1's tensors (before its stream and record), after its stream, after block 2's record,
# and half-way through writing block 0's tensor file.
FAILPOINTS = ["after-part:1", "after-stream:1", "after-record:2", "mid-part:0"]


@pytest.mark.parametrize("stream", ["--stream", "--no-stream"])
def test_resume_after_sigkill_writes_the_uninterrupted_checkpoint(tmp_path, tokenizer, stream):
    src = float_dir(tmp_path, tokenizer, "llama")
    args = (src, "--method", "d2quant", "--bits", "3", *QUICK, stream)
    ok(quantize(*args, "--out", tmp_path / "clean"))
    want = weights(tmp_path / "clean")
    for point in FAILPOINTS:
        out = tmp_path / f"killed-{point.replace(':', '-')}"
        r = quantize(*args, "--out", out, env={"LOWBIT_FAILPOINT": point})
        assert r.returncode == -9, (point, r.returncode, r.stderr[-2000:])  # SIGKILL: nothing ran after it
        assert not out.exists() and (tmp_path / f".{out.name}.partial" / "fingerprint.json").exists()
        r = quantize(*args, "--out", out)
        ok(r)
        assert weights(out) == want, point


@pytest.mark.parametrize("stream", ["--stream", "--no-stream"])
def test_resumed_run_keeps_the_online_down_hadamard_of_finished_blocks(tmp_path, tokenizer, stream):
    """The Hadamard before down_proj is attached block by block and lives in no tensor: a resumed run gets it back
    for the blocks the killed run finished (the block record lists it)."""
    src = float_dir(tmp_path, tokenizer, "llama")
    args = (src, "--method", "d2quant", "--bits", "3", "--no-dsq", "--down-hadamard", *QUICK, stream)
    ok(quantize(*args, "--out", tmp_path / "clean"))
    want = weights(tmp_path / "clean")
    assert len(json.loads(want["quantization_config"])["input_ops"]) == 3  # every block's down_proj
    out = tmp_path / "killed"
    assert quantize(*args, "--out", out, env={"LOWBIT_FAILPOINT": "after-record:1"}).returncode == -9
    ok(quantize(*args, "--out", out))
    assert weights(out) == want


def test_bf16_end_to_end_distillation_trains_the_blocks_in_the_compute_dtype(tmp_path, tokenizer):
    """The end-to-end pass loads every block (on the GPU: onto it; here: into bf16) and hands them back in the model's
    dtype: it runs, and the checkpoint holds float32 beside the packed tensors."""
    from safetensors import safe_open

    src = float_dir(tmp_path, tokenizer, "llama")
    ok(quantize(src, "--method", "gptq", "--bits", "3", *QUICK, "--dtype", "bfloat16", "--finetune", "e2e",
                "--finetune-e2e-steps", "3", "--out", tmp_path / "q"))
    report = json.loads((tmp_path / "q" / "quant_report.json").read_text())
    assert next(p for p in report["passes"] if p["name"] == "finetune")["summary"]["e2e"]["train"]
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:
        floats = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert {d for d in floats.values() if d in ("F32", "BF16")} == {"F32"}


def test_resumed_bf16_run_writes_the_uninterrupted_checkpoint(tmp_path, tokenizer):
    """Finished blocks are saved in the compute dtype; a resumed resident run puts them back in the model's own."""
    src = float_dir(tmp_path, tokenizer, "llama")
    args = (src, "--method", "d2quant", "--bits", "3", *QUICK, "--no-stream", "--dtype", "bfloat16")
    ok(quantize(*args, "--out", tmp_path / "clean"))
    out = tmp_path / "killed"
    assert quantize(*args, "--out", out, env={"LOWBIT_FAILPOINT": "after-record:1"}).returncode == -9
    ok(quantize(*args, "--out", out))
    assert weights(out) == weights(tmp_path / "clean")


def test_resume_refuses_a_different_run_and_restart_discards_it(tmp_path, tokenizer):
    src = float_dir(tmp_path, tokenizer, "llama")
    out = tmp_path / "q"
    args = (src, "--method", "gptq", *QUICK, "--stream", "--out", out)
    assert quantize(*args, env={"LOWBIT_FAILPOINT": "after-record:0"}).returncode == -9
    for change, field in ((("--seed", "1"), "calibration"), (("--bits", "3"), "recipe")):
        r = quantize(*args, *change)
        assert r.returncode != 0 and "Traceback" not in r.stderr
        err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert len(err) == 1 and field in err[0] and "--restart" in err[0], r.stderr
    ok(quantize(*args, "--bits", "3", "--restart"))
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == 3


def test_torchrun_two_ranks_write_the_one_process_checkpoint(tmp_path, tokenizer):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build")
    src = float_dir(tmp_path, tokenizer, "llama")
    args = (src, "--method", "d2quant", "--bits", "3", *QUICK, "--nsamples", "6")
    ok(quantize(*args, "--out", tmp_path / "one"))
    launcher = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")
    r = quantize(*args, "--out", tmp_path / "two", launcher=launcher, env={"OMP_NUM_THREADS": "1"})
    ok(r)
    # moments are summed window by window in float64 and rounded once: the split across ranks does not show
    assert weights(tmp_path / "two") == weights(tmp_path / "one")


MEASURE = r"""
import json, resource, sys, torch
from pathlib import Path
from quant import QuantContext, run_pipeline, save_quantized
from quant.methods.quantizers import RTNConfig
from quant.engine.resume import WorkDir
from quant.engine.streaming import DiskSource
from transformers import AutoModelForCausalLM

def rss(field):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field))

src, mode = Path(sys.argv[1]), sys.argv[2]
if mode == "stream":
    source = DiskSource(src)
    model = source.skeleton()
else:
    source, model = None, None
Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current size
base = rss("VmRSS:")
if model is None:
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
ctx = QuantContext(model, None, progress=False, source=source, work=WorkDir(src.parent / f"work-{mode}", {"m": mode}))
run_pipeline(ctx, [("rtn", RTNConfig(bits=4, group_size=128))])
print(json.dumps({"base": base, "peak": rss("VmHWM:")}))
"""


def test_streaming_memory_follows_one_block_not_the_model(tmp_path, tokenizer):
    """A wide model (12 blocks of 61 MB in fp32): streaming RTN grows the process by a few blocks' worth at most
    (the block read, the quantizer's temporaries, the packed copy written; measured 2.7), whatever the depth;
    loading it whole grows it by the whole model."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to measure peak memory")
    cfg = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_key_value_heads=4, head_dim=64,
               vocab_size=2048, tie_word_embeddings=False)
    d = tmp_path / "wide"
    tiny_model("llama", num_hidden_layers=12, **cfg).save_pretrained(d)
    block = (4 * 1024 * 1024 * 0.625 + 3 * 1024 * 4096) * 4  # q, o (1024²), k, v (256 x 1024), gate, up, down
    model_bytes = 12 * block + 2 * 2048 * 1024 * 4
    (tmp_path / "measure.py").write_text(MEASURE)
    grown = {}
    for mode in ("stream", "resident"):
        r = subprocess.run([sys.executable, str(tmp_path / "measure.py"), str(d), mode], capture_output=True, text=True,
                           cwd=ROOT, timeout=600)  # fmt: skip
        ok(r)
        m = json.loads(r.stdout.strip().splitlines()[-1])
        grown[mode] = m["peak"] - m["base"]
    assert grown["stream"] < 4 * block < model_bytes / 3, (grown, block)
    assert grown["resident"] > model_bytes * 0.9, (grown, model_bytes)


# The GPU default computes blocks in bf16 (--dtype auto). The calibration stream and the blocks' recorded arguments
# (rotary tables, masks) must follow the blocks' dtype (a float32 stream into bf16 linears failed in d2quant's staged
# forward on the first GPU run), and the checkpoint keeps the model's own dtype: the compute dtype only computes.
@pytest.mark.parametrize("method", ["gptq", "d2quant"])
def test_bf16_compute_keeps_the_model_dtype_and_its_quality(tmp_path, tokenizer, method):
    from safetensors import safe_open

    from quant.formats.models import load_model

    src = float_dir(tmp_path, tokenizer, "llama")
    for dtype in ("bfloat16", "float32"):
        ok(quantize(src, "--method", method, "--bits", "3", *QUICK, "--dtype", dtype, "--out", tmp_path / dtype))
    with safe_open(tmp_path / "bfloat16" / "model.safetensors", "pt") as f:
        stored = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    floats = {k: d for k, d in stored.items() if d in ("F32", "BF16")}
    assert floats and set(floats.values()) == {"F32"}, {k: d for k, d in floats.items() if d != "F32"}
    ids = torch.randint(0, 49152, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = load_model(str(src)).model(ids).logits
        err = {d: (load_model(str(tmp_path / d)).model(ids).logits - ref).norm() / ref.norm()
               for d in ("bfloat16", "float32")}
    assert err["bfloat16"] < 1.5 * err["float32"], err
