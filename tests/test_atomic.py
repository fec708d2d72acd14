"""Atomic writes under failure: an exception or a SIGKILL while overwriting a checkpoint, a GPTQ export,
a Hub staging folder, a ``moe align`` output or a JSON file leaves the old one intact (same bytes, same
logits) and no temporary siblings that outlive the next write; a live writer's folder is never touched."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

import quant.formats.atomic as atomic_mod
import quant.formats.checkpoint
import quant.formats.gptq_format as gptq_mod
import quant.formats.hub as hub_mod
from quant import QuantContext, QuantError, RTNConfig, load_quantized, run_pipeline, save_quantized
from quant.formats.atomic import atomic_dir, recover_output
from quant.formats.checkpoint import check_output_dir
from quant.formats.gptq_format import export_gptq, load_gptq
from quant.formats.hub import stage

ROOT = Path(__file__).resolve().parents[1]
IDS = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(0))


def _quantized(tokenizer, seed):
    m = tiny_model(seed=seed)
    ctx = QuantContext(m, tokenizer, progress=False)
    run_pipeline(ctx, [("rtn", RTNConfig(bits=4, group_size=32, sym=True))])
    return m, {"method": "rtn", "modules": ctx.modules}


def _save(tokenizer, out, seed, **kw):
    m, qc = _quantized(tokenizer, seed)
    return save_quantized(m, tokenizer, out, qc, **kw)


def _logits(loader, path):
    model, _ = loader(path)
    with torch.no_grad():
        return model(IDS).logits


def _snapshot(d: Path) -> dict[str, str]:
    return {str(f.relative_to(d)): hashlib.sha256(f.read_bytes()).hexdigest() for f in d.rglob("*") if f.is_file()}


def _siblings(out: Path) -> list[str]:
    """Temporary or backup folders of ``out`` next to it."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _partial_then(exc):
    """A stand-in for safetensors' ``save_file`` that writes half a file, then raises ``exc``."""

    def save_file(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 1000)
        raise exc

    return save_file


# ---- a child process that starts an overwrite, blocks mid-write and is killed with SIGKILL ----

CHILD = r"""
import os, sys, time
from pathlib import Path

mode, marker, src, out = sys.argv[1:5]


def block(*_):
    Path(marker).write_text("mid-write")
    time.sleep(600)


def after(real):
    def hooked(*a, **k):
        real(*a, **k)
        block()
    return hooked


if mode == "save":
    import quant.formats.checkpoint as m
    m.save_file = after(m.save_file)
    model, tok = m.load_quantized(src)
    m.save_quantized(model, tok, out, model.lowbit_config, overwrite=True)
elif mode == "gptq":
    import quant.formats.gptq_format as m
    m.save_file = after(m.save_file)
    m.export_gptq(src, out, overwrite=True)
elif mode == "stage":
    import quant.formats.hub as m
    m._link_or_copy = after(m._link_or_copy)
    m.stage(src, out, "me/tiny", overwrite=True)
elif mode == "renames":  # the fallback swap, killed between its two renames
    import quant.formats.atomic as m
    m._exchange = lambda a, b: False
    rename = os.rename
    os.rename = lambda a, b: (block() if Path(b) == Path(out).absolute() else None, rename(a, b))
    with m.atomic_dir(Path(out)) as tmp:
        (tmp / "new.txt").write_text("B")
sys.exit(3)
"""


def _kill_mid_write(tmp_path, mode, src, out) -> int:
    """Run the overwrite ``mode`` of ``src`` onto ``out`` in a child, SIGKILL it mid-write; returns its pid."""
    marker, err = tmp_path / f"{mode}.marker", tmp_path / f"{mode}.stderr"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with open(err, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, mode, str(marker), str(src), str(out)], cwd=ROOT, env=env, stderr=f
        )
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert proc.poll() is None, f"child exited before the kill: {err.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "child never reached the write"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()  # reaped: its pid no longer runs
    assert proc.returncode == -signal.SIGKILL
    return proc.pid


# ---- save_quantized ----


@pytest.fixture
def ck_a(tmp_path, tokenizer):
    out = _save(tokenizer, tmp_path / "q", seed=0)
    return out, _snapshot(out), _logits(load_quantized, out)


def _assert_old(out, snap, logits, loader=load_quantized):
    assert _snapshot(out) == snap
    assert torch.equal(_logits(loader, out), logits)


@pytest.mark.parametrize("where", ["weights", "tokenizer"])
def test_save_error_mid_write_keeps_old_checkpoint(ck_a, tokenizer, monkeypatch, where):
    out, snap, logits = ck_a
    if where == "weights":
        enospc = _partial_then(OSError(errno.ENOSPC, "No space left"))
        monkeypatch.setattr(quant.formats.checkpoint, "save_file", enospc)
    else:  # Ctrl-C while the tokenizer is written, after the weights

        def interrupted(d, *a, **k):
            (Path(d) / "tokenizer.json").write_text("{")
            raise KeyboardInterrupt

        monkeypatch.setattr(tokenizer, "save_pretrained", interrupted)
    with pytest.raises((OSError, KeyboardInterrupt)):
        _save(tokenizer, out, seed=1, overwrite=True)
    _assert_old(out, snap, logits)
    assert _siblings(out) == []


def test_save_killed_mid_write_keeps_old_checkpoint(tmp_path, ck_a, tokenizer):
    out, snap, logits = ck_a
    b = _save(tokenizer, tmp_path / "b", seed=1)
    pid = _kill_mid_write(tmp_path, "save", b, out)
    _assert_old(out, snap, logits)
    (left,) = _siblings(out)  # the killed writer's folder, half written
    assert left.startswith(f".q.tmp-{pid}-") and (out.parent / left / "model.safetensors").is_file()
    _save(tokenizer, out, seed=1, overwrite=True)
    assert _siblings(out) == []  # the next write removed the dead writer's leftovers
    assert torch.equal(_logits(load_quantized, out), _logits(load_quantized, b))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux only")
def test_overwrite_swaps_in_one_step(ck_a, tokenizer, monkeypatch):
    """On Linux the old folder is exchanged for the new one atomically: ``out`` is never renamed away."""
    out, _, _ = ck_a
    calls = []
    rename = os.rename
    monkeypatch.setattr(os, "rename", lambda a, b: (calls.append((Path(a), Path(b))), rename(a, b))[1])
    _save(tokenizer, out, seed=1, overwrite=True)
    assert not [c for c in calls if out in c], calls
    assert _siblings(out) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux only")
def test_exchange_swaps_two_folders(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "y").write_text("b")
    assert atomic_mod._exchange(a, b)
    assert [p.name for p in a.iterdir()] == ["y"] and [p.name for p in b.iterdir()] == ["x"]


# ---- the fallback swap (two renames) where the exchange is unavailable ----


def _einval_renameat2(monkeypatch):
    """A C library whose renameat2 fails with EINVAL, as on a filesystem without RENAME_EXCHANGE."""

    def renameat2(*_):
        ctypes.set_errno(errno.EINVAL)
        return -1

    lib = type("Lib", (), {"renameat2": staticmethod(renameat2)})
    monkeypatch.setattr(atomic_mod.ctypes, "CDLL", lambda *a, **k: lib())


def test_fallback_overwrite_when_exchange_unsupported(ck_a, tokenizer, monkeypatch):
    out, _, _ = ck_a
    _einval_renameat2(monkeypatch)
    m, qc = _quantized(tokenizer, 1)
    save_quantized(m, tokenizer, out, qc, overwrite=True)
    assert _siblings(out) == []
    with torch.no_grad():
        assert torch.equal(_logits(load_quantized, out), m(IDS).logits)


def test_fallback_error_between_renames_keeps_old(ck_a, tokenizer, monkeypatch):
    out, snap, logits = ck_a
    monkeypatch.setattr(atomic_mod, "_exchange", lambda a, b: False)
    rename = os.rename

    def failing(a, b):
        if Path(b) == out and ".tmp-" in Path(a).name:  # the second rename: new folder into place
            raise KeyboardInterrupt
        rename(a, b)

    monkeypatch.setattr(os, "rename", failing)
    with pytest.raises(KeyboardInterrupt):
        _save(tokenizer, out, seed=1, overwrite=True)
    monkeypatch.undo()
    _assert_old(out, snap, logits)
    assert _siblings(out) == []


def test_fallback_killed_between_renames_recovers_old(tmp_path, ck_a, tokenizer):
    out, snap, logits = ck_a
    pid = _kill_mid_write(tmp_path, "renames", out, out)
    assert not out.exists()  # the window the fallback cannot close: old folder moved away, new not yet in
    assert any(n.startswith(f".q.old-{pid}-") for n in _siblings(out))
    with pytest.raises(QuantError, match="already exists"):  # recovered first: it exists, as before the run
        check_output_dir(out, overwrite=False)
    _assert_old(out, snap, logits)
    assert _siblings(out) == []
    _save(tokenizer, out, seed=1, overwrite=True)
    assert _siblings(out) == []


def test_failed_restore_never_deletes_the_old_folder(tmp_path, monkeypatch):
    out = tmp_path / "q"
    old = tmp_path / f".q.old-{_dead_pid()}-0123abcd"
    old.mkdir()
    (old / "weights").write_text("A")
    monkeypatch.setattr(os, "rename", lambda a, b: (_ for _ in ()).throw(PermissionError(errno.EACCES, "denied")))
    recover_output(out)
    monkeypatch.undo()
    assert (old / "weights").read_text() == "A" and not out.exists()
    recover_output(out)
    assert (out / "weights").read_text() == "A" and _siblings(out) == []


# ---- leftovers: dead writers' are removed, live writers' kept ----


def test_live_writer_folder_kept_dead_leftovers_removed(tmp_path):
    out = tmp_path / "q"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    dead = _dead_pid()
    try:
        mine = [f".q.tmp-{live.pid}-0123abcd", f".q.old-{live.pid}-89abcdef"]
        gone = [f".q.tmp-{dead}-deadbeef", f".q.old-{dead}-feedface"]
        others = [f".qq.tmp-{dead}-deadbeef", f".q.tmp-{dead}-nothex00", ".q.tmp-0123abcd"]
        for n in mine + gone + others:
            (tmp_path / n).mkdir()
            (tmp_path / n / "part").write_text("x")
        (tmp_path / f".q.tmp-{dead}-00000000").write_text("a dead JSON writer's file")
        with atomic_dir(out) as tmp:
            assert tmp.name.startswith(f".q.tmp-{os.getpid()}-")
            (tmp / "new").write_text("B")
        assert (out / "new").read_text() == "B"
        assert _siblings(out) == sorted(mine + [others[1], others[2]])  # the live writer's folders are untouched
        assert all((tmp_path / n / "part").read_text() == "x" for n in mine + others)
    finally:
        live.kill()
        live.wait()
    with atomic_dir(out) as tmp:  # that writer is gone now: its folders go with the next write
        (tmp / "new").write_text("C")
    assert _siblings(out) == sorted(others[1:]) and (out / "new").read_text() == "C"


def test_live_writers_old_folder_not_restored(tmp_path):
    """Between a live writer's two renames ``out`` is missing; another writer must not take its old folder."""
    out = tmp_path / "q"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        old = tmp_path / f".q.old-{live.pid}-0123abcd"
        old.mkdir()
        (old / "w").write_text("A")
        check_output_dir(out, overwrite=False)  # nothing restored: no "already exists"
        assert not out.exists() and (old / "w").read_text() == "A"
    finally:
        live.kill()
        live.wait()


def test_non_folder_output_refused(tmp_path):
    out = tmp_path / "q"
    out.write_text("not a checkpoint")
    for overwrite in (False, True):
        with pytest.raises(QuantError, match="already exists|not a folder"):
            check_output_dir(out, overwrite)
    with pytest.raises(QuantError, match="not a folder"):
        with atomic_dir(out) as tmp:
            (tmp / "x").write_text("B")
    assert out.read_text() == "not a checkpoint" and _siblings(out) == []
    assert check_output_dir("rel/missing", overwrite=False) == Path("rel/missing")  # returned as given


# ---- GPTQ export and Hub staging ----


@pytest.fixture
def two_checkpoints(tmp_path, tokenizer):
    return _save(tokenizer, tmp_path / "a", seed=0), _save(tokenizer, tmp_path / "b", seed=1)


def test_gptq_export_error_and_kill_keep_old_export(tmp_path, two_checkpoints, monkeypatch):
    a, b = two_checkpoints
    out = export_gptq(a, tmp_path / "g")
    snap, logits = _snapshot(out), _logits(load_gptq, out)
    with monkeypatch.context() as mp:
        mp.setattr(gptq_mod, "save_file", _partial_then(RuntimeError("disk went away")))
        with pytest.raises(RuntimeError):
            export_gptq(b, out, overwrite=True)
    _assert_old(out, snap, logits, load_gptq)
    assert _siblings(out) == []
    pid = _kill_mid_write(tmp_path, "gptq", b, out)
    _assert_old(out, snap, logits, load_gptq)
    assert [n.split("-")[1] for n in _siblings(out)] == [str(pid)]
    export_gptq(b, out, overwrite=True)
    assert _siblings(out) == []
    assert not torch.equal(_logits(load_gptq, out), logits)


def test_stage_error_and_kill_keep_old_staging(tmp_path, two_checkpoints, monkeypatch):
    a, b = two_checkpoints
    out = tmp_path / "staged"
    names = stage(a, out, "me/tiny")
    snap = _snapshot(out)
    assert sorted(snap) == names
    real = hub_mod._link_or_copy
    done = []

    def second_fails(src, dst):
        if done:
            raise OSError(errno.EIO, "I/O error")
        done.append(real(src, dst))

    with monkeypatch.context() as mp:
        mp.setattr(hub_mod, "_link_or_copy", second_fails)
        with pytest.raises(OSError):
            stage(b, out, "me/tiny", overwrite=True)
    assert done and _snapshot(out) == snap and _siblings(out) == []
    _kill_mid_write(tmp_path, "stage", b, out)
    assert _snapshot(out) == snap and len(_siblings(out)) == 1
    stage(b, out, "me/tiny", overwrite=True)
    assert _siblings(out) == [] and _snapshot(out) != snap


# ---- cli: moe align output and the JSON writer ----


def test_moe_align_error_keeps_old_output(tmp_path, tokenizer, monkeypatch):
    import transformers
    from test_moe import tiny_moe

    import cli

    src = tmp_path / "moe"
    tiny_moe("mixtral").save_pretrained(src)
    tokenizer.save_pretrained(src)
    out = tmp_path / "aligned"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"old weights")
    snap = _snapshot(out)
    monkeypatch.setattr(cli, "_routing_sample", lambda tok: IDS.repeat(2, 1))

    def interrupted(self, d, *a, **k):
        (Path(d) / "tokenizer.json").write_text("{")
        raise KeyboardInterrupt

    kw = dict(finetune_steps=0, lr=1e-3, power_steps=1, calib="c4", nsamples=2, seqlen=32, json_out=None)
    with monkeypatch.context() as mp:
        mp.setattr(transformers.PreTrainedTokenizerBase, "save_pretrained", interrupted)
        with pytest.raises(KeyboardInterrupt):
            cli.moe_align_cmd(str(src), out=out, overwrite=True, trust_remote_code=False, **kw)
    assert _snapshot(out) == snap and _siblings(out) == []
    with pytest.raises(QuantError, match="already exists"):
        cli.moe_align_cmd(str(src), out=out, overwrite=False, trust_remote_code=False, **kw)


def test_json_writer_error_and_dead_leftovers(tmp_path):
    from cli import _write_json_atomic

    path = tmp_path / "r.json"
    _write_json_atomic(path, {"a": 1})
    before = path.read_bytes()
    with pytest.raises(TypeError):
        _write_json_atomic(path, {"a": 2, "b": object()})  # fails half-way through the text
    assert path.read_bytes() == before and _siblings(path) == []
    dead = tmp_path / f".r.json.tmp-{_dead_pid()}-0123abcd"
    dead.write_text('{"a": ')  # what a writer killed mid-write leaves
    _write_json_atomic(path, {"a": 3})
    assert json.loads(path.read_text()) == {"a": 3} and _siblings(path) == []
