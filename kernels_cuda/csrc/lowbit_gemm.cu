// Low-bit weight x fp16/bf16 activation GEMM: y[m, n] = x[m, k] . dequant(W)[n, k]^T (+ bias).
//
// Design (decode first: m = 1..16 must stream the weights once at close to full bandwidth):
//
// * "Swap AB" tensor-core GEMV. The weight is the A operand of mma.m16n8k16 (its rows = output
//   features fill the 16-row side), x^T is the B operand (tokens fill the 8-wide side, padded with
//   a zero row). So at m <= 8 every weight byte is read once and feeds one mma; m <= 64 still reads
//   each weight byte exactly once (up to 8 n-tiles per A fragment).
// * One warp owns a 32-row x 128-input tile per step. The repacked layout (kernels_cuda/layout.py)
//   puts each lane's share of that tile in `bits` consecutive 16-byte words of the warp's
//   contiguous block, so every load is a coalesced 128-bit load and the decoded values land
//   directly in the lane's mma A-fragment registers (no shuffles, no shared-memory staging).
// * Dequantization in registers: a field f at bit p of a 16-bit half, OR-ed with the exponent
//   bits of 2^e ("magic" 1024.0 for fp16, 128.0 for bf16), reads as 2^e + f * 2^p exactly; one
//   fma by (2^-p, -(2^(e-p) + zero)) gives (code - zero) exactly, and one multiply by the scale
//   rounds once, to the same fp16 value as the reference dequantize (for bf16 the fp16 scale is
//   rounded to bf16 first). Two codes per instruction, fp32 accumulation in the tensor core.
// * 3-bit is stored dense (32 codes in 3 words, fields never straddle a half), unlike the
//   checkpoint's 10-per-word layout, so INT3 moves 3/4 of INT4's weight bytes.
// * x is staged in shared memory per round (cp.async, double buffered) and read with ldmatrix.
//   A block is wn x wk warps: wn row tiles side by side (sharing x), wk warps splitting k, reduced
//   through shared memory at the end. Optionally gridDim.y > 1 splits k across blocks (fp32 atomics).
//
// Weight rows beyond n and inputs beyond k are zero padding in the repacked tensors; x beyond k
// is zero-filled in shared memory, so no code path depends on n or k being tile multiples.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "lowbit_gemm.h"

namespace lowbit {
namespace {

constexpr int kDefaultSmem = 48 * 1024;  // above this a kernel needs the opt-in attribute
constexpr int kMaxDevices = 64;

// ---------------------------------------------------------------------------------------------
// Element traits: exact integer constants, packed-pair arithmetic and conversions.

// Bit pattern of a small non-negative integer v as fp16 (v < 2048) or bf16 (v < 256): exact.
__host__ __device__ constexpr uint32_t int_bits(int v, int mantissa, int bias) {
  if (v == 0) return 0;
  int e = 0;
  while ((v >> (e + 1)) != 0) ++e;
  return static_cast<uint32_t>(((e + bias) << mantissa) | ((v << (mantissa - e)) & ((1 << mantissa) - 1)));
}

template <typename T>
struct Elem;

template <>
struct Elem<__half> {
  static constexpr int kMantissa = 10;
  static constexpr int kBias = 15;
  static constexpr int kMagicVal = 1024;
  static constexpr uint32_t kMagic = 0x64006400u;    // 1024.0 in both halves
  static constexpr uint32_t kNegOne2 = 0xBC00BC00u;  // -1.0 in both halves
  __device__ __forceinline__ static uint32_t fma2(uint32_t a, uint32_t b, uint32_t c) {
    uint32_t d;
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
  }
  __device__ __forceinline__ static uint32_t mul2(uint32_t a, uint32_t b) {
    uint32_t d;
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
  }
  // Broadcast fp16 scale number `hi` (0: low half, 1: high half) of `w` to both halves.
  __device__ __forceinline__ static uint32_t scale2(uint32_t w, int hi) {
    return __byte_perm(w, 0u, hi ? 0x3232 : 0x1010);
  }
  __device__ __forceinline__ static float to_float(uint16_t v) { return __half2float(__ushort_as_half(v)); }
  __device__ __forceinline__ static uint16_t from_float(float v) { return __half_as_ushort(__float2half_rn(v)); }
  __device__ __forceinline__ static void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct Elem<__nv_bfloat16> {
  static constexpr int kMantissa = 7;
  static constexpr int kBias = 127;
  static constexpr int kMagicVal = 128;
  static constexpr uint32_t kMagic = 0x43004300u;    // 128.0 in both halves
  static constexpr uint32_t kNegOne2 = 0xBF80BF80u;  // -1.0 in both halves
  __device__ __forceinline__ static uint32_t fma2(uint32_t a, uint32_t b, uint32_t c) {
    uint32_t d;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
  }
  // mul.bf16x2 needs sm_90; a * b + (-0) is the same exact-then-round product on sm_80.
  __device__ __forceinline__ static uint32_t mul2(uint32_t a, uint32_t b) { return fma2(a, b, 0x80008000u); }
  __device__ __forceinline__ static uint32_t scale2(uint32_t w, int hi) {
    const float s = __half2float(__ushort_as_half(static_cast<uint16_t>(hi ? (w >> 16) : (w & 0xFFFFu))));
    const __nv_bfloat162 v = __floats2bfloat162_rn(s, s);
    return *reinterpret_cast<const uint32_t*>(&v);
  }
  __device__ __forceinline__ static float to_float(uint16_t v) {
    return __bfloat162float(__ushort_as_bfloat16(v));
  }
  __device__ __forceinline__ static uint16_t from_float(float v) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(v));
  }
  __device__ __forceinline__ static void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// ---------------------------------------------------------------------------------------------
// Dequantization of packed pairs into A-fragment registers.
//
// Fragment f of a lane (f = 8 * mi + ks: m-tile mi in {0, 1}, k-step ks in 0..7) is four packed
// pairs a[r], r = 0..3, as mma.m16n8k16 wants them: pair r holds row 16*mi + g + 8*(r & 1) at
// inputs 16*ks + 2*t + 8*(r >> 1) + {0, 1} (g = lane / 4, t = lane % 4). A pair sits in one
// 32-bit word at bit P (first code) and P + 16 (second code); where P is, per width:
//   4-bit: word f,     P = 4 r
//   2-bit: word f / 2, P = 2 (4 (f % 2) + r)
//   3-bit: slot s = 4 (f % 4) + r of word triplet c = f / 4: s < 15 -> word 3c + s / 5,
//          P = 3 (s % 5); s = 15 ("spare") -> code bit i in bit 15 / 31 of word 3c + i.
// A field is usable in place while it fits the mantissa; otherwise the word is shifted right by a
// multiple of kChunk first (the compiler shares one shift between the fields that need it).

template <typename T, int BITS>
struct Dequant {
  using E = Elem<T>;
  static constexpr int kChunk = (E::kMantissa / BITS) * BITS;  // field bits usable without a shift
  static constexpr int kNumPP = kChunk / BITS;                 // distinct in-half field offsets
  static constexpr uint32_t kFieldMask = ((1u << BITS) - 1u) * 0x10001u;

  uint32_t cst[4][kNumPP];  // per row slot j: (-(2^e / 2^pp + zero)) in both halves
  uint32_t scl[4];          // per row slot j: scale in both halves (T)

  // Row slot j (0..3) is row g + 8 j of the warp tile; sc holds their 4 fp16 scales, zz 4 zeros.
  __device__ __forceinline__ void set_group(uint2 sc, uint32_t zz) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      // (2^e + zero) in both halves: zero byte j under the magic's exponent byte.
      const uint32_t hz = __byte_perm(zz, E::kMagic, j | 0x50 | (j << 8) | 0x7000);
#pragma unroll
      for (int i = 0; i < kNumPP; ++i) {
        const int pp = i * BITS;
        const uint32_t k2 = int_bits(E::kMagicVal - (E::kMagicVal >> pp), E::kMantissa, E::kBias) * 0x10001u;
        cst[j][i] = E::fma2(hz, E::kNegOne2, k2);  // k2 - hz = -(2^e / 2^pp + zero), exact
      }
      scl[j] = E::scale2(j < 2 ? sc.x : sc.y, j & 1);
    }
  }

  // (code - zero) * scale for the pair at bit P of `w`, row slot j.
  __device__ __forceinline__ uint32_t field(uint32_t w, int P, int j) const {
    const int shift = (P / kChunk) * kChunk;
    const int pp = P - shift;
    const uint32_t v = ((w >> shift) & (kFieldMask << pp)) | E::kMagic;
    const uint32_t pow2 = static_cast<uint32_t>((E::kBias - pp) << E::kMantissa) * 0x10001u;  // 2^-pp
    return E::mul2(E::fma2(v, pow2, cst[j][pp / BITS]), scl[j]);
  }

  // 3-bit spare pair: code bit i lives in bit 15 (first code) / 31 (second) of word i.
  __device__ __forceinline__ uint32_t spare(uint32_t w0, uint32_t w1, uint32_t w2, int j) const {
    const uint32_t v =
        ((w0 >> 15) & 0x00010001u) | ((w1 >> 14) & 0x00020002u) | ((w2 >> 13) & 0x00040004u) | E::kMagic;
    return E::mul2(E::fma2(v, int_bits(1, E::kMantissa, E::kBias) * 0x10001u, cst[j][0]), scl[j]);
  }

  __device__ __forceinline__ void fragment(const uint32_t (&w)[4 * BITS], int f, uint32_t (&a)[4]) const {
    const int mi = f / 8;
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int j = 2 * mi + (r & 1);
      if constexpr (BITS == 4) {
        a[r] = field(w[f], 4 * r, j);
      } else if constexpr (BITS == 2) {
        a[r] = field(w[f / 2], 2 * (4 * (f % 2) + r), j);
      } else {
        const int c = f / 4, s = 4 * (f % 4) + r;
        a[r] = s < 15 ? field(w[3 * c + s / 5], 3 * (s % 5), j) : spare(w[3 * c], w[3 * c + 1], w[3 * c + 2], j);
      }
    }
  }
};

// ---------------------------------------------------------------------------------------------
// Small PTX wrappers.

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async global->shared copy; src_bytes = 0 writes zeros (used past the end of k).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)),
               "l"(__cvta_generic_to_global(src)), "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all_but_one() { asm volatile("cp.async.wait_group 1;\n" ::: "memory"); }

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr)
               : "memory");
}

// Wide token tiles hold 8 NT x 8 fp32 accumulators per lane: cap the block so they get registers.
__host__ __device__ constexpr int max_threads(int nt) { return nt >= 4 ? 256 : kMaxThreads; }

// ---------------------------------------------------------------------------------------------
// The kernel. Template parameters are what sizes registers: element type, bit width and NT, the
// number of 8-token mma n-tiles (m <= 8 NT). Everything else is runtime.

template <typename T, int BITS, int NT>
__global__ void __launch_bounds__(max_threads(NT)) gemm_kernel(const GemmParams p) {
  using E = Elem<T>;
  constexpr int kWords = 4 * BITS;  // 32-bit words per lane per warp tile

  extern __shared__ __align__(16) unsigned char smem[];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int wk = warp % p.wk;
  const int wn = warp / p.wk;
  const int tn = blockIdx.x * p.wn + wn;  // this warp's row tile
  const bool row_ok = tn < p.ntiles;

  const int num_kt = p.kp / kTileK;
  const int per_split = (num_kt + p.splits - 1) / p.splits;
  const int kt_begin = blockIdx.y * per_split;
  const int kt_end = min(num_kt, kt_begin + per_split);
  if (kt_begin >= kt_end) return;  // uniform across the block
  const int rounds = (kt_end - kt_begin + p.wk - 1) / p.wk;

  // Shared memory: two x buffers [m][xs_stride] and a 16-byte zero row for tokens >= m. The row
  // stride is 16 bytes past a multiple of 128, so ldmatrix's 8 rows hit 8 distinct bank quads.
  const int xs_stride = p.wk * kTileK + 8;
  const int buf_elems = p.m * xs_stride;
  uint16_t* xbuf = reinterpret_cast<uint16_t*>(smem);
  uint16_t* zero_row = xbuf + 2 * buf_elems;
  if (threadIdx.x < 8) zero_row[threadIdx.x] = 0;

  const uint16_t* x = static_cast<const uint16_t*>(p.x);
  const uint4* qw = reinterpret_cast<const uint4*>(p.qweight);
  const uint16_t* scales = static_cast<const uint16_t*>(p.scales);

  // Groups per k tile (gpt) and k-steps per group (kpg): groups of 32/64 split a tile, groups of
  // >= 128 (and per-channel) span whole tiles.
  int gpt = 1, kpg = 8;
  if (p.groups > 1 && p.group_size < kTileK) {
    gpt = kTileK / p.group_size;
    kpg = 8 / gpt;
  }

  // Stage x[:, round's k range] into buffer b. Past k: zeros.
  auto stage = [&](int round, int b) {
    const int units = p.wk * (kTileK / 8);  // 16-byte units per token
    const int k0 = (kt_begin + round * p.wk) * kTileK;
    uint16_t* dst = xbuf + b * buf_elems;
    for (int u = threadIdx.x; u < p.m * units; u += blockDim.x) {
      const int tok = u / units;
      const int cu = u - tok * units;
      const int k = k0 + cu * 8;
      uint16_t* d = dst + tok * xs_stride + cu * 8;
      const uint16_t* s = x + static_cast<size_t>(tok) * p.k + k;
      if (p.x_vec) {
        cp_async16(d, k < p.k ? s : x, k < p.k ? 16 : 0);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) d[e] = (k + e < p.k) ? s[e] : uint16_t(0);
      }
    }
  };

  // Weights and this tile's group parameters (up to 4 groups of 32) for k tile kt.
  auto load_tile = [&](int kt, uint4 (&w)[BITS], uint2 (&sc)[4], uint32_t (&zz)[4]) {
    const uint4* src = qw + (static_cast<size_t>(tn) * num_kt + kt) * (BITS * 32) + lane;
#pragma unroll
    for (int j = 0; j < BITS; ++j) w[j] = __ldcs(src + j * 32);  // streamed once: evict-first
    const int grp0 = gpt > 1 ? kt * gpt : min(kt * kTileK / p.group_size, p.groups - 1);
#pragma unroll
    for (int gi = 0; gi < 4; ++gi) {
      if (gi < gpt) {
        const int grp = min(grp0 + gi, p.groups - 1);
        const size_t rec = (static_cast<size_t>(tn) * p.groups + grp) * 32 + 4 * (lane >> 2);
        sc[gi] = __ldg(reinterpret_cast<const uint2*>(scales + rec));
        zz[gi] = __ldg(reinterpret_cast<const uint32_t*>(p.zeros + rec));
      }
    }
  };

  float acc[2][NT][4];
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[mi][j][c] = 0.f;

  uint4 wcur[BITS], wnext[BITS];
  uint2 scur[4], snext[4];
  uint32_t zcur[4], znext[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    scur[i] = snext[i] = make_uint2(0u, 0u);
    zcur[i] = znext[i] = 0u;
  }
#pragma unroll
  for (int j = 0; j < BITS; ++j) wcur[j] = wnext[j] = make_uint4(0u, 0u, 0u, 0u);

  stage(0, 0);
  cp_async_commit();
  if (row_ok && kt_begin + wk < kt_end) load_tile(kt_begin + wk, wcur, scur, zcur);

  // ldmatrix row addresses: lane i supplies row (token) 8 j + i % 8 of matrix i / 8, i.e. inputs
  // +8 (i / 8) of the current pair of k-steps. Tokens >= m read the zero row (and do not advance).
  const int tok_in_tile = lane & 7;
  const int k_in_pair = 8 * (lane >> 3);
  const uint32_t zaddr = smem_addr(zero_row);

  for (int round = 0; round < rounds; ++round) {
    const int kt = kt_begin + round * p.wk + wk;
    if (round + 1 < rounds) stage(round + 1, (round + 1) & 1);
    cp_async_commit();  // possibly empty: keeps "all but the newest group" meaning this round
    const bool has_next = row_ok && kt + p.wk < kt_end;
    if (has_next) load_tile(kt + p.wk, wnext, snext, znext);  // in flight during this round's math
    cp_async_wait_all_but_one();
    __syncthreads();

    if (row_ok && kt < kt_end) {
      const uint16_t* xs = xbuf + (round & 1) * buf_elems + wk * kTileK;
      uint32_t xaddr[NT], xstep[NT];
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const int tok = 8 * j + tok_in_tile;
        const bool ok = tok < p.m;
        xaddr[j] = ok ? smem_addr(xs + tok * xs_stride + k_in_pair) : zaddr;
        xstep[j] = ok ? 32u : 0u;  // bytes per k-step
      }

      uint32_t w[kWords];
#pragma unroll
      for (int j = 0; j < BITS; ++j) {
        w[4 * j + 0] = wcur[j].x;
        w[4 * j + 1] = wcur[j].y;
        w[4 * j + 2] = wcur[j].z;
        w[4 * j + 3] = wcur[j].w;
      }
      Dequant<T, BITS> dq;
      dq.set_group(scur[0], zcur[0]);

#pragma unroll
      for (int ks0 = 0; ks0 < 8; ks0 += 2) {
        if (ks0 > 0 && (ks0 & (kpg - 1)) == 0) {
          // next group of this tile (groups span >= 2 k-steps): rotate the prefetched parameters
          // down, static register moves only
#pragma unroll
          for (int i = 0; i < 3; ++i) {
            scur[i] = scur[i + 1];
            zcur[i] = zcur[i + 1];
          }
          dq.set_group(scur[0], zcur[0]);
        }
        // Decode the A fragments of k-steps ks0, ks0 + 1 once; reuse them for every n-tile.
        uint32_t a[2][2][4];
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int mi = 0; mi < 2; ++mi) dq.fragment(w, 8 * mi + ks0 + h, a[h][mi]);
#pragma unroll
        for (int j = 0; j < NT; ++j) {
          uint32_t b[4];  // b[0..1]: k-step ks0, b[2..3]: ks0 + 1
          ldsm_x4(b, xaddr[j] + ks0 * xstep[j]);
#pragma unroll
          for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int mi = 0; mi < 2; ++mi) E::mma(acc[mi][j], a[h][mi], b[2 * h], b[2 * h + 1]);
        }
      }
    }
    __syncthreads();  // buffer (round & 1) may be restaged next round

#pragma unroll
    for (int j = 0; j < BITS; ++j) wcur[j] = wnext[j];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      scur[i] = snext[i];
      zcur[i] = znext[i];
    }
  }

  // Reduce the wk partial sums of each row tile through shared memory (x buffers are free now).
  constexpr int kAcc = 2 * NT * 4;
  if (p.wk > 1) {
    float* red = reinterpret_cast<float*>(smem);
    if (wk > 0) {
      float* dst = red + ((wk - 1) * p.wn + wn) * kAcc * 32 + lane;
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
          for (int c = 0; c < 4; ++c) dst[((mi * NT + j) * 4 + c) * 32] = acc[mi][j][c];
    }
    __syncthreads();
    if (wk == 0) {
      for (int o = 1; o < p.wk; ++o) {
        const float* srcp = red + ((o - 1) * p.wn + wn) * kAcc * 32 + lane;
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
          for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[mi][j][c] += srcp[((mi * NT + j) * 4 + c) * 32];
      }
    }
  }
  if (wk != 0 || !row_ok) return;

  // C fragment: acc[mi][j][c] is row 16 mi + g + 8 (c / 2) of the tile, token 8 j + 2 t + c % 2.
  const int g = lane >> 2, t = lane & 3;
  const uint16_t* bias = static_cast<const uint16_t*>(p.bias);
  uint16_t* y = static_cast<uint16_t*>(p.y);
  const bool add_bias = bias != nullptr && blockIdx.y == 0;
#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int row = tn * kTileN + 16 * mi + g + 8 * (c >> 1);
      if (row >= p.n) continue;
      const float bv = add_bias ? E::to_float(bias[row]) : 0.f;
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const int tok = 8 * j + 2 * t + (c & 1);
        if (tok >= p.m) continue;
        const float v = acc[mi][j][c] + bv;
        const size_t o = static_cast<size_t>(tok) * p.n + row;
        if (p.ws != nullptr) {
          atomicAdd(p.ws + o, v);
        } else {
          y[o] = E::from_float(v);
        }
      }
    }
}

// ---------------------------------------------------------------------------------------------
// Host side.

int nt_for(int m) { return m <= 8 ? 1 : m <= 16 ? 2 : m <= 32 ? 4 : 8; }

enum : int {
  kErrBits = -1,
  kErrDtype = -2,
  kErrRows = -3,
  kErrShape = -4,
  kErrBlock = -5,
  kErrSmem = -6,
  kErrSplit = -7,
};

template <typename T, int BITS, int NT>
cudaError_t launch(const GemmParams& p, cudaStream_t stream) {
  const dim3 grid((p.ntiles + p.wn - 1) / p.wn, p.splits);
  const dim3 block(32 * p.wn * p.wk);
  const size_t smem = gemm_smem_bytes(p);
  if (smem > static_cast<size_t>(kDefaultSmem)) {
    // Opt in once per device and instantiation (the first call happens eagerly, before any
    // graph capture): allow up to the device's per-block maximum.
    static bool opted[kMaxDevices] = {};
    if (p.device >= kMaxDevices) return cudaErrorInvalidDevice;
    if (!opted[p.device]) {
      const cudaError_t err = cudaFuncSetAttribute(gemm_kernel<T, BITS, NT>,
                                                   cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                   gemm_max_smem(p.device));
      if (err != cudaSuccess) return err;
      opted[p.device] = true;
    }
  }
  gemm_kernel<T, BITS, NT><<<grid, block, smem, stream>>>(p);
  return cudaSuccess;
}

template <typename T, int BITS>
cudaError_t launch_nt(const GemmParams& p, cudaStream_t stream) {
  switch (nt_for(p.m)) {
    case 1: return launch<T, BITS, 1>(p, stream);
    case 2: return launch<T, BITS, 2>(p, stream);
    case 4: return launch<T, BITS, 4>(p, stream);
    default: return launch<T, BITS, 8>(p, stream);
  }
}

template <typename T>
cudaError_t launch_bits(const GemmParams& p, cudaStream_t stream) {
  switch (p.bits) {
    case 2: return launch_nt<T, 2>(p, stream);
    case 3: return launch_nt<T, 3>(p, stream);
    default: return launch_nt<T, 4>(p, stream);
  }
}

}  // namespace

int gemm_max_smem(int device) {
  // cached: the attribute query is a driver call and this runs on every launch
  static int cache[kMaxDevices] = {};
  if (device < 0 || device >= kMaxDevices) return kDefaultSmem;
  if (cache[device] == 0) {
    int v = 0;
    if (cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess || v <= 0) {
      cudaGetLastError();  // clear it; fall back to the portable limit
      v = kDefaultSmem;
    }
    cache[device] = v;
  }
  return cache[device];
}

size_t gemm_smem_bytes(const GemmParams& p) {
  const size_t xs_stride = static_cast<size_t>(p.wk) * kTileK + 8;
  const size_t x_bytes = (2 * static_cast<size_t>(p.m) * xs_stride + 8) * 2;
  const size_t red_bytes = static_cast<size_t>(p.wk - 1) * p.wn * (2 * nt_for(p.m) * 4) * 32 * sizeof(float);
  return x_bytes > red_bytes ? x_bytes : red_bytes;
}

int gemm_launch(const GemmParams& p, void* stream) {
  if (p.bits < 2 || p.bits > 4) return kErrBits;
  if (p.dtype != 0 && p.dtype != 1) return kErrDtype;
  if (p.m < 1 || p.m > kMaxRows) return kErrRows;
  if (p.n < 1 || p.k < 1 || p.kp % kTileK != 0 || p.kp < p.k || p.ntiles * kTileN < p.n || p.groups < 1 ||
      p.group_size * p.groups != p.k)
    return kErrShape;
  if (p.wn < 1 || p.wk < 1 || 32 * p.wn * p.wk > max_threads(nt_for(p.m))) return kErrBlock;
  if (p.splits < 1 || (p.splits > 1 && p.ws == nullptr)) return kErrSplit;
  if (gemm_smem_bytes(p) > static_cast<size_t>(gemm_max_smem(p.device))) return kErrSmem;

  int prev = -1;
  cudaError_t err = cudaGetDevice(&prev);
  if (err != cudaSuccess) return static_cast<int>(err);
  if (prev != p.device && (err = cudaSetDevice(p.device)) != cudaSuccess) return static_cast<int>(err);
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  err = p.dtype == 0 ? launch_bits<__half>(p, s) : launch_bits<__nv_bfloat16>(p, s);
  if (err == cudaSuccess) err = cudaGetLastError();
  if (prev != p.device) cudaSetDevice(prev);
  return static_cast<int>(err);
}

const char* gemm_error_string(int code) {
  switch (code) {
    case 0: return "ok";
    case kErrBits: return "bits must be 2, 3 or 4";
    case kErrDtype: return "x must be fp16 or bf16";
    case kErrRows: return "x must have 1..64 rows";
    case kErrShape: return "inconsistent shape parameters";
    case kErrBlock: return "invalid block shape (wn, wk)";
    case kErrSmem: return "shared memory for this (m, wn, wk) exceeds the device's per-block limit";
    case kErrSplit: return "split-K needs an fp32 workspace";
    default: return code > 0 ? cudaGetErrorString(static_cast<cudaError_t>(code)) : "unknown error";
  }
}

}  // namespace lowbit
