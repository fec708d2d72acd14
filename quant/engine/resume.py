"""The work folder of a run: what each finished block left, so a killed run continues where it stopped.

``.{out}.partial/`` beside the output folder holds::

    fingerprint.json              model, calibration data and recipe of the run (a different run is refused)
    outer-inputs.safetensors      embeddings as the run left them (streaming runs)
    block-00007.safetensors       block 7's tensors, packed linears included
    stream-00008[.rankR].safetensors   the calibration stream(s) entering block 8, as they were computed
    block-00007.json              block 7's record (its linears' formats, DAC norms, step notes): written last
    outer-outputs.safetensors     final norm and lm_head (streaming runs)

Every file is written to a temporary name, flushed and renamed, and a block counts as finished only once its
record exists, so a kill at any moment (SIGKILL, power loss) loses at most the block in progress. The inputs of
the next block are read back rather than recomputed: a restarted run sees exactly what an uninterrupted one
would have, and writes the same checkpoint bytes. The folder is removed once the checkpoint is in place.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from quant.engine import distributed as dist
from quant.errors import QuantError


def work_dir_for(out: Path) -> Path:
    out = Path(out).absolute()
    return out.with_name(f".{out.name}.partial")


def failpoint(name: str) -> None:
    """Fault injection for the resume tests: ``LOWBIT_FAILPOINT=after-part:3`` SIGKILLs the process at that
    point of block 3 (``after-part``, ``after-stream``, ``after-record``, ``mid-part``: half-way through
    writing the block's tensor file)."""
    if os.environ.get("LOWBIT_FAILPOINT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _write_atomic(path: Path, write, point: str | None = None) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    if point is not None and os.environ.get("LOWBIT_FAILPOINT") == point:
        with open(tmp, "r+b") as f:  # a write cut short: half the file on disk, never renamed
            f.truncate(tmp.stat().st_size // 2)
        failpoint(point)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], point: str | None = None) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    _write_atomic(path, lambda p: save_file(state, str(p), metadata={"format": "pt"}), point)


def _save_json(path: Path, obj: dict) -> None:
    _write_atomic(path, lambda p: p.write_text(json.dumps(obj, indent=1, sort_keys=True)))


def fingerprint(**parts) -> dict:
    """``{part: sha256}`` of JSON-able descriptions and tensors (the calibration token ids)."""
    out = {}
    for k, v in parts.items():
        h = hashlib.sha256()
        if isinstance(v, torch.Tensor):
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
            h.update(str((v.dtype, tuple(v.shape))).encode())
        else:
            h.update(json.dumps(v, sort_keys=True, default=str).encode())
        out[k] = h.hexdigest()
    return out


def model_fingerprint(path: Path) -> dict:
    """A float model folder by its config and its weight files' names, sizes and headers (not its bytes:
    hashing 16 GB would cost minutes)."""
    files = sorted(p for p in Path(path).glob("*.safetensors"))
    parts = [(Path(path) / "config.json").read_text()]
    for f in files:
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            parts.append((f.name, f.stat().st_size, fh.read(min(n, 1 << 26)).decode("utf-8", "replace")))
    return {"folder": str(Path(path).absolute()), "files": parts}


class WorkDir:
    def __init__(self, path: Path, fp: dict, resume: bool = True) -> None:
        self.path = Path(path)
        self.rank0 = dist.rank() == 0
        fp_file = self.path / "fingerprint.json"
        if self.path.exists() and not resume and self.rank0:
            shutil.rmtree(self.path)
        dist.barrier()
        if fp_file.exists():
            old = json.loads(fp_file.read_text())
            differ = [k for k in sorted(set(old) | set(fp)) if old.get(k) != fp.get(k)]
            if differ:
                raise QuantError(
                    f"{self.path} holds an unfinished run with a different {', '.join(differ)}; run the same command "
                    "to resume it, or pass --restart to discard it"
                )
        elif self.rank0:
            self.path.mkdir(parents=True, exist_ok=True)
            _save_json(fp_file, fp)
        dist.barrier()
        self._where: dict[str, Path] | None = None

    # -- progress -----------------------------------------------------------------------------------------
    def finished(self) -> int:
        """How many blocks, from block 0 on, have their record."""
        n = 0
        while (self.path / f"block-{n:05d}.json").exists():
            n += 1
        return n

    def _stream_file(self, i: int) -> Path:
        r = dist.rank() if dist.world() > 1 else None
        return self.path / (f"stream-{i:05d}" + (f".rank{r}" if r is not None else "") + ".safetensors")

    def restore(self, done: int, device: torch.device) -> tuple[dict, dict]:
        """The notes of the ``done`` finished blocks and the streams entering block ``done``."""
        notes = {i: json.loads((self.path / f"block-{i:05d}.json").read_text())["notes"] for i in range(done)}
        f = self._stream_file(done)
        streams = {}
        if f.exists():
            with safe_open(str(f), framework="pt", device="cpu") as fh:
                streams = {k: fh.get_tensor(k).to(device) for k in fh.keys()}
        return notes, streams

    def record(self, i: int) -> dict:
        return json.loads((self.path / f"block-{i:05d}.json").read_text())

    def reinstall(self, ctx, structure, blocks: range, streaming: bool) -> None:
        """Put finished blocks back into the model: packed linears and DAC norm biases as recorded (on the
        meta device for a streamed model, whose tensors stay in this folder until the checkpoint is written;
        a resident model gets every tensor from the block's file)."""
        from quant.formats.checkpoint import empty_packed
        from quant.runtime.dac import add_norm_bias
        from quant.runtime.inputops import input_ops

        model = ctx.model
        for i in blocks:
            rec = self.record(i)
            block = structure.blocks(model)[i]
            device = "meta" if streaming else next(block.parameters()).device
            with torch.device(device):
                for name, spec in rec["modules"].items():
                    lin = model.get_submodule(name)
                    parent, _, child = name.rpartition(".")
                    setattr(model.get_submodule(parent), child, empty_packed(lin, spec, lin.weight.dtype))
                    ctx.modules[name] = spec
                for name in rec["norm_biases"]:
                    norm = model.get_submodule(name)
                    add_norm_bias(norm, torch.zeros_like(norm.weight))
                    ctx.norm_biases.append(name)
                for name, width in rec.get("hadamards", {}).items():
                    input_ops(model.get_submodule(name)).hadamard = width
            if not streaming:
                prefix = f"{structure.layers}.{i}."
                with safe_open(str(self.path / f"block-{i:05d}.safetensors"), framework="pt", device="cpu") as fh:
                    state = {k[len(prefix):]: fh.get_tensor(k) for k in fh.keys()}
                # saved in the compute dtype (bf16 on a GPU): back to the model's own dtypes, as release_block does
                cur = block.state_dict()
                state = {k: v.to(cur[k].dtype) if v.is_floating_point() and k in cur else v for k, v in state.items()}
                block.load_state_dict(state, strict=True, assign=True)

    # -- writing ------------------------------------------------------------------------------------------
    def finish_block(self, ctx, structure, i: int, block: nn.Module, run) -> None:
        from quant.runtime.inputops import ops_modules

        prefix = f"{structure.layers}.{i}."
        streams = {k: v for k, v in (("x", run.x), ("xf", run.xf)) if v is not None}
        if self.rank0:
            state = {prefix + k: v for k, v in block.state_dict().items()}
            _save_tensors(self.path / f"block-{i:05d}.safetensors", state, point=f"mid-part:{i}")
            failpoint(f"after-part:{i}")
        _save_tensors(self._stream_file(i + 1), streams)
        failpoint(f"after-stream:{i}")
        dist.barrier()
        if self.rank0:
            record = {
                "modules": {n: s for n, s in ctx.modules.items() if n.startswith(prefix)},
                "norm_biases": [n for n in ctx.norm_biases if n.startswith(prefix)],
                # online Hadamards a pass attached block by block (--down-hadamard): not in the block's tensors
                "hadamards": {prefix + n: o.hadamard for n, o in ops_modules(block).items() if o.hadamard},
                "notes": run.notes.get(i, {}),
            }
            _save_json(self.path / f"block-{i:05d}.json", record)  # last: the block is finished
            failpoint(f"after-record:{i}")
        dist.barrier()
        old = self._stream_file(i)
        if old.exists():
            old.unlink()

    def save_outer(self, model: nn.Module, names: list[str], which: str) -> None:
        if self.rank0:
            state = {f"{n}.{k}": v for n in names for k, v in model.get_submodule(n).state_dict().items()}
            _save_tensors(self.path / f"outer-{which}.safetensors", state)

    def tensor(self, name: str) -> torch.Tensor:
        """A tensor of the finished run by its checkpoint name (the assembly of a streamed checkpoint)."""
        if self._where is None:
            self._where = {}
            for f in sorted(self.path.glob("*.safetensors")):
                if f.name.startswith(("block-", "outer-")):
                    with safe_open(str(f), framework="pt") as fh:
                        self._where.update(dict.fromkeys(fh.keys(), f))
        if name not in self._where:
            raise QuantError(f"{self.path}: the run left no tensor {name}")
        with safe_open(str(self._where[name]), framework="pt", device="cpu") as fh:
            return fh.get_tensor(name)

    def remove(self) -> None:
        if self.rank0:
            shutil.rmtree(self.path, ignore_errors=True)
