"""Where the engine's weights come from: a model in memory (``ResidentSource``) or a folder of safetensors
shards read block by block (``DiskSource``), so a model larger than memory is quantized in one block's room.

``DiskSource`` builds the model on the meta device (buffers such as rotary tables stay real: they are computed,
not stored), then materialises one module at a time from the shards (found through the index; plain reads, no
memory map) in the compute dtype on the compute device, and returns it to the meta device when the engine is
done with it. It reads float models (to quantize or evaluate) and our checkpoints (to evaluate: packed linears
as stored, checksums verified first). A block read again (each evaluation pass) is rebuilt from its stored form.
The embeddings are loaded while the calibration stream is captured, the final norm and lm_head only at the end.
The block structure is discovered on block 0 (on a short probe) and reused for every block of the same make;
a block that differs (a dense first layer in an MoE model) is discovered when it loads.
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import torch
from torch import nn

from quant.engine.structure import (
    Structure,
    _discover_block,
    _inside,
    _is_norm,
    _linear_types,
    find_blocks,
    model_level,
    normalize,
    probe_ids,
    structure_of,
)
from quant.errors import QuantError
from quant.formats import reader
from quant.runtime.quantlinear import PackedLinear

OUTER = ("inputs", "outputs")


def _outer_names(model: nn.Module, structure: Structure, which: str) -> list[str]:
    """Modules outside the blocks the engine needs at the start (``inputs``: embeddings, learned positions)
    or at the end (``outputs``: the final norm and lm_head)."""
    if which == "outputs":
        return [n for n in (structure.final_norm, structure.lm_head) if n]
    return [n for n, m in model.named_modules() if isinstance(m, nn.Embedding) and not _inside(n, structure.layers)]


class ResidentSource:
    """The model is in memory already: blocks only move to the compute device (and dtype) and back, so that
    after the run the whole model is where it was, in its own dtype (the compute dtype only computes)."""

    streaming = False

    def __init__(self, device: torch.device | str = "cpu", dtype: torch.dtype | None = None) -> None:
        self.device, self.dtype = torch.device(device), dtype
        self._outer_buffers: dict[str, list[torch.Tensor]] = {}  # per `which`: the end can load inside the start
        self._home_dtype: torch.dtype | None = None

    def structure(self, model: nn.Module) -> Structure:
        return structure_of(model)

    def probe_ids(self, model: nn.Module) -> torch.Tensor:
        return probe_ids(model)

    def _move(self, module: nn.Module, device: torch.device, dtype: torch.dtype | None) -> None:
        module.to(device)
        if dtype is not None:
            for p in itertools.chain(module.parameters(), module.buffers()):
                if p.is_floating_point() and p.dtype != dtype and p.dtype != torch.float16:  # fp16: packed scales
                    self._home_dtype = self._home_dtype or p.dtype
                    p.data = p.data.to(dtype)

    def load_outer(self, model: nn.Module, structure: Structure, which: str) -> None:
        if self.device.type != "cpu":
            for n in _outer_names(model, structure, which):
                self._move(model.get_submodule(n), self.device, None)
            # rotary tables and the like live outside the blocks (the blocks' own buffers move with them)
            inside = {id(b) for block in structure.blocks(model) for b in block.buffers()}
            moved = [b for b in model.buffers() if id(b) not in inside and b.device != self.device]
            for b in moved:
                b.data = b.data.to(self.device)
            self._outer_buffers[which] = moved

    def release_outer(self, model: nn.Module, structure: Structure, which: str) -> None:
        if self.device.type != "cpu":
            for n in _outer_names(model, structure, which):
                model.get_submodule(n).to("cpu")
            for b in self._outer_buffers.pop(which, []):
                b.data = b.data.to("cpu")

    def load_block(self, model: nn.Module, structure: Structure, i: int, run) -> nn.Module:
        block = structure.blocks(model)[i]
        self._move(block, self.device, self.dtype)
        return block

    def release_block(self, model: nn.Module, structure: Structure, i: int) -> None:
        block = structure.blocks(model)[i]
        if self.device.type != "cpu":
            block.to("cpu")
        if self._home_dtype is not None:  # back to the model's dtype, new tensors (biases of packed layers) too
            for module in block.modules():
                packed = isinstance(module, PackedLinear)  # its codes and scales keep their format's dtypes
                own = itertools.chain(module.named_parameters(recurse=False), module.named_buffers(recurse=False))
                for name, p in own:
                    if p is not None and p.dtype == self.dtype and (not packed or name == "bias"):
                        p.data = p.data.to(self._home_dtype)


def _header(f: Path) -> tuple[dict, int]:
    """A safetensors file's header (``{name: {dtype, shape, data_offsets}}``) and where its data starts."""
    import json

    with open(f, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        return json.loads(fh.read(n)), 8 + n


def _signature(block: nn.Module) -> tuple:
    return tuple((n, type(m).__name__, tuple(getattr(m, "weight", torch.empty(0)).shape))
                 for n, m in block.named_modules())


class DiskSource:
    """A model's safetensors folder, read one module at a time: a float model, or (``checkpoint=True``, for
    evaluation) one of our quantized checkpoints, whose packed linears are read as stored."""

    streaming = True

    def __init__(self, path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 checkpoint: bool = False):
        from quant.formats.models import checkpoint_kind

        self.path = Path(path)
        self.device, self.dtype = torch.device(device), dtype
        raw = reader.read_config(self.path)
        kind = checkpoint_kind(self.path, raw)
        if kind is not None and not checkpoint:
            raise QuantError(f"{self.path} is already quantized; pass the float model")
        if kind == "gptq":
            raise QuantError(f"{self.path}: GPTQ-format checkpoints are not streamed; load it whole (--no-stream)")
        self.qc = None
        if kind is not None:
            from quant.formats.checkpoint import _verified_files, read_quantization_config

            self.qc = read_quantization_config(self.path, raw)
        self.config = reader.model_config(raw, self.path)
        self.config._name_or_path = str(self.path)  # as from_pretrained records it (config.json stays the same)
        self.stored_tied = reader.tied(self.config)  # the files store a tied head once (rotation unties the model)
        self.files = _verified_files(self.path) if self.qc else self._files()
        self.headers = reader.read_headers(self.files, self.path)
        self.where: dict[str, Path] = {}
        from safetensors import safe_open

        for f in self.files:
            with safe_open(str(f), framework="pt") as fh:
                self.where.update(dict.fromkeys(fh.keys(), f))
        self._handles: dict[Path, object] | None = None  # open only inside materialize()
        self._structure: Structure | None = None
        self._signatures: tuple | None = None
        self._stored_form: dict[int, nn.Module] = {}  # each block as the files store it (before normalize)
        _fixed_mmap_threshold()

    def _files(self) -> list[Path]:
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            wm = reader.read_json(index, self.path).get("weight_map")
            if not isinstance(wm, dict) or not wm:
                raise reader.corrupt(self.path, f"{index.name} has no weight_map")
            names = list(dict.fromkeys(wm.values()))
        else:
            names = ["model.safetensors"]
        listed_in = index.name if index.exists() else "the folder"
        return [reader.weight_file(self.path, n, self.path, listed_in) for n in names]

    # -- the skeleton -------------------------------------------------------------------------------------
    def skeleton(self) -> nn.Module:
        """The model with its parameters on the meta device (no memory), buffers real, tensor names checked
        against the files' headers before anything is read."""
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM
        from transformers.initialization import no_init_weights

        try:
            with no_init_weights(), init_empty_weights(include_buffers=False):
                model = AutoModelForCausalLM.from_config(self.config, dtype=self.dtype)
        except Exception as e:  # noqa: BLE001
            raise reader.corrupt(self.path, f"config.json does not build a model ({reader.first_line(e)})") from None
        if self.qc is not None:  # stored normalized, with packed linears
            from quant.formats.checkpoint import install_packed

            with torch.device("meta"):
                normalize(model)
            install_packed(model, self.qc, self.dtype, self.path, "meta")
        expected = set(model.state_dict())
        stored = set(self.headers)
        if stored - expected or (expected - stored) - {k for k in expected if k.endswith("lm_head.weight")}:
            odd = sorted((stored - expected) | (expected - stored))[0]
            raise QuantError(
                f"{self.path}: the files' tensor names differ from the {self.config.model_type} model's ({odd}); "
                "transformers converts them at load time, which streaming does not: load the model whole "
                "(--no-stream)"
            )
        if self.qc is not None:  # packed tensors exactly as the skeleton declares them, before any is read
            from quant.formats.tensor_checks import check_state, torch_dtype

            check_state(self.headers, model, torch_dtype(getattr(self.config, "dtype", None) or torch.float32),
                        str(self.path))
        if self.stored_tied:
            model.tie_weights()  # not done under init_empty_weights; the structure reads the tie from it
        model.eval()
        return model

    # -- reading ------------------------------------------------------------------------------------------
    def _read(self, key: str, like: torch.Tensor | None) -> torch.Tensor:
        """One tensor, read from its file into fresh memory (no memory map: mapped pages would count against
        the process until unmapped, doubling a block's footprint), converted to the dtype of the (meta) tensor
        it replaces (the compute dtype; a packed linear's stored scales keep theirs) and to the device."""
        f = self.where[key]
        if f not in self._handles:
            self._handles[f] = (open(f, "rb"), _header(f))
        fh, (header, start) = self._handles[f]
        meta = header[key]
        begin, end = meta["data_offsets"]
        dtype = reader._ST_DTYPES[meta["dtype"]]
        t = torch.empty(meta["shape"], dtype=dtype)
        fh.seek(start + begin)
        if end > begin and fh.readinto(memoryview(t.view(-1).view(torch.uint8).numpy())) != end - begin:
            raise QuantError(f"{self.path}: {f.name} is shorter than its header says ({key})")
        if t.is_floating_point():
            from quant.numerics.grid import check_finite

            check_finite(t, key)
            t = t.to(like.dtype if like is not None and like.is_floating_point() else self.dtype)
        return t.to(self.device)

    def _key(self, model: nn.Module, key: str) -> str:
        if key in self.where:
            return key
        if key.endswith("lm_head.weight") and self.stored_tied:  # a tied head is stored as the embedding
            emb = model.get_input_embeddings()
            return next(f"{n}.weight" for n, m in model.named_modules() if m is emb)
        raise QuantError(f"{self.path}: tensor {key} is not in the files")

    def materialize(self, model: nn.Module, prefix: str) -> nn.Module:
        """Read module ``prefix`` (its parameters and stored buffers) from the files onto the device."""
        module = model.get_submodule(prefix)
        self._handles = {}
        try:
            self._materialize(model, module, prefix)
        finally:
            for fh, _ in self._handles.values():
                fh.close()
            self._handles = None
        return module

    def _materialize(self, model: nn.Module, module: nn.Module, prefix: str) -> None:
        with torch.no_grad():
            for name, p in list(module.named_parameters(remove_duplicate=False)):
                owner_name, _, leaf = name.rpartition(".")
                owner = module.get_submodule(owner_name)
                t = self._read(self._key(model, f"{prefix}.{name}" if prefix else name), p)
                owner._parameters[leaf] = nn.Parameter(t, requires_grad=p.requires_grad)
            for name, b in list(module.named_buffers()):
                key = f"{prefix}.{name}" if prefix else name
                owner_name, _, leaf = name.rpartition(".")
                owner = module.get_submodule(owner_name)
                if key in self.where:
                    owner._buffers[leaf] = self._read(key, b)
                elif b is not None:
                    owner._buffers[leaf] = b.to(self.device)

    def release(self, model: nn.Module, prefix: str) -> None:
        """Back to the meta device: parameters and stored buffers (packed linears' too); computed buffers
        (rotary tables, embedding scales) stay, since they cannot be read again."""
        module = model.get_submodule(prefix)
        for m in module.modules():
            for leaf, p in m._parameters.items():
                if p is not None:
                    meta = torch.empty_like(p, device="meta")
                    m._parameters[leaf] = nn.Parameter(meta, requires_grad=p.requires_grad)
            for leaf, b in m._buffers.items():
                if b is not None and leaf not in m._non_persistent_buffers_set:
                    m._buffers[leaf] = torch.empty_like(b, device="meta")

    # -- the engine's interface ---------------------------------------------------------------------------
    def structure(self, model: nn.Module) -> Structure:
        """Model-level places from the skeleton; block 0's structure discovered on a probe and given to every
        block of the same make (others are discovered when they load)."""
        if self._structure is not None:
            return self._structure
        from quant.engine.loop import capture

        layers = find_blocks(model)
        blocks = model.get_submodule(layers)
        head = model.get_output_embeddings()
        if head is None or not isinstance(head, _linear_types()):
            raise QuantError(f"{type(model).__name__} has no linear lm_head: only causal language models are supported")
        outer_norms = [n for n, m in model.named_modules() if _is_norm(m) and not _inside(n, layers)]
        if len(outer_norms) != 1:
            raise QuantError(
                f"streaming needs one final norm outside the blocks; {type(model).__name__} has {len(outer_norms)}: "
                "load the model whole (--no-stream)"
            )
        final = self.materialize(model, outer_norms[0])  # its kind is found by evaluating it
        s = model_level(model, layers, final)
        self.release(model, outer_norms[0])
        self._structure = s
        for n in _outer_names(model, s, "inputs"):
            self.materialize(model, n)
        x, kwargs = capture(model, blocks, probe_ids(model).to(self.device))
        for n in _outer_names(model, s, "inputs"):
            self.release(model, n)
        block = self._load(model, 0)  # stays loaded for the engine: a block is read (and normalized) once
        first = self._discover(block, x, kwargs[0])
        self._signatures = _signature(block)
        s.block_info = [copy.deepcopy(first) for _ in blocks]
        return s

    def _discover(self, block: nn.Module, x: torch.Tensor, kwargs: dict):
        from quant.engine.structure import ROLE_OVERRIDES, _has

        b = _discover_block(block, x, kwargs)
        b.roles.update({r: n for r, n in ROLE_OVERRIDES.get(self.config.model_type, {}).items() if _has(block, n)})
        return b

    def probe_ids(self, model: nn.Module) -> torch.Tensor:
        return probe_ids(model)

    def load_outer(self, model: nn.Module, structure: Structure, which: str) -> None:
        for n in _outer_names(model, structure, which):
            self.materialize(model, n)

    def release_outer(self, model: nn.Module, structure: Structure, which: str) -> None:
        for n in _outer_names(model, structure, which):
            self.release(model, n)

    def _load(self, model: nn.Module, i: int) -> nn.Module:
        layers = find_blocks(model) if self._structure is None else self._structure.layers
        blocks = model.get_submodule(layers)
        if not any(p.is_meta for p in blocks[i].parameters()):  # block 0, loaded for discovery
            return blocks[i]
        if i in self._stored_form:  # read again (each evaluation pass): from the files' form, not the normalized one
            blocks[i] = copy.deepcopy(self._stored_form[i])
        else:
            self._stored_form[i] = copy.deepcopy(blocks[i])  # on the meta device: costs no memory
        block = self.materialize(model, f"{layers}.{i}")
        normalize(block)
        return block

    def load_block(self, model: nn.Module, structure: Structure, i: int, run) -> nn.Module:
        block = self._load(model, i)
        if _signature(block) != self._signatures:  # not made like block 0: find its own structure
            structure.block_info[i] = self._discover(block, run.x[:1], run.kwargs[i])
        return block

    def release_block(self, model: nn.Module, structure: Structure, i: int) -> None:
        self.release(model, f"{structure.layers}.{i}")
        _trim()


def _libc():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None


def _trim() -> None:
    """Give freed heap memory back to the OS after a block."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _fixed_mmap_threshold() -> None:
    """Serve allocations of 1 MiB and more with their own mappings, returned to the OS when freed. By default
    glibc raises that threshold as big blocks are freed, so a block's tensors and the solvers' temporaries end
    up on the heap, where freed memory stays in the process (measured on a 61 MB block: each released block
    left about a third of itself behind, and a block's peak was 5 blocks instead of 2.5)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
