"""Building the CUDA extension: JIT through ``torch.utils.cpp_extension.load`` into a persistent
cache, an ahead-of-time build (``python -m kernels_cuda.build``) and a GPU-free compile check.

The cache directory is ``$LOWBIT_KERNELS_BUILD_DIR`` or ``<lowbit cache>/kernels/<tag>``, where the
lowbit cache is ``$LOWBIT_CACHE`` or ``~/.cache/lowbit`` (as for the embedded model) and ``tag``
hashes the sources, the nvcc flags and the torch/CUDA versions: editing a kernel or upgrading
torch builds afresh, anything else reuses the compiled module (``load`` itself only recompiles
files whose hash changed). The AOT build is the same call run ahead of time, e.g. in a Docker
image: it needs nvcc and a CUDA build of torch, not a GPU.

    python -m kernels_cuda.build            # build (or find) the extension, print where it is
    python -m kernels_cuda.build --check    # nvcc-compile the kernels to objects only (no GPU,
                                            # no CUDA torch needed; what tests/test_kernels_cuda.py runs)
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

CSRC = Path(__file__).resolve().parent / "csrc"
KERNEL_SOURCE = CSRC / "lowbit_gemm.cu"
BINDING_SOURCE = CSRC / "binding.cpp"
HEADERS = [CSRC / "lowbit_gemm.h"]

# sm_80 (A100) and sm_90 (H100/H200) SASS, plus sm_90 PTX so newer GPUs can JIT it.
GENCODE = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",
]
NVCC_FLAGS = ["-O3", "-lineinfo", "--threads=3", *GENCODE]  # one nvcc thread per target
CXX_FLAGS = ["-O3"]
# What torch.utils.cpp_extension adds to every nvcc call (torch 2.13): the compile check mirrors it.
TORCH_NVCC_DEFAULTS = [
    "-std=c++20",
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
]


def find_nvcc() -> str | None:
    """nvcc from $CUDA_HOME/$CUDA_PATH, PATH, or /usr/local/cuda (torch's own search order)."""
    for env in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(env)
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = Path("/usr/local/cuda/bin/nvcc")
    return str(default) if default.is_file() else None


def source_tag() -> str:
    """Hash of everything that changes the binary."""
    import torch

    h = hashlib.sha256()
    for path in (KERNEL_SOURCE, BINDING_SOURCE, *HEADERS):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    h.update(" ".join(NVCC_FLAGS + CXX_FLAGS).encode())
    h.update(f"{torch.__version__}|{torch.version.cuda}|{sys.version_info[:2]}".encode())
    return h.hexdigest()[:16]


def cache_root() -> Path:
    """``$LOWBIT_CACHE``, else ``$XDG_CACHE_HOME/lowbit`` or ``~/.cache/lowbit`` (shared with ``kernels_cpu``)."""
    root = os.environ.get("LOWBIT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "lowbit"
    )
    return Path(root)


def build_dir() -> Path:
    override = os.environ.get("LOWBIT_KERNELS_BUILD_DIR")
    if override:
        return Path(override)
    return cache_root() / "kernels" / source_tag()


def load(verbose: bool = False) -> ModuleType:
    """Compile (first time) and import the extension. Needs nvcc and a CUDA build of torch."""
    import torch
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        raise RuntimeError(f"torch {torch.__version__} is a CPU-only build; the CUDA kernels need a CUDA build")
    out = build_dir()
    out.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name=f"lowbit_kernels_{source_tag()}",
        sources=[str(BINDING_SOURCE), str(KERNEL_SOURCE)],
        extra_cflags=CXX_FLAGS,
        extra_cuda_cflags=NVCC_FLAGS,
        extra_include_paths=[str(CSRC)],
        build_directory=str(out),
        verbose=verbose,
    )


def nvcc_check_command(nvcc: str, arch: str, output: Path) -> list[str]:
    """nvcc command compiling the kernel source to an object for one ``sm_XX`` (no torch needed:
    the .cu file includes only CUDA headers)."""
    num = arch.removeprefix("sm_")
    return [
        nvcc,
        "-c",
        str(KERNEL_SOURCE),
        "-o",
        str(output),
        "-O3",
        *TORCH_NVCC_DEFAULTS,
        f"-gencode=arch=compute_{num},code=sm_{num}",
        "-Xptxas=-warn-spills",
        f"-I{CSRC}",
    ]


def compile_check(out_dir: Path, archs: tuple[str, ...] = ("sm_80", "sm_90")) -> list[Path]:
    """Compile the kernels to one object per arch with nvcc; raise with nvcc's output on failure."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    objects = []
    for arch in archs:
        obj = out_dir / f"lowbit_gemm.{arch}.o"
        cmd = nvcc_check_command(nvcc, arch, obj)
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"nvcc failed for {arch}:\n{' '.join(cmd)}\n{res.stdout}\n{res.stderr}")
        if "spill" in res.stderr.lower():
            raise RuntimeError(f"ptxas reports register spills for {arch}:\n{res.stderr}")
        objects.append(obj)
    return objects


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kernels_cuda.build", description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only nvcc-compile the kernels to objects (no GPU needed)")
    ap.add_argument("--out", type=Path, default=None, help="--check: where to put the objects")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.check:
        out = args.out or Path(build_dir().parent / "check")
        out.mkdir(parents=True, exist_ok=True)
        for obj in compile_check(out):
            print(f"compiled {obj}")
        return 0
    mod = load(verbose=not args.quiet)
    print(f"lowbit CUDA kernels ready: {mod.__file__}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
