// Interface between the pure CUDA kernels (lowbit_gemm.cu) and the torch binding (binding.cpp).
// Only plain C++ types here, so the binding needs no CUDA header and the .cu needs no torch header:
// each half can be compiled (and checked) on its own.
#pragma once

#include <cstddef>
#include <cstdint>

namespace lowbit {

// Tiling shared with the Python repack (kernels_cuda/layout.py): one warp owns a tile of
// kTileN weight rows x kTileK inputs, i.e. two m16 x eight k16 tensor-core fragments.
constexpr int kTileN = 32;
constexpr int kTileK = 128;
constexpr int kMaxRows = 64;  // tokens (rows of x) per call
constexpr int kMaxThreads = 512;

struct GemmParams {
  const void* x;           // [m, k] fp16 or bf16, row-major
  const int32_t* qweight;  // repacked codes: [ntiles][kp / kTileK][bits][32 lanes][4 words]
  const void* scales;      // fp16 [ntiles][groups][32], rows permuted (see layout.py)
  const uint8_t* zeros;    // uint8 [ntiles][groups][32], same order
  const void* bias;        // [n] in x's dtype, or nullptr
  void* y;                 // [m, n] in x's dtype (written when ws == nullptr)
  float* ws;               // [m, n] fp32, zero-filled: split-K partial sums are added here atomically
  int m, n, k, kp;         // kp: k rounded up to kTileK
  int ntiles;              // ceil(n / kTileN)
  int groups, group_size;  // groups = k / group_size
  int bits;                // 2, 3 or 4
  int dtype;               // 0: fp16, 1: bf16
  int wn, wk;              // warps per block along n (row tiles) and along k (split-K inside the block)
  int splits;              // split-K across blocks (gridDim.y); > 1 needs ws
  int x_vec;               // x is 16-byte aligned and k % 8 == 0: stage it with 16-byte async copies
  int device;              // CUDA device index to launch on
};

// Dynamic shared memory the launch will request (bytes).
size_t gemm_smem_bytes(const GemmParams& p);

// Largest dynamic shared memory per block the kernels may use on `device` (the opt-in maximum).
int gemm_max_smem(int device);

// Launches on `stream` (a cudaStream_t). Returns 0 on success, a cudaError_t value on a CUDA
// error, or a negative code for invalid parameters (see gemm_error_string).
int gemm_launch(const GemmParams& p, void* stream);

const char* gemm_error_string(int code);

}  // namespace lowbit
