"""Building the CPU kernels: JIT through ``torch.utils.cpp_extension.load`` into the persistent cache that
``kernels_cuda`` uses (``$LOWBIT_KERNELS_BUILD_DIR``, else ``<lowbit cache>/kernels/cpu-<tag>``), where the
tag hashes the sources, the flags and the torch/Python versions. The instruction set is chosen at run time
inside the binary (AVX-512, AVX2/FMA or portable), so one build serves every x86-64 CPU.

    python -m kernels_cpu.build     # build (or find) the extension ahead of time, print where it is
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path
from types import ModuleType

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = [CSRC / "lowbit_gemv_cpu.cpp", CSRC / "decode_attention_cpu.cpp"]
CXX_FLAGS = ["-O3", "-fopenmp"]  # at::parallel_for uses threads only when built with OpenMP


def source_tag() -> str:
    import torch

    h = hashlib.sha256()
    for src in SOURCES:
        h.update(src.read_bytes())
    h.update(" ".join(CXX_FLAGS).encode())
    h.update(f"{torch.__version__}|{sys.version_info[:2]}".encode())
    return h.hexdigest()[:16]


def build_dir() -> Path:
    from kernels_cuda.build import cache_root

    override = os.environ.get("LOWBIT_KERNELS_BUILD_DIR")
    return Path(override) / "cpu" if override else cache_root() / "kernels" / f"cpu-{source_tag()}"


def load(verbose: bool = False) -> ModuleType:
    """Compile (first time: about a minute) and import the extension. Needs a C++ compiler."""
    from torch.utils import cpp_extension

    out = build_dir()
    out.mkdir(parents=True, exist_ok=True)
    venv_bin = str(Path(sys.executable).parent)  # pip's ninja lives beside the interpreter, maybe not on PATH
    if venv_bin not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = venv_bin + os.pathsep + os.environ.get("PATH", "")
    return cpp_extension.load(
        name=f"lowbit_cpu_{source_tag()}",
        sources=[str(s) for s in SOURCES],
        extra_cflags=CXX_FLAGS,
        extra_ldflags=["-fopenmp"],
        build_directory=str(out),
        verbose=verbose,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kernels_cpu.build", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    mod = load(verbose=not args.quiet)
    print(f"lowbit CPU kernels ready: {mod.__file__} (instruction set level {mod.isa_level()})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
