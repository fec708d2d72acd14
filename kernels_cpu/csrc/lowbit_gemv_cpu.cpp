// Low-bit GEMV/GEMM for 1-8 tokens on the CPU, straight from packed codes (no float weight is built).
//
//   y[m, n] = sum_g s[n,g] * (sum_{j in g} c[n,j] x[m,j] - z[n,g] * xsum[m,g])        (uniform, 2/3/4/8-bit)
//   y[m, n] = sum_g sum_j T[n,g][c[n,j]] x[m,j]                                       (DSQ, 1-4 sign planes)
//   y[m, n] = sum_g s[n,g] sum_j L[c[n,j]] x[m,j]                                     (codebook, 2-4 bits)
//   y[m, n] = sum_g s[n,g] sum_r E[c[n,rD..rD+D-1]] . x[m,rD..rD+D-1]                 (vector codebook, D = 2, 3)
//
// Both come in the "chunk8" layout (kernels_cpu/layout.py): every 8 consecutive codes of a row fill `bits` bytes,
// code i at bit bits*i, so one unaligned 32-bit load, a broadcast, a per-lane shift and a mask give 8 codes in 8
// lanes for every width (the AVX2 int8 body reads 3-bit codes in a layout of its own, split3). A DSQ code is weight j's B sign bits (bit k = plane k), and its value is a lookup in the
// group's table of 2^B entries, T[c] = sum_k r_k (2 bit_k(c) - 1): one permute per 8 or 16 codes, the cost of a
// uniform code's int-to-float conversion, instead of a masked sum per plane (B times the work). A codebook layer's
// group table is T[n,g] = s[n,g] L (its levels L, one per layer, times the group's scale), so it runs on the DSQ
// bodies with that table (CB below); its int8 tables are made the same way as DSQ's.
// Each row of weights is read once per call and reused from L1 for every token. Threads split the output
// features (at::parallel_for over torch's intra-op threads: the build adds -fopenmp, without which it runs
// serially). The AVX2/FMA/F16C, AVX-512 and AVX-512 VNNI bodies are chosen at run time; a portable body serves
// other CPUs (and is the reference the tests compare against). The int8 bodies (AVX-512 VNNI, and AVX2 where
// VNNI is missing) quantize the tokens to int8 per group and use integer dot products, as llama.cpp does; the
// others compute in float32.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#define LOWBIT_X86 1
#endif

namespace {

constexpr int MAX_M = 4;  // tokens per pass over a weight row (accumulators stay in registers)

inline float h2f(at::Half h) { return static_cast<float>(h); }

// code i (0..7) of the chunk8 run starting at code index j; 8-bit runs are plain bytes
template <int BITS>
inline uint32_t code_at(const uint8_t* row, int64_t j, int i) {
  if constexpr (BITS == 8) {
    return row[j + i];
  } else {
    uint32_t w;
    std::memcpy(&w, row + (j / 8) * BITS, 4);
    return (w >> (BITS * i)) & ((1u << BITS) - 1);
  }
}

// ---------------------------------------------------------------- portable
template <int BITS>
void uniform_rows_ref(const float* x, int64_t M, int64_t K, const uint8_t* codes, int64_t row_bytes,
                      const at::Half* scales, const uint8_t* zeros, int64_t G, int64_t gs, const float* xsum,
                      float* y, int64_t N, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = codes + n * row_bytes;
    for (int64_t m = 0; m < M; ++m) {
      double tot = 0;
      for (int64_t g = 0; g < G; ++g) {
        float acc = 0;
        for (int64_t j = g * gs; j < (g + 1) * gs; j += 8)
          for (int i = 0; i < 8; ++i) acc += float(code_at<BITS>(row, j, i)) * x[m * K + j + i];
        float s = h2f(scales[n * G + g]);
        tot += s * acc - s * float(zeros[n * G + g]) * xsum[m * G + g];
      }
      y[m * N + n] = float(tot);
    }
  }
}

// T[c] = sum_k r_k (2 bit_k(c) - 1) for the 2^B codes of one (row, group)
inline void dsq_table(const at::Half* r, int64_t B, float* t) {
  for (int c = 0; c < (1 << B); ++c) {
    t[c] = 0.f;
    for (int64_t k = 0; k < B; ++k) t[c] += (c >> k & 1 ? 1.f : -1.f) * h2f(r[k]);
  }
}

// A group's table of weight values: DSQ's from its B row scales; a codebook layer's (CB), its scale times the levels
template <int BITS, bool CB>
inline void group_table(const at::Half* rs_row, const float* levels, int64_t g, float* t) {
  if constexpr (CB) {
    const float s = h2f(rs_row[g]);
    for (int c = 0; c < (1 << BITS); ++c) t[c] = s * levels[c];
  } else {
    dsq_table(rs_row + g * BITS, BITS, t);
  }
}

// rs: DSQ's row scales [N, G, BITS], or (CB) a codebook layer's group scales [N, G]
template <int BITS, bool CB>
void dsq_rows_ref(const float* x, int64_t M, int64_t K, const uint8_t* codes, int64_t row_bytes,
                  const at::Half* rs, const float* levels, int64_t G, int64_t gs, float* y, int64_t N, int64_t n0,
                  int64_t n1) {
  float t[1 << BITS];
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = codes + n * row_bytes;
    for (int64_t m = 0; m < M; ++m) {
      double tot = 0;
      for (int64_t g = 0; g < G; ++g) {
        group_table<BITS, CB>(rs + n * G * (CB ? 1 : BITS), levels, g, t);
        float acc = 0;
        for (int64_t j = g * gs; j < (g + 1) * gs; j += 8)
          for (int i = 0; i < 8; ++i) acc += t[code_at<BITS>(row, j, i)] * x[m * K + j + i];
        tot += acc;
      }
      y[m * N + n] = float(tot);
    }
  }
}

#if LOWBIT_X86
// ---------------------------------------------------------------- AVX2 (every AVX2 CPU also has F16C)
__attribute__((target("avx2,fma,f16c"))) inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 8 codes of the chunk8 layout at code index j, as integers / as floats in 8 lanes (lambdas would not inherit
// the target)
template <int BITS>
__attribute__((target("avx2,fma,f16c"))) inline __m256i codes_avx2(const uint8_t* row, int64_t j) {
  if constexpr (BITS == 8) return _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + j)));
  const __m256i shifts = _mm256_setr_epi32(0, BITS, 2 * BITS, 3 * BITS, 4 * BITS, 5 * BITS, 6 * BITS, 7 * BITS);
  uint32_t w;
  std::memcpy(&w, row + (j / 8) * BITS, 4);
  return _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(int(w)), shifts), _mm256_set1_epi32((1 << BITS) - 1));
}

template <int BITS>
__attribute__((target("avx2,fma,f16c"))) inline __m256 chunk_avx2(const uint8_t* row, int64_t j) {
  return _mm256_cvtepi32_ps(codes_avx2<BITS>(row, j));
}

template <int BITS, int M>
__attribute__((target("avx2,fma,f16c"))) void uniform_row_avx2(const float* x, int64_t K, const uint8_t* row,
                                                                const at::Half* s_row, const uint8_t* z_row,
                                                                int64_t G, int64_t gs, const float* xsum,
                                                                float* y, int64_t N) {
  __m256 tot[M];
  float zterm[M];
  for (int m = 0; m < M; ++m) tot[m] = _mm256_setzero_ps(), zterm[m] = 0.f;
  constexpr int U = M <= 2 ? 4 : 2;  // independent sums per token: the FMA latency, not a chain of them
  for (int64_t g = 0; g < G; ++g) {
    __m256 acc[M][U];
    for (int m = 0; m < M; ++m)
      for (int u = 0; u < U; ++u) acc[m][u] = _mm256_setzero_ps();
    int64_t j = g * gs;
    const int64_t end = (g + 1) * gs;
    for (; j + 8 * U <= end; j += 8 * U) {
      for (int u = 0; u < U; ++u) {
        const __m256 c = chunk_avx2<BITS>(row, j + 8 * u);
        for (int m = 0; m < M; ++m) acc[m][u] = _mm256_fmadd_ps(c, _mm256_loadu_ps(x + m * K + j + 8 * u), acc[m][u]);
      }
    }
    for (; j < end; j += 8) {  // per-channel widths that are not a multiple of 8 * U
      const __m256 c = chunk_avx2<BITS>(row, j);
      for (int m = 0; m < M; ++m) acc[m][0] = _mm256_fmadd_ps(c, _mm256_loadu_ps(x + m * K + j), acc[m][0]);
    }
    const float s = _cvtsh_ss(reinterpret_cast<const uint16_t*>(s_row)[g]);
    const float sz = s * float(z_row[g]);
    const __m256 vs = _mm256_set1_ps(s);
    for (int m = 0; m < M; ++m) {
      __m256 sum = acc[m][0];
      for (int u = 1; u < U; ++u) sum = _mm256_add_ps(sum, acc[m][u]);
      tot[m] = _mm256_fmadd_ps(vs, sum, tot[m]);
      zterm[m] += sz * xsum[m * G + g];
    }
  }
  for (int m = 0; m < M; ++m) y[m * N] = hsum256(tot[m]) - zterm[m];
}

// lane c of DSQ_SIGNS[k]: +1 where bit k of c is set, else -1 (16 lanes: codes of up to 4 bits)
alignas(64) constexpr float DSQ_SIGNS[4][16] = {
    {-1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1, -1, 1},
    {-1, -1, 1, 1, -1, -1, 1, 1, -1, -1, 1, 1, -1, -1, 1, 1},
    {-1, -1, -1, -1, 1, 1, 1, 1, -1, -1, -1, -1, 1, 1, 1, 1},
    {-1, -1, -1, -1, -1, -1, -1, -1, 1, 1, 1, 1, 1, 1, 1, 1}};

// 8 DSQ codes at code index j looked up in the group's table: lo holds T[0..7], hi T[8..15] (4-bit codes only;
// vpermps reads the low 3 bits of each index, and bit 3 picks the half)
template <int BITS>
__attribute__((target("avx2,fma,f16c"))) inline __m256 lookup_avx2(const uint8_t* row, int64_t j, __m256 lo,
                                                                  __m256 hi) {
  const __m256i c = codes_avx2<BITS>(row, j);
  const __m256 w = _mm256_permutevar8x32_ps(lo, c);
  if constexpr (BITS < 4) return w;
  return _mm256_blendv_ps(w, _mm256_permutevar8x32_ps(hi, c), _mm256_castsi256_ps(_mm256_slli_epi32(c, 28)));
}

// levels: (CB) the layer's 2^BITS levels, padded with zeros to 16 floats, 64-byte aligned
template <int BITS, int M, bool CB>
__attribute__((target("avx2,fma,f16c"))) void dsq_row_avx2(const float* x, int64_t K, const uint8_t* row,
                                                            const at::Half* rs_row, const float* levels, int64_t G,
                                                            int64_t gs, float* y, int64_t N) {
  __m256 acc[M][2];
  for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();
    if constexpr (CB) {
      const __m256 s = _mm256_set1_ps(_cvtsh_ss(reinterpret_cast<const uint16_t*>(rs_row)[g]));
      lo = _mm256_mul_ps(s, _mm256_load_ps(levels));
      hi = _mm256_mul_ps(s, _mm256_load_ps(levels + 8));
    } else {
      for (int k = 0; k < BITS; ++k) {
        const __m256 r = _mm256_set1_ps(_cvtsh_ss(reinterpret_cast<const uint16_t*>(rs_row)[g * BITS + k]));
        lo = _mm256_fmadd_ps(r, _mm256_load_ps(DSQ_SIGNS[k]), lo);
        hi = _mm256_fmadd_ps(r, _mm256_load_ps(DSQ_SIGNS[k] + 8), hi);
      }
    }
    int64_t j = g * gs;
    const int64_t end = (g + 1) * gs;
    for (; j + 16 <= end; j += 16) {  // two independent sums: the FMA latency, not a chain of them
      const __m256 w0 = lookup_avx2<BITS>(row, j, lo, hi), w1 = lookup_avx2<BITS>(row, j + 8, lo, hi);
      for (int m = 0; m < M; ++m) {
        acc[m][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * K + j), acc[m][0]);
        acc[m][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + m * K + j + 8), acc[m][1]);
      }
    }
    if (j < end) {  // groups are multiples of 8
      const __m256 w = lookup_avx2<BITS>(row, j, lo, hi);
      for (int m = 0; m < M; ++m) acc[m][0] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + m * K + j), acc[m][0]);
    }
  }
  for (int m = 0; m < M; ++m) y[m * N] = hsum256(_mm256_add_ps(acc[m][0], acc[m][1]));
}

// ---------------------------------------------------------------- AVX2 with int8 tokens (vpmaddubsw)
// As the VNNI body does, with AVX2's u8 x s8 pair products (vpmaddubsw, then vpmaddwd into 32-bit sums): 32 codes
// a step instead of 8 floats. The 32 codes are unpacked to bytes in whatever order is cheapest for the width
// (avx2_order below), and the int8 tokens are put in the same order once per call (Int8Tokens), so no code has
// to be moved into place. DSQ codes are looked up (vpshufb) in the group's table of 2^B values rounded to 7-bit
// steps t = sum_k |r_k| / 63 (no T[c] is larger; made once per layer, kernels_cpu/layout.py dsq_tables) and offset
// by 64, so that they are unsigned (1..127: a pair of products stays inside int16); the offset comes back out
// through the tokens' group sums:
//   uniform:  y[m, n] = sum_g s dx (sum_{j in g} c xq - z sum_{j in g} xq)
//   DSQ:      y[m, n] = sum_g t dx (sum_{j in g} T'[c] xq - 64 sum_{j in g} xq),  T'[c] = round(T[c] / t) + 64
// Groups must be multiples of 32 codes of 2-4 bits; others take the float body. 3-bit codes (uniform, and DSQ's
// three planes) come in the split3 layout here, chunk8 everywhere else.

// Which of the 32 codes of a step lands in byte p of bytes32_avx2<BITS>'s output.
constexpr int avx2_order(int bits, int p) {
  return bits == 4 ? (p < 16 ? 2 * p : 2 * (p - 16) + 1)  // low nibbles, then high nibbles
                   : 4 * (p % 8) + p / 8;                // 2 and 3 bits: 64-bit lane l, byte b: code 4b + l
}

// The 32 codes at code index j (a multiple of 32) as bytes, in avx2_order. 3-bit codes come in this body's own
// layout, "split3" (kernels_cpu/layout.py): per 32 codes, their low 2 bits as 2-bit codes are (8 bytes), then
// their high bits (4 bytes) in the order one per-lane shift puts them in, so no multiply or shuffle unpacks them.
template <int BITS>
__attribute__((target("avx2,fma,f16c"))) inline __m256i bytes32_avx2(const uint8_t* row, int64_t j) {
  const uint8_t* p = row + (j / 8) * BITS;
  if constexpr (BITS == 4) {
    const __m256i w = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_and_si256(_mm256_srlv_epi32(w, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)), _mm256_set1_epi8(15));
  } else {
    static_assert(BITS == 2 || BITS == 3, "2, 3 or 4 bits");
    int64_t w;
    std::memcpy(&w, p, 8);
    const __m256i lo = _mm256_and_si256(_mm256_srlv_epi64(_mm256_set1_epi64x(w), _mm256_setr_epi64x(0, 2, 4, 6)),
                                        _mm256_set1_epi8(3));
    if constexpr (BITS == 2) return lo;
    // split3's high bits: byte b of 32-bit lane l (output byte 4l + b) takes bit 8b + l
    int32_t h;
    std::memcpy(&h, p + 8, 4);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i hi = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(h), lane), _mm256_set1_epi8(1));
    return _mm256_or_si256(lo, _mm256_slli_epi16(hi, 2));
  }
}

// A DSQ group's table T'[c] = T[c] / t + 64 of 2 or 3 planes (its 4 or 8 bytes, kernels_cpu/layout.py
// dsq_tables) as 8 bytes, the 4 twice: what both int8 bodies broadcast along a register (4 planes: 16 bytes, a
// 128-bit broadcast). A table that repeats is read right by vpshufb (codes below 16) in either lane, and by vpermb
// whatever lies above a code's bits (see dsq_table_vnni).
template <int B>
inline int64_t dsq_table8(const uint8_t* table) {
  static_assert(B == 2 || B == 3, "2 or 3 planes");
  if constexpr (B == 3) {
    int64_t w;
    std::memcpy(&w, table, 8);
    return w;
  }
  uint32_t w;
  std::memcpy(&w, table, 4);
  return int64_t(uint64_t(w) * 0x100000001ull);
}

template <int B>
__attribute__((target("avx2,fma,f16c"))) inline __m256i dsq_table_avx2(const uint8_t* table) {
  if constexpr (B == 4) return _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(table)));
  else return _mm256_set1_epi64x(dsq_table8<B>(table));
}

// Uniform: scale fp16 [G] and zeros uint8 [G] of the row. DSQ: scale is the row's group steps t (fp16 [G]) and
// zeros its tables (2^B bytes a group, table_stride apart: 0 for a codebook layer's one table), as
// kernels_cpu/layout.py dsq_tables / codebook_tables lay them out.
template <int BITS, int M, bool DSQ>
__attribute__((target("avx2,fma,f16c"))) void int8_row_avx2(const int8_t* xq, int64_t K, const uint8_t* row,
                                                             const at::Half* scale, const uint8_t* zeros,
                                                             int64_t G, int64_t gs, const float* dx,
                                                             const float* dxsum, float* y, int64_t N,
                                                             int64_t table_stride = 1 << BITS) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 tot[M];
  float offset[M];
  for (int m = 0; m < M; ++m) tot[m] = _mm256_setzero_ps(), offset[m] = 0.f;
  for (int64_t g = 0; g < G; ++g) {
    const float s = _cvtsh_ss(reinterpret_cast<const uint16_t*>(scale)[g]);
    float z = 64.f;
    __m256i table = _mm256_setzero_si256();
    if constexpr (DSQ)
      table = dsq_table_avx2<BITS>(zeros + g * table_stride);
    else
      z = float(zeros[g]);
    __m256i acc[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_si256();
    for (int64_t j = g * gs; j < (g + 1) * gs; j += 32) {
      __m256i c = bytes32_avx2<BITS>(row, j);
      if constexpr (DSQ) c = _mm256_shuffle_epi8(table, c);
      for (int m = 0; m < M; ++m)
        acc[m] = _mm256_add_epi32(
            acc[m], _mm256_madd_epi16(
                        _mm256_maddubs_epi16(c, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * K + j))),
                        ones));
    }
    for (int m = 0; m < M; ++m) {
      tot[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[m]), _mm256_set1_ps(s * dx[m * G + g]), tot[m]);
      offset[m] += s * z * dxsum[m * G + g];
    }
  }
  for (int m = 0; m < M; ++m) y[m * N] = hsum256(tot[m]) - offset[m];
}

__attribute__((target("avx2"))) inline __m256i load32(const int8_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

// Group g's integer dot product of uniform codes and int8 tokens, as 8 partial sums. A step's pair products
// (vpmaddubsw) are at most 2 * 15 * 127 in magnitude, so two steps add up in int16 before one widening vpmaddwd.
// (Not for DSQ: its table bytes reach 127.)
template <int BITS, int GS = 0>
__attribute__((target("avx2,fma,f16c"))) inline __m256i group_dot_avx2(const int8_t* xq, const uint8_t* row,
                                                                        int64_t g, int64_t gs) {
  if constexpr (GS > 0) gs = GS;
  __m256i acc = _mm256_setzero_si256();
  for (int64_t j = g * gs; j < (g + 1) * gs; j += 64) {  // groups are multiples of 32: a lone step at the end
    __m256i sum16 = _mm256_maddubs_epi16(bytes32_avx2<BITS>(row, j), load32(xq + j));
    if (j + 32 < (g + 1) * gs)
      sum16 = _mm256_add_epi16(sum16, _mm256_maddubs_epi16(bytes32_avx2<BITS>(row, j + 32), load32(xq + j + 32)));
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(sum16, _mm256_set1_epi16(1)));
  }
  return acc;
}

// One token and uniform codes (batch-1 decode, the common case): the per-group float work above (a scale
// converted, a broadcast, a multiply-add per group) costs more than the group's integer dot products at group 64.
// Here 8 groups' integer sums are reduced together (a vphaddd tree: 8 vectors of partial sums -> one vector, lane
// i = group g0 + i), and scales, zeros and token factors are applied 8 groups at a time. With group_dot_avx2's
// int16 pairs, 1.2-1.6x faster than the general body on SmolLM2's INT4 layers (AVX2 EPYC, one token, 2 threads).
// A tail of fewer than 8 groups takes the per-group path.
template <int BITS, int GS = 0>
__attribute__((target("avx2,fma,f16c"))) void int8_row1_avx2(const int8_t* xq, const uint8_t* row,
                                                              const at::Half* scale, const uint8_t* zeros, int64_t G,
                                                              int64_t gs, const float* dx, const float* dxsum,
                                                              float* y) {
  __m256 tot = _mm256_setzero_ps(), zt = _mm256_setzero_ps();
  int64_t g0 = 0;
  for (; g0 + 8 <= G; g0 += 8) {
    __m256i a[8];
    for (int i = 0; i < 8; ++i) a[i] = group_dot_avx2<BITS, GS>(xq, row, g0 + i, gs);
    const __m256i q0 = _mm256_hadd_epi32(_mm256_hadd_epi32(a[0], a[1]), _mm256_hadd_epi32(a[2], a[3]));
    const __m256i q1 = _mm256_hadd_epi32(_mm256_hadd_epi32(a[4], a[5]), _mm256_hadd_epi32(a[6], a[7]));
    const __m256i sums = _mm256_add_epi32(_mm256_permute2x128_si256(q0, q1, 0x20),
                                          _mm256_permute2x128_si256(q0, q1, 0x31));
    const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scale + g0)));
    const __m128i z8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(zeros + g0));
    const __m256 z = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(z8));
    tot = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_mul_ps(s, _mm256_loadu_ps(dx + g0)), tot);
    zt = _mm256_fmadd_ps(_mm256_mul_ps(s, z), _mm256_loadu_ps(dxsum + g0), zt);
  }
  float rest = 0.f;
  for (; g0 < G; ++g0) {
    const float s = _cvtsh_ss(reinterpret_cast<const uint16_t*>(scale)[g0]);
    const float sum = hsum256(_mm256_cvtepi32_ps(group_dot_avx2<BITS, GS>(xq, row, g0, gs)));
    rest += s * (dx[g0] * sum - float(zeros[g0]) * dxsum[g0]);
  }
  *y = hsum256(_mm256_sub_ps(tot, zt)) + rest;
}

// ---------------------------------------------------------------- AVX-512 (16 codes per step)
// 16 codes (two chunk8 runs) at code index j, as integers / as floats in 16 lanes
template <int BITS>
__attribute__((target("avx512f,avx512bw,fma,f16c"))) inline __m512i codes_avx512(const uint8_t* row, int64_t j) {
  if constexpr (BITS == 8) return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + j)));
  const __m512i shifts = _mm512_setr_epi32(0, BITS, 2 * BITS, 3 * BITS, 4 * BITS, 5 * BITS, 6 * BITS, 7 * BITS, 0,
                                           BITS, 2 * BITS, 3 * BITS, 4 * BITS, 5 * BITS, 6 * BITS, 7 * BITS);
  uint32_t w0, w1;
  std::memcpy(&w0, row + (j / 8) * BITS, 4);
  std::memcpy(&w1, row + (j / 8 + 1) * BITS, 4);
  __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set1_epi32(int(w0))), _mm256_set1_epi32(int(w1)), 1);
  return _mm512_and_si512(_mm512_srlv_epi32(v, shifts), _mm512_set1_epi32((1 << BITS) - 1));
}

template <int BITS>
__attribute__((target("avx512f,avx512bw,fma,f16c"))) inline __m512 step_avx512(const uint8_t* row, int64_t j) {
  return _mm512_cvtepi32_ps(codes_avx512<BITS>(row, j));
}

template <int BITS, int M>
__attribute__((target("avx512f,avx512bw,fma,f16c"))) void uniform_row_avx512(
    const float* x, int64_t K, const uint8_t* row, const at::Half* s_row, const uint8_t* z_row, int64_t G,
    int64_t gs, const float* xsum, float* y, int64_t N) {
  const __m512i shifts = _mm512_setr_epi32(0, BITS, 2 * BITS, 3 * BITS, 4 * BITS, 5 * BITS, 6 * BITS, 7 * BITS, 0,
                                           BITS, 2 * BITS, 3 * BITS, 4 * BITS, 5 * BITS, 6 * BITS, 7 * BITS);
  const __m512i mask = _mm512_set1_epi32((1 << BITS) - 1);
  __m512 tot[M];
  float zterm[M];
  for (int m = 0; m < M; ++m) tot[m] = _mm512_setzero_ps(), zterm[m] = 0.f;
  constexpr int U = 2;  // two independent sums per token (a group of 32 is two steps of 16)
  for (int64_t g = 0; g < G; ++g) {
    __m512 acc[M][U];
    for (int m = 0; m < M; ++m)
      for (int u = 0; u < U; ++u) acc[m][u] = _mm512_setzero_ps();
    int64_t j = g * gs;
    const int64_t end = (g + 1) * gs;
    for (; j + 16 * U <= end; j += 16 * U) {
      for (int u = 0; u < U; ++u) {
        const __m512 c = step_avx512<BITS>(row, j + 16 * u);
        for (int m = 0; m < M; ++m) acc[m][u] = _mm512_fmadd_ps(c, _mm512_loadu_ps(x + m * K + j + 16 * u), acc[m][u]);
      }
    }
    for (; j + 16 <= end; j += 16) {
      const __m512 c = step_avx512<BITS>(row, j);
      for (int m = 0; m < M; ++m) acc[m][0] = _mm512_fmadd_ps(c, _mm512_loadu_ps(x + m * K + j), acc[m][0]);
    }
    for (; j < end; j += 8) {  // a group of 8 * odd codes (per-channel widths)
      __m512 c;
      if constexpr (BITS == 8) {
        c = _mm512_cvtepi32_ps(_mm512_maskz_cvtepu8_epi32(0xFF, _mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + j))));
      } else {
        uint32_t w;
        std::memcpy(&w, row + (j / 8) * BITS, 4);
        __m512i v = _mm512_castsi256_si512(_mm256_set1_epi32(int(w)));
        c = _mm512_cvtepi32_ps(_mm512_maskz_and_epi32(0xFF, _mm512_srlv_epi32(v, shifts), mask));
      }
      for (int m = 0; m < M; ++m)
        acc[m][1] = _mm512_fmadd_ps(c, _mm512_maskz_loadu_ps(0xFF, x + m * K + j), acc[m][1]);
    }
    const float s = _cvtsh_ss(reinterpret_cast<const uint16_t*>(s_row)[g]);
    const float sz = s * float(z_row[g]);
    const __m512 vs = _mm512_set1_ps(s);
    for (int m = 0; m < M; ++m) {
      tot[m] = _mm512_fmadd_ps(vs, _mm512_add_ps(acc[m][0], acc[m][1]), tot[m]);
      zterm[m] += sz * xsum[m * G + g];
    }
  }
  for (int m = 0; m < M; ++m) y[m * N] = _mm512_reduce_add_ps(tot[m]) - zterm[m];
}

// DSQ: 16 codes a step, looked up in the group's table of up to 16 entries by one vpermps
template <int BITS, int M, bool CB>
__attribute__((target("avx512f,avx512bw,fma,f16c"))) void dsq_row_avx512(
    const float* x, int64_t K, const uint8_t* row, const at::Half* rs_row, const float* levels, int64_t G,
    int64_t gs, float* y, int64_t N) {
  __m512 acc[M][2];
  for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512 t = _mm512_setzero_ps();
    if constexpr (CB)
      t = _mm512_mul_ps(_mm512_set1_ps(_cvtsh_ss(reinterpret_cast<const uint16_t*>(rs_row)[g])),
                        _mm512_load_ps(levels));
    else
      for (int k = 0; k < BITS; ++k)
        t = _mm512_fmadd_ps(_mm512_set1_ps(_cvtsh_ss(reinterpret_cast<const uint16_t*>(rs_row)[g * BITS + k])),
                            _mm512_load_ps(DSQ_SIGNS[k]), t);
    int64_t j = g * gs;
    const int64_t end = (g + 1) * gs;
    for (; j + 32 <= end; j += 32) {  // two independent sums
      const __m512 w0 = _mm512_permutexvar_ps(codes_avx512<BITS>(row, j), t);
      const __m512 w1 = _mm512_permutexvar_ps(codes_avx512<BITS>(row, j + 16), t);
      for (int m = 0; m < M; ++m) {
        acc[m][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + m * K + j), acc[m][0]);
        acc[m][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + m * K + j + 16), acc[m][1]);
      }
    }
    for (; j < end; j += 16) {  // 16 or (groups are multiples of 8) 8 codes left: the x lanes past the group are 0
      const __mmask16 live = end - j >= 16 ? __mmask16(0xFFFF) : __mmask16(0xFF);
      const __m512 w = _mm512_permutexvar_ps(codes_avx512<BITS>(row, j), t);
      for (int m = 0; m < M; ++m)
        acc[m][0] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(live, x + m * K + j), acc[m][0]);
    }
  }
  for (int m = 0; m < M; ++m) y[m * N] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]));
}


// ---------------------------------------------------------------- AVX-512 VNNI + VBMI (int8 activations)
// As llama.cpp does on the CPU: the tokens are quantized to int8 per group (scale = max|x| / 127, computed once
// per call), and codes meet activations in integer dot products (vpdpbusd: 64 u8 x s8 products per instruction)
// instead of being converted to floats. 64 codes per step: their 8 * BITS bytes are spread one run per 64-bit
// lane (vpermb) and vpmultishiftqb pulls code i of the run from bit BITS * i into byte i.
//   y[m, n] = sum_g s[n,g] dx[m,g] (sum_{j in g} c[n,j] xq[m,j] - z[n,g] sum_{j in g} xq[m,j])
// Groups must be multiples of 64 codes; others use the float AVX-512 body. DSQ codes of 2-4 planes: looked up in
// their group's table (uniform_row_vnni); of one plane: dsq_row_vnni below.
// MASK false: the codes' bytes keep the bits above them (for a lookup that reads only its low bits).
template <int BITS, bool MASK = true>
__attribute__((target("avx512f,avx512bw,avx512vnni,avx512vbmi,fma,f16c"))) inline __m512i codes64_vnni(
    const uint8_t* row, int64_t j) {
  if constexpr (BITS == 8) {
    return _mm512_loadu_si512(row + j);
  } else {
    alignas(64) static const auto tables = [] {
      struct { uint8_t perm[64]; uint8_t shift[64]; } t{};
      for (int r = 0; r < 8; ++r)
        for (int b = 0; b < 8; ++b) {
          t.perm[8 * r + b] = uint8_t(r * BITS + (b < BITS ? b : BITS - 1));
          t.shift[8 * r + b] = uint8_t(BITS * b);
        }
      return t;
    }();
    const __m512i raw = _mm512_maskz_loadu_epi8((__mmask64(1) << (8 * BITS)) - 1, row + (j / 8) * BITS);
    const __m512i spread = _mm512_permutexvar_epi8(_mm512_load_si512(tables.perm), raw);
    const __m512i shifted = _mm512_multishift_epi64_epi8(_mm512_load_si512(tables.shift), spread);
    return MASK ? _mm512_and_si512(shifted, _mm512_set1_epi8(char((1 << BITS) - 1))) : shifted;
  }
}

// A DSQ group's table (its 2^B bytes, as dsq_table_avx2 reads them) repeated along a 512-bit register: vpermb
// reads the low 6 bits of each code, and the table repeats every 2^B bytes, so the bits above a code's B (left
// there by codes64_vnni<B, false>) pick a copy of its entry rather than needing a mask.
template <int B>
__attribute__((target("avx512f,avx512bw,avx512vnni,avx512vbmi"))) inline __m512i dsq_table_vnni(
    const uint8_t* table) {
  if constexpr (B == 4) return _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(table)));
  else return _mm512_set1_epi64(dsq_table8<B>(table));
}

// The per-group factors s dx and the zero-point term sum_g s z dx sum xq are made 16 groups at a time (vector
// loads of the fp16 scales and uint8 zeros) rather than one group at a time in scalar code; two accumulators
// alternate between groups so that consecutive FMAs do not wait on each other. DSQ (2-4 planes): s_row holds the
// row's group steps t and z_row its tables (kernels_cpu/layout.py dsq_tables); each code is looked up in its
// group's table T'[c] = T[c] / t + 64 (vpermb, one a 64-code step, in place of the uniform codes' mask) and
// z = 64: the uniform body's work, where the per-plane body below does B dot products.
template <int BITS, int M, bool DSQ = false>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,fma,f16c"))) void uniform_row_vnni(
    const int8_t* xq, int64_t K, const uint8_t* row, const at::Half* s_row, const uint8_t* z_row, int64_t G,
    int64_t gs, const float* dx, const float* dxs, float* y, int64_t N, int64_t table_stride = 1 << BITS) {
  __m512 tot[2][M], zt[M];
  for (int m = 0; m < M; ++m) tot[0][m] = tot[1][m] = zt[m] = _mm512_setzero_ps();
  alignas(64) float coef[M][16];
  for (int64_t g0 = 0; g0 < G; g0 += 16) {
    const int64_t n = std::min<int64_t>(16, G - g0);
    const __mmask16 live = n == 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1);
    const __m512 s = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(live, s_row + g0));
    const __m512 z = DSQ ? _mm512_set1_ps(64.f)
                         : _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(live, z_row + g0)));
    const __m512 sz = _mm512_mul_ps(s, z);
    for (int m = 0; m < M; ++m) {
      _mm512_store_ps(coef[m], _mm512_mul_ps(s, _mm512_maskz_loadu_ps(live, dx + m * G + g0)));
      zt[m] = _mm512_fmadd_ps(sz, _mm512_maskz_loadu_ps(live, dxs + m * G + g0), zt[m]);
    }
    for (int64_t g = g0; g < g0 + n; ++g) {
      __m512i acc[M];
      for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_si512();
      __m512i table = _mm512_setzero_si512();
      if constexpr (DSQ) table = dsq_table_vnni<BITS>(z_row + g * table_stride);
      for (int64_t j = g * gs; j < (g + 1) * gs; j += 64) {
        __m512i c = codes64_vnni<BITS, !DSQ>(row, j);
        if constexpr (DSQ) c = _mm512_permutexvar_epi8(c, table);
        for (int m = 0; m < M; ++m) acc[m] = _mm512_dpbusd_epi32(acc[m], c, _mm512_loadu_si512(xq + m * K + j));
      }
      for (int m = 0; m < M; ++m)
        tot[g & 1][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[m]), _mm512_set1_ps(coef[m][g - g0]), tot[g & 1][m]);
    }
  }
  for (int m = 0; m < M; ++m)
    y[m * N] = _mm512_reduce_add_ps(_mm512_sub_ps(_mm512_add_ps(tot[0][m], tot[1][m]), zt[m]));
}

// One-plane DSQ codes with int8 tokens (the body of every width before the tables, and still correct for
// any): plane k's sign bits of 64 codes (bit k of their codes, vptestmb) become bytes 0/1
// under a mask (vmovdqu8) and meet the tokens in vpdpbusd; y = sum_g sum_k r_k dx (2 sum_{bit=1} xq - sum xq).
// Each plane has its own float accumulator (B independent FMA chains, not one chain B times as long), and the
// factors 2 r_k dx are made 16 at a time from the row's fp16 scales and the call's dx2 = 2 dx (repeated per plane)
// rather than one by one; dxs = dx * sum xq likewise gives the sum-of-tokens term as one dot product per 16
// (group, plane) pairs.
template <int B, int M>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,fma,f16c"))) void dsq_row_vnni(
    const int8_t* xq, int64_t K, const uint8_t* row, const at::Half* rs_row, int64_t G, int64_t gs,
    const float* dx2, const float* dxs, float* y, int64_t N) {
  constexpr int64_t CHUNK = 16;  // groups whose factors are made at once: 16 * B <= 64 floats
  const __m512i one = _mm512_set1_epi8(1);
  const int64_t GB = G * B;
  __m512 tot[B][M], xt[M];
  for (int m = 0; m < M; ++m) {
    xt[m] = _mm512_setzero_ps();
    for (int k = 0; k < B; ++k) tot[k][m] = _mm512_setzero_ps();
  }
  alignas(64) float coef[M][CHUNK * B];
  for (int64_t g0 = 0; g0 < G; g0 += CHUNK) {
    const int64_t n_pairs = std::min<int64_t>(CHUNK, G - g0) * B;
    for (int64_t i = 0; i < n_pairs; i += 16) {
      const int64_t at = g0 * B + i;
      const __mmask16 live = n_pairs - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n_pairs - i)) - 1);
      const __m512 r = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(live, rs_row + at));
      for (int m = 0; m < M; ++m) {
        _mm512_store_ps(coef[m] + i, _mm512_mul_ps(r, _mm512_maskz_loadu_ps(live, dx2 + m * GB + at)));
        xt[m] = _mm512_fmadd_ps(r, _mm512_maskz_loadu_ps(live, dxs + m * GB + at), xt[m]);
      }
    }
    for (int64_t g = g0; g < g0 + n_pairs / B; ++g) {
      __m512i acc[B][M];
      for (int k = 0; k < B; ++k)
        for (int m = 0; m < M; ++m) acc[k][m] = _mm512_setzero_si512();
      for (int64_t j = g * gs; j < (g + 1) * gs; j += 64) {
        __m512i xv[M];
        for (int m = 0; m < M; ++m) xv[m] = _mm512_loadu_si512(xq + m * K + j);
        const __m512i code = codes64_vnni<B>(row, j);
        for (int k = 0; k < B; ++k) {
          const __m512i c = _mm512_maskz_mov_epi8(_mm512_test_epi8_mask(code, _mm512_set1_epi8(char(1 << k))), one);
          for (int m = 0; m < M; ++m) acc[k][m] = _mm512_dpbusd_epi32(acc[k][m], c, xv[m]);
        }
      }
      for (int k = 0; k < B; ++k)
        for (int m = 0; m < M; ++m)
          tot[k][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[k][m]), _mm512_set1_ps(coef[m][(g - g0) * B + k]),
                                      tot[k][m]);
    }
  }
  for (int m = 0; m < M; ++m) {
    __m512 sum = tot[0][m];
    for (int k = 1; k < B; ++k) sum = _mm512_add_ps(sum, tot[k][m]);
    y[m * N] = _mm512_reduce_add_ps(_mm512_sub_ps(sum, xt[m]));
  }
}
#endif  // LOWBIT_X86

// ---------------------------------------------------------------- dispatch
// Instruction-set levels (the isa argument): 0 portable, 1 AVX2, 2 AVX-512 (both float tokens), 3 int8 tokens on
// the best body the CPU has for them (AVX-512 VNNI, else AVX2). Below 0: the best, int8 tokens included.
enum class Isa { Ref = 0, Avx2 = 1, Avx512 = 2, Vnni = 3, Avx2Int8 = 4 };

Isa best_isa() {  // the best float-token level, or Vnni
#if LOWBIT_X86
  static const Isa isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) {
      if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vbmi") &&
          __builtin_cpu_supports("avx512vl"))
        return Isa::Vnni;
      return Isa::Avx512;
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::Avx2;
    return Isa::Ref;
  }();
  return isa;
#else
  return Isa::Ref;
#endif
}

// The body that serves a call: the level asked for, capped at the CPU's; the int8 bodies need groups of 64
// (VNNI) or of 32 with 2-4 bits (AVX2; 1-bit DSQ and 8-bit codes stay float), else the best float body serves.
Isa body(int64_t isa, int64_t gs, int64_t bits) {
  const Isa best = best_isa();
  if (isa >= 0 && isa < 3) return static_cast<Isa>(std::min<int64_t>(isa, int64_t(best)));
  if (best == Isa::Vnni && gs % 64 == 0) return Isa::Vnni;
  if (best != Isa::Ref && gs % 32 == 0 && bits >= 2 && bits <= 4) return Isa::Avx2Int8;
  return best == Isa::Vnni ? Isa::Avx512 : best;
}

bool is_int8(Isa b) { return b == Isa::Vnni || b == Isa::Avx2Int8; }

torch::Tensor group_sums(const torch::Tensor& x, int64_t gs) {
  return x.view({x.size(0), x.size(1) / gs, gs}).sum(-1).contiguous();  // [M, G]
}

#if LOWBIT_X86
// One group of tokens (a multiple of 32) to int8 in order, as the scalar loop below computes it (x * inv in
// float32, rounded to nearest even as nearbyint does): a libm call per token cost ~1 ms a decoded token.
__attribute__((target("avx2,fma,f16c"))) int32_t quantize_group_avx2(const float* x, int64_t gs, int8_t* q,
                                                                      float* amax_out) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 m = _mm256_setzero_ps();
  for (int64_t j = 0; j < gs; j += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + j)));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_movehdup_ps(h));
  const float amax = _mm_cvtss_f32(h);
  *amax_out = amax;
  const __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undoes the lane-wise packs
  __m256i total = _mm256_setzero_si256();
  for (int64_t j = 0; j < gs; j += 32) {
    __m256i v[4];
    for (int u = 0; u < 4; ++u) {
      v[u] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + j + 8 * u), inv));
      total = _mm256_add_epi32(total, v[u]);
    }
    const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + j), _mm256_permutevar8x32_epi32(b, order));
  }
  __m128i t = _mm_add_epi32(_mm256_castsi256_si128(total), _mm256_extracti128_si256(total, 1));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
  return _mm_cvtsi128_si32(t);
}
#endif

// The tokens in int8 for the int8 bodies, per (token, group): dx = max|x| / 127, q = round(x / dx) in
// [-127, 127], dxsum = dx * the sum of q. order_bits: the AVX2 body's order of each 32 tokens (avx2_order), or 0.
// (The int8 bodies run only on AVX2 CPUs, and their groups are multiples of 32.)
struct Int8Tokens {
  std::vector<int8_t> q;
  std::vector<float> dx, dxsum;
  Int8Tokens(const float* x, int64_t M, int64_t K, int64_t gs, int order_bits = 0)
      : q(M * K), dx(M * K / gs), dxsum(M * K / gs) {
#if LOWBIT_X86
    int order[32];
    for (int p = 0; p < 32; ++p) order[p] = order_bits ? avx2_order(order_bits, p) : p;
#endif
    for (int64_t mg = 0; mg < M * K / gs; ++mg) {
      const float* xg = x + mg * gs;
      int8_t* qg = q.data() + mg * gs;
      float amax = 0.f;
      int32_t total = 0;
#if LOWBIT_X86
      total = quantize_group_avx2(xg, gs, qg, &amax);
      if (order_bits)
        for (int64_t j = 0; j < gs; j += 32) {
          int8_t run[32];
          std::memcpy(run, qg + j, 32);
          for (int p = 0; p < 32; ++p) qg[j + p] = run[order[p]];
        }
#else
      for (int64_t j = 0; j < gs; ++j) amax = std::max(amax, std::abs(xg[j]));
      const float inv = amax > 0.f ? 127.f / amax : 0.f;
      for (int64_t j = 0; j < gs; ++j) total += qg[j] = int8_t(std::nearbyint(xg[j] * inv));
#endif
      dx[mg] = amax / 127.f;
      dxsum[mg] = dx[mg] * float(total);
    }
  }
};

// Threads split the output rows; each row is read once per block of up to MAX_M tokens and stays in L1 between
// blocks. f(std::integral_constant<int, MM>, n, m0) computes row n for tokens m0 .. m0 + MM - 1.
template <typename F>
void each_row(int64_t N, int64_t M, const F& f) {
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t m0 = 0; m0 < M; m0 += MAX_M) switch (std::min<int64_t>(M - m0, MAX_M)) {
          case 1: f(std::integral_constant<int, 1>(), n, m0); break;
          case 2: f(std::integral_constant<int, 2>(), n, m0); break;
          case 3: f(std::integral_constant<int, 3>(), n, m0); break;
          default: f(std::integral_constant<int, 4>(), n, m0); break;
        }
  });
}

template <int BITS>
void uniform_impl(Isa isa, const float* x, int64_t M, int64_t K, const uint8_t* codes, int64_t row_bytes,
                  const at::Half* s, const uint8_t* z, int64_t G, int64_t gs, const float* xs, float* y, int64_t N) {
  if (isa == Isa::Ref)
    return at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      uniform_rows_ref<BITS>(x, M, K, codes, row_bytes, s, z, G, gs, xs, y, N, n0, n1);
    });
#if LOWBIT_X86
  if (isa == Isa::Vnni) {
    const Int8Tokens t(x, M, K, gs);
    return each_row(N, M, [&](auto mm, int64_t n, int64_t m0) {
      uniform_row_vnni<BITS, decltype(mm)::value>(t.q.data() + m0 * K, K, codes + n * row_bytes, s + n * G,
                                                  z + n * G, G, gs, t.dx.data() + m0 * G, t.dxsum.data() + m0 * G,
                                                  y + m0 * N + n, N);
    });
  }
  if constexpr (BITS >= 2 && BITS <= 4) {
    if (isa == Isa::Avx2Int8) {
      const Int8Tokens t(x, M, K, gs, BITS);
      if (M == 1) {  // batch-1 decode: groups of 64 with their steps unrolled
        const auto row1 = gs == 64 ? int8_row1_avx2<BITS, 64> : int8_row1_avx2<BITS>;
        return at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
          for (int64_t n = n0; n < n1; ++n)
            row1(t.q.data(), codes + n * row_bytes, s + n * G, z + n * G, G, gs, t.dx.data(), t.dxsum.data(), y + n);
        });
      }
      return each_row(N, M, [&](auto mm, int64_t n, int64_t m0) {
        int8_row_avx2<BITS, decltype(mm)::value, false>(t.q.data() + m0 * K, K, codes + n * row_bytes, s + n * G,
                                                        z + n * G, G, gs, t.dx.data() + m0 * G,
                                                        t.dxsum.data() + m0 * G, y + m0 * N + n, N);
      });
    }
  }
  each_row(N, M, [&](auto mm, int64_t n, int64_t m0) {
    constexpr int MM = decltype(mm)::value;
    const float* xm = x + m0 * K;
    if (isa == Isa::Avx512)
      uniform_row_avx512<BITS, MM>(xm, K, codes + n * row_bytes, s + n * G, z + n * G, G, gs, xs + m0 * G,
                                   y + m0 * N + n, N);
    else
      uniform_row_avx2<BITS, MM>(xm, K, codes + n * row_bytes, s + n * G, z + n * G, G, gs, xs + m0 * G,
                                 y + m0 * N + n, N);
  });
#endif
}

// CB: a codebook layer (rs its group scales [N, G], levels its 16 padded levels); else DSQ (rs [N, G, B])
template <int B, bool CB>
void dsq_impl(Isa isa, const float* x, int64_t M, int64_t K, const uint8_t* codes, int64_t row_bytes,
              const at::Half* rs, const float* levels, const uint8_t* tables, int64_t G, int64_t gs, float* y,
              int64_t N) {
  const int64_t rs_row = G * (CB ? 1 : B);
  if (isa == Isa::Ref)
    return at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      dsq_rows_ref<B, CB>(x, M, K, codes, row_bytes, rs, levels, G, gs, y, N, n0, n1);
    });
#if LOWBIT_X86
  // a row's tables for the int8 bodies: DSQ, its G fp16 steps, then its G tables; a codebook layer, its G steps,
  // and after every row's the layer's one table (its groups' tables differ only by their steps)
  const int64_t table_bytes = G * (CB ? 2 : 2 + (1 << B)), stride = CB ? 0 : 1 << B;
  const auto steps = [&](int64_t n) { return reinterpret_cast<const at::Half*>(tables + n * table_bytes); };
  const auto group_tables = [&](int64_t n) { return CB ? tables + N * table_bytes : tables + n * table_bytes + 2 * G; };
  if constexpr (B >= 2) {
    if (isa == Isa::Vnni) {
      const Int8Tokens t(x, M, K, gs);
      return each_row(N, M, [&](auto mm, int64_t n, int64_t m0) {
        uniform_row_vnni<B, decltype(mm)::value, true>(t.q.data() + m0 * K, K, codes + n * row_bytes, steps(n),
                                                       group_tables(n), G, gs, t.dx.data() + m0 * G,
                                                       t.dxsum.data() + m0 * G, y + m0 * N + n, N, stride);
      });
    }
    if (isa == Isa::Avx2Int8) {
      const Int8Tokens t(x, M, K, gs, B);
      return each_row(N, M, [&](auto mm, int64_t n, int64_t m0) {
        int8_row_avx2<B, decltype(mm)::value, true>(t.q.data() + m0 * K, K, codes + n * row_bytes, steps(n),
                                                    group_tables(n), G, gs, t.dx.data() + m0 * G,
                                                    t.dxsum.data() + m0 * G, y + m0 * N + n, N, stride);
      });
    }
  }
  if (isa == Isa::Vnni && !CB) {  // one plane: its signs as 0/1 bytes
    const Int8Tokens t(x, M, K, gs);
    // per (token, group, plane): 2 dx and dx * sum xq, the factors dsq_row_vnni multiplies the row scales by
    const int64_t G_B = G * B;
    std::vector<float> dx2(M * G_B), dxs(M * G_B);
    for (int64_t mg = 0; mg < M * G; ++mg)
      for (int64_t k = 0; k < B; ++k) dx2[mg * B + k] = 2.f * t.dx[mg], dxs[mg * B + k] = t.dxsum[mg];
    return each_row(N, M, [&](auto mm, int64_t n, int64_t m0) {
      dsq_row_vnni<B, decltype(mm)::value>(t.q.data() + m0 * K, K, codes + n * row_bytes, rs + n * G_B, G, gs,
                                           dx2.data() + m0 * G_B, dxs.data() + m0 * G_B, y + m0 * N + n, N);
    });
  }
  each_row(N, M, [&](auto mm, int64_t n, int64_t m0) {
    constexpr int MM = decltype(mm)::value;
    if (isa == Isa::Avx512)
      dsq_row_avx512<B, MM, CB>(x + m0 * K, K, codes + n * row_bytes, rs + n * rs_row, levels, G, gs,
                                y + m0 * N + n, N);
    else
      dsq_row_avx2<B, MM, CB>(x + m0 * K, K, codes + n * row_bytes, rs + n * rs_row, levels, G, gs, y + m0 * N + n,
                              N);
  });
#endif
}

void check_x(const torch::Tensor& x, int64_t K) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "x must be a contiguous CPU float32 tensor");
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "x must be [tokens, in_features]");
}

torch::Tensor output(const torch::Tensor& x, int64_t N, const c10::optional<torch::Tensor>& out) {
  if (!out.has_value()) return torch::empty({x.size(0), N}, x.options());
  TORCH_CHECK(out->scalar_type() == torch::kFloat32 && out->is_contiguous() && out->dim() == 2 &&
                  out->size(0) == x.size(0) && out->size(1) == N,
              "out must be a contiguous float32 [tokens, out_features] tensor");
  return *out;
}

// ---------------------------------------------------------------- prefill: the float weight by table lookup
// w[n, j] = values[n, g, c[n, j]] for the chunk8 codes of rows n0 .. n1 - 1, each group's table of its 2^BITS weight
// values. A run's BITS bytes are read exactly (no padding needed past the last row); 3 of them byte by byte, as a
// 3-byte copy into a word stalls the load that follows it (store forwarding).
template <int BITS>
inline uint32_t run_at(const uint8_t* p) {
  if constexpr (BITS == 3) {
    return uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16;
  } else {
    uint32_t run = 0;
    std::memcpy(&run, p, BITS);
    return run;
  }
}

template <int BITS>
void lookup_rows_ref(const uint8_t* codes, int64_t row_bytes, const float* values, int64_t G, int64_t gs, float* w,
                     int64_t K, int64_t n0, int64_t n1) {
  constexpr int V = 1 << BITS;
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = codes + n * row_bytes;
    for (int64_t g = 0; g < G; ++g) {
      const float* t = values + (n * G + g) * V;
      for (int64_t j = g * gs; j < (g + 1) * gs; j += 8) {
        const uint32_t run = run_at<BITS>(row + (j / 8) * BITS);
        for (int i = 0; i < 8; ++i) w[n * K + j + i] = t[(run >> (BITS * i)) & (V - 1)];
      }
    }
  }
}

#if LOWBIT_X86
// 16 weights a step: two runs' codes in 16 lanes (a per-lane shift and a mask), then one permute of the group's
// table (at most 16 values, padded) does all 16 lookups
template <int BITS>
__attribute__((target("avx512f,avx512bw"))) void lookup_rows_avx512(const uint8_t* codes, int64_t row_bytes,
                                                                      const float* values, int64_t G, int64_t gs,
                                                                      float* w, int64_t K, int64_t n0, int64_t n1) {
  constexpr int V = 1 << BITS;
  const __m512i shifts = _mm512_setr_epi32(0, BITS, 2 * BITS, 3 * BITS, 4 * BITS, 5 * BITS, 6 * BITS, 7 * BITS, 0,
                                           BITS, 2 * BITS, 3 * BITS, 4 * BITS, 5 * BITS, 6 * BITS, 7 * BITS);
  const __m512i mask = _mm512_set1_epi32(V - 1);
  const __mmask16 table_lanes = static_cast<__mmask16>((1u << V) - 1);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = codes + n * row_bytes;
    for (int64_t g = 0; g < G; ++g) {
      const __m512 t = _mm512_maskz_loadu_ps(table_lanes, values + (n * G + g) * V);
      for (int64_t j = g * gs; j < (g + 1) * gs; j += 16) {
        const uint32_t a = run_at<BITS>(row + (j / 8) * BITS), b = run_at<BITS>(row + (j / 8 + 1) * BITS);
        const __m512i both = _mm512_inserti64x4(_mm512_set1_epi32(int(a)), _mm256_set1_epi32(int(b)), 1);
        const __m512i idx = _mm512_and_si512(_mm512_srlv_epi32(both, shifts), mask);
        _mm512_storeu_ps(w + n * K + j, _mm512_permutexvar_ps(idx, t));
      }
    }
  }
}
#endif

// ---------------------------------------------------------------- vector codebooks (vq2-dq8, vq3-dq8)
// Each run of D codes along a row is one index into levels [2^(B*D), D], the run's first code the least significant:
// in the row's LSB-first chunk8 stream the index is simply the run's B*D bits (at most 12, read from a 4-byte word:
// the buffer's 4 bytes of padding cover the last run). w = scale * entry; one read of D table values a run, MM
// tokens at a time (the portable body, and the tests' reference for the AVX-512 one below).
template <int B, int D, int MM>
void vector_row(const float* x, int64_t K, const uint8_t* row, const at::Half* scales, const float* levels, int64_t G,
                int64_t gs, float* y, int64_t N) {
  constexpr uint32_t mask = (1u << (B * D)) - 1;
  float acc[MM] = {};
  for (int64_t g = 0; g < G; ++g) {
    float part[MM] = {};
    for (int64_t j = g * gs; j < (g + 1) * gs; j += D) {
      const int64_t bit = j * B;
      uint32_t word;
      std::memcpy(&word, row + (bit >> 3), 4);
      const float* e = levels + ((word >> (bit & 7)) & mask) * D;
      for (int m = 0; m < MM; ++m) {
        const float* xm = x + m * K + j;
        float dot = e[0] * xm[0];
        for (int d = 1; d < D; ++d) dot += e[d] * xm[d];
        part[m] += dot;
      }
    }
    const float scale = float(scales[g]);
    for (int m = 0; m < MM; ++m) acc[m] += scale * part[m];
  }
  for (int m = 0; m < MM; ++m) y[m * N] = acc[m];
}

#if LOWBIT_X86
// AVX-512: 16 runs a step, starting on a byte (a step starts at a multiple of 8 runs: the dispatch checks it).
// Their 16 indices come from the step's at most 20 bytes without a gather: one masked load, bytes 0-15 broadcast to
// the first three 128-bit lanes and bytes 4-19 to the last (each lane's four runs lie within its 16 bytes for
// B*D <= 9), one in-lane byte shuffle that puts run l's 4 bytes at byte (l*B*D)/8 into dword l, then each dword's
// shift. An entry's d-th value is a lookup in the layer's table transposed per d (lt[d][v]): in registers for up to
// 64 entries (vq2 at 2-3 bits, vq3 at 2: one or two permutes and a blend), else a gather (vq3 at 3 bits: 512
// entries, 2 KB a d, L1-resident). Tokens are deinterleaved once a call (xd[m][d][r] = x[m][r*D + d]), so every
// token load is contiguous. A group's last runs short of 16 (groups of 48 with D = 2, per-channel widths) are
// masked.
template <int BD>
struct RunBytes {  // the byte shuffle and shifts that give 16 runs' indices
  alignas(64) int8_t ctrl[64];
  alignas(64) int32_t shift[16];
  constexpr RunBytes() : ctrl(), shift() {
    for (int l = 0; l < 16; ++l) {
      for (int b = 0; b < 4; ++b) ctrl[4 * l + b] = int8_t((l * BD) / 8 + b - (l >= 12 ? 4 : 0));
      shift[l] = (l * BD) % 8;
    }
  }
};
template <int BD>
constexpr RunBytes<BD> RUN_BYTES{};

template <int BD>
__attribute__((target("avx512f,avx512bw,fma,f16c"))) inline __m512i run_indices(const uint8_t* step, int lanes) {
  static_assert(BD >= 4 && BD <= 9, "a lane's four runs must lie within its 16 bytes");
  const int bytes = ((lanes - 1) * BD) / 8 + 4;  // none past the last run's word: the buffer ends 4 bytes after it
  const __m512i v = _mm512_maskz_loadu_epi8(~0ull >> (64 - bytes), step);
  const __m128i lo = _mm512_castsi512_si128(v), hi = _mm512_extracti32x4_epi32(v, 1);
  const __m512i lanes4 = _mm512_inserti32x4(_mm512_broadcast_i32x4(lo), _mm_alignr_epi8(hi, lo, 4), 3);
  const __m512i word = _mm512_shuffle_epi8(lanes4, _mm512_load_si512(RUN_BYTES<BD>.ctrl));
  return _mm512_and_si512(_mm512_srlv_epi32(word, _mm512_load_si512(RUN_BYTES<BD>.shift)),
                          _mm512_set1_epi32((1 << BD) - 1));
}

template <int B, int D, int MM>
__attribute__((target("avx512f,avx512bw,fma,f16c"))) void vector_row_avx512(
    const float* xd, int64_t R, const uint8_t* row, const at::Half* scales, const float* lt, int64_t G,
    int64_t rg, float* y, int64_t N) {
  constexpr int BD = B * D, V = 1 << BD;
  constexpr int T = V <= 64 ? V / 16 : 0;  // table registers a d (V is 16, 64, 256 or 512)
  __m512 t[D][T > 0 ? T : 1];
  for (int d = 0; d < D; ++d)
    for (int i = 0; i < T; ++i) t[d][i] = _mm512_loadu_ps(lt + d * V + 16 * i);
  __m512 tot[MM];
  for (int m = 0; m < MM; ++m) tot[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512 acc[MM];
    for (int m = 0; m < MM; ++m) acc[m] = _mm512_setzero_ps();
    const int64_t end = (g + 1) * rg;
    for (int64_t r = g * rg; r < end; r += 16) {
      const int lanes = int(std::min<int64_t>(16, end - r));
      const __mmask16 k = __mmask16((1u << lanes) - 1);
      const __m512i idx = run_indices<BD>(row + r * BD / 8, lanes);
      for (int d = 0; d < D; ++d) {
        __m512 e;
        if constexpr (T == 1) {
          e = _mm512_permutexvar_ps(idx, t[d][0]);
        } else if constexpr (T == 4) {
          const __m512 lo = _mm512_permutex2var_ps(t[d][0], idx, t[d][1]);
          const __m512 hi = _mm512_permutex2var_ps(t[d][2], idx, t[d][3]);
          e = _mm512_mask_blend_ps(_mm512_test_epi32_mask(idx, _mm512_set1_epi32(32)), lo, hi);
        } else {
          e = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), k, idx, lt + d * V, 4);
        }
        for (int m = 0; m < MM; ++m)
          acc[m] = _mm512_fmadd_ps(e, _mm512_maskz_loadu_ps(k, xd + (m * D + d) * R + r), acc[m]);
      }
    }
    const __m512 sc = _mm512_set1_ps(_cvtsh_ss(reinterpret_cast<const uint16_t*>(scales)[g]));
    for (int m = 0; m < MM; ++m) tot[m] = _mm512_fmadd_ps(sc, acc[m], tot[m]);
  }
  for (int m = 0; m < MM; ++m) y[m * N] = _mm512_reduce_add_ps(tot[m]);
}
#endif

template <int B, int D>
void vector_impl(Isa isa, const float* x, int64_t M, int64_t K, const uint8_t* codes, int64_t row_bytes,
                 const at::Half* scales, const float* levels, int64_t G, int64_t gs, float* y, int64_t N) {
#if LOWBIT_X86
  if (isa == Isa::Avx512) {
    constexpr int V = 1 << (B * D);
    const int64_t R = K / D;
    std::vector<float> xd(M * K), lt(D * V);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t r = 0; r < R; ++r)
        for (int d = 0; d < D; ++d) xd[(m * D + d) * R + r] = x[m * K + r * D + d];
    for (int v = 0; v < V; ++v)
      for (int d = 0; d < D; ++d) lt[d * V + v] = levels[v * D + d];
    return each_row(N, M, [&](auto mm, int64_t n, int64_t m0) {
      vector_row_avx512<B, D, decltype(mm)::value>(xd.data() + m0 * K, R, codes + n * row_bytes, scales + n * G,
                                                   lt.data(), G, gs / D, y + m0 * N + n, N);
    });
  }
#endif
  each_row(N, M, [&](auto mm, int64_t n, int64_t m0) {
    vector_row<B, D, decltype(mm)::value>(x + m0 * K, K, codes + n * row_bytes, scales + n * G, levels, G, gs,
                                          y + m0 * N + n, N);
  });
}

template <int BITS>
void lookup_impl(const uint8_t* codes, int64_t row_bytes, const float* values, int64_t G, int64_t gs, float* w,
                 int64_t K, int64_t N, bool vector) {
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
#if LOWBIT_X86
    if (vector) return lookup_rows_avx512<BITS>(codes, row_bytes, values, G, gs, w, K, n0, n1);
#endif
    lookup_rows_ref<BITS>(codes, row_bytes, values, G, gs, w, K, n0, n1);
  });
}

}  // namespace

// codes: uint8 [N * row_bytes + 4] (chunk8 layout, 4 bytes of padding); scales fp16 [N, G]; zeros uint8 [N, G].
// isa: -1 = the best body (int8 tokens included), 0 = portable, 1 = AVX2, 2 = AVX-512 (float tokens), 3 = int8
// tokens on the best int8 body (AVX-512 VNNI for groups of 64, AVX2 for groups of 32 with 2-4 bits), all capped at
// what the CPU has (see body()).
torch::Tensor uniform_gemv(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, torch::Tensor zeros,
                           int64_t bits, int64_t group_size, int64_t isa, c10::optional<torch::Tensor> out) {
  const int64_t N = scales.size(0), G = scales.size(1), K = G * group_size;
  check_x(x, K);
  TORCH_CHECK(group_size % 8 == 0, "group size must be a multiple of 8");
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, "bits must be 2, 3, 4 or 8");
  const int64_t row_bytes = K / 8 * bits;
  TORCH_CHECK(codes.scalar_type() == torch::kUInt8 && codes.is_contiguous() && codes.numel() == N * row_bytes + 4,
              "codes must be the chunk8 layout of the weight");
  TORCH_CHECK(scales.scalar_type() == torch::kHalf && scales.is_contiguous(), "scales must be contiguous fp16");
  TORCH_CHECK(zeros.scalar_type() == torch::kUInt8 && zeros.is_contiguous() && zeros.sizes() == scales.sizes(),
              "zeros must be contiguous uint8 shaped like scales");
  const int64_t M = x.size(0);
  const Isa which = body(isa, group_size, bits);
  // the float bodies subtract the zero-points through per-group sums of x; the int8 bodies sum their int8 tokens
  auto xs = is_int8(which) ? x.new_empty({0}) : group_sums(x, group_size);
  auto y = output(x, N, out);
  auto args = std::make_tuple(which, x.data_ptr<float>(), M, K, codes.data_ptr<uint8_t>(), row_bytes,
                              scales.data_ptr<at::Half>(), zeros.data_ptr<uint8_t>(), G, group_size,
                              xs.data_ptr<float>(), y.data_ptr<float>(), N);
  if (bits == 2) std::apply(uniform_impl<2>, args);
  else if (bits == 3) std::apply(uniform_impl<3>, args);
  else if (bits == 4) std::apply(uniform_impl<4>, args);
  else std::apply(uniform_impl<8>, args);
  return y;
}

// codes: uint8 [N * row_bytes + 4], chunk8 layout of the B-bit codes (bit k = sign plane k, 1 = +1); row_scales:
// fp16 [N, G, B]; tables: uint8 [N * G * (2 + 2^B)], each row's group steps and tables
// (kernels_cpu/layout.py dsq_tables), read by the int8 bodies.
torch::Tensor dsq_gemv(torch::Tensor x, torch::Tensor codes, torch::Tensor row_scales, torch::Tensor tables,
                       int64_t group_size, int64_t isa, c10::optional<torch::Tensor> out) {
  TORCH_CHECK(row_scales.scalar_type() == torch::kHalf && row_scales.is_contiguous() && row_scales.dim() == 3,
              "row_scales must be contiguous fp16 [out, groups, bits]");
  const int64_t N = row_scales.size(0), G = row_scales.size(1), B = row_scales.size(2), K = G * group_size;
  check_x(x, K);
  TORCH_CHECK(group_size % 8 == 0, "group size must be a multiple of 8");
  TORCH_CHECK(B >= 1 && B <= 4, "DSQ weights have 1 to 4 sign planes");
  const int64_t row_bytes = K / 8 * B;
  TORCH_CHECK(codes.scalar_type() == torch::kUInt8 && codes.is_contiguous() && codes.numel() == N * row_bytes + 4,
              "codes must be the chunk8 layout of the weight's sign-plane codes");
  TORCH_CHECK(tables.scalar_type() == torch::kUInt8 && tables.is_contiguous() &&
                  tables.numel() == N * G * ((1 << B) + 2),
              "tables must be the weight's group steps and tables (kernels_cpu.layout.dsq_tables)");
  auto y = output(x, N, out);
  auto args = std::make_tuple(body(isa, group_size, B), x.data_ptr<float>(), x.size(0), K, codes.data_ptr<uint8_t>(),
                              row_bytes, row_scales.data_ptr<at::Half>(), nullptr, tables.data_ptr<uint8_t>(), G,
                              group_size, y.data_ptr<float>(), N);
  if (B == 1) std::apply(dsq_impl<1, false>, args);
  else if (B == 2) std::apply(dsq_impl<2, false>, args);
  else if (B == 3) std::apply(dsq_impl<3, false>, args);
  else std::apply(dsq_impl<4, false>, args);
  return y;
}

// codes: uint8 [N * row_bytes + 4], chunk8 layout of the B-bit codes; scales: fp16 [N, G]; levels: float32 [2^B]
// (B = 2..4); tables: uint8 [N * G * 2 + 2^B], every row's group steps, then the levels' table (kernels_cpu/layout.py
// codebook_tables), read by the int8 bodies.
torch::Tensor codebook_gemv(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, torch::Tensor levels,
                            torch::Tensor tables, int64_t group_size, int64_t isa, c10::optional<torch::Tensor> out) {
  TORCH_CHECK(scales.scalar_type() == torch::kHalf && scales.is_contiguous() && scales.dim() == 2,
              "scales must be contiguous fp16 [out, groups]");
  TORCH_CHECK(levels.scalar_type() == torch::kFloat32 && levels.dim() == 1 &&
                  (levels.numel() == 4 || levels.numel() == 8 || levels.numel() == 16),
              "levels must be float32 [2^bits], bits 2 to 4");
  const int64_t N = scales.size(0), G = scales.size(1), K = G * group_size;
  const int64_t B = levels.numel() == 4 ? 2 : levels.numel() == 8 ? 3 : 4;
  check_x(x, K);
  TORCH_CHECK(group_size % 8 == 0, "group size must be a multiple of 8");
  const int64_t row_bytes = K / 8 * B;
  TORCH_CHECK(codes.scalar_type() == torch::kUInt8 && codes.is_contiguous() && codes.numel() == N * row_bytes + 4,
              "codes must be the chunk8 layout of the weight");
  TORCH_CHECK(tables.scalar_type() == torch::kUInt8 && tables.is_contiguous() &&
                  tables.numel() == N * G * 2 + (1 << B),
              "tables must be the weight's group steps and table (kernels_cpu.layout.codebook_tables)");
  alignas(64) float padded[16] = {};  // the float bodies load 8 or 16 lanes of the table
  std::memcpy(padded, levels.contiguous().data_ptr<float>(), levels.numel() * sizeof(float));
  auto y = output(x, N, out);
  auto args = std::make_tuple(body(isa, group_size, B), x.data_ptr<float>(), x.size(0), K, codes.data_ptr<uint8_t>(),
                              row_bytes, scales.data_ptr<at::Half>(), static_cast<const float*>(padded),
                              tables.data_ptr<uint8_t>(), G, group_size, y.data_ptr<float>(), N);
  if (B == 2) std::apply(dsq_impl<2, true>, args);
  else if (B == 3) std::apply(dsq_impl<3, true>, args);
  else std::apply(dsq_impl<4, true>, args);
  return y;
}

// codes: uint8 [N * row_bytes + 4], chunk8 layout of the B-bit codes; scales: fp16 [N, G]; levels: float32
// [2^(B*D), D] (D = 2: B 2..4; D = 3: B 2..3); group_size a multiple of D. isa: the AVX-512 body for -1 and 2-3
// where the CPU has it (the tokens stay float: a run's value is a table entry, not a small integer), the portable
// body otherwise (no AVX2 one).
torch::Tensor vector_gemv(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, torch::Tensor levels,
                          int64_t group_size, int64_t isa, c10::optional<torch::Tensor> out) {
  TORCH_CHECK(scales.scalar_type() == torch::kHalf && scales.is_contiguous() && scales.dim() == 2,
              "scales must be contiguous fp16 [out, groups]");
  TORCH_CHECK(levels.scalar_type() == torch::kFloat32 && levels.is_contiguous() && levels.dim() == 2 &&
                  (levels.size(1) == 2 || levels.size(1) == 3),
              "levels must be contiguous float32 [2^(bits*d), d], d 2 or 3");
  const int64_t D = levels.size(1), V = levels.size(0);
  const int64_t B = V == (int64_t(1) << (2 * D)) ? 2 : V == (int64_t(1) << (3 * D)) ? 3
                  : (D == 2 && V == 256) ? 4 : 0;
  TORCH_CHECK(B > 0, "levels must hold 2^(bits*d) entries: bits 2 to 4 with d = 2, 2 to 3 with d = 3");
  const int64_t N = scales.size(0), G = scales.size(1), K = G * group_size;
  check_x(x, K);
  TORCH_CHECK(group_size % D == 0 && K % 8 == 0, "group size must be a multiple of d and the width of 8");
  const int64_t row_bytes = K / 8 * B;
  TORCH_CHECK(codes.scalar_type() == torch::kUInt8 && codes.is_contiguous() && codes.numel() == N * row_bytes + 4,
              "codes must be the chunk8 layout of the weight");
  auto y = output(x, N, out);
  // the AVX-512 body's steps of 16 runs start on a byte: groups of a multiple of 8 runs (every supported size), or one
  const bool avx512 =
      (isa < 0 || isa >= 2) && int(best_isa()) >= int(Isa::Avx512) && (G == 1 || group_size / D % 8 == 0);
  auto args = std::make_tuple(avx512 ? Isa::Avx512 : Isa::Ref, x.data_ptr<float>(), x.size(0), K,
                              codes.data_ptr<uint8_t>(), row_bytes, scales.data_ptr<at::Half>(),
                              levels.data_ptr<float>(), G, group_size, y.data_ptr<float>(), N);
  if (D == 2 && B == 2) std::apply(vector_impl<2, 2>, args);
  else if (D == 2 && B == 3) std::apply(vector_impl<3, 2>, args);
  else if (D == 2) std::apply(vector_impl<4, 2>, args);
  else if (B == 2) std::apply(vector_impl<2, 3>, args);
  else std::apply(vector_impl<3, 3>, args);
  return y;
}

// The float32 weight [N, G * group_size] of chunk8 codes (uint8, at least N * row_bytes; the kernels' padded buffer
// too) and values: float32 [N, G, 2^B] (B = 1..4), each group's weight for every code (uniform (c - z) s, codebook
// s L[c], DSQ's T[c]), so every format dequantizes exactly as its own dequantize does. For prefill, where
// dequantize + BLAS is the fast path. isa as the kernels': AVX-512 for -1 and 2-3 where the CPU has it and groups
// are multiples of 16, the portable body otherwise.
torch::Tensor lookup_dequantize(torch::Tensor codes, torch::Tensor values, int64_t group_size, int64_t isa) {
  TORCH_CHECK(values.scalar_type() == torch::kFloat32 && values.is_contiguous() && values.dim() == 3,
              "values must be contiguous float32 [out, groups, 2^bits]");
  const int64_t N = values.size(0), G = values.size(1), V = values.size(2), K = G * group_size;
  TORCH_CHECK(V == 2 || V == 4 || V == 8 || V == 16, "values must hold 2, 4, 8 or 16 entries a group (1-4 bits)");
  TORCH_CHECK(group_size > 0 && group_size % 8 == 0, "group size must be a multiple of 8");
  const int B = V == 2 ? 1 : V == 4 ? 2 : V == 8 ? 3 : 4;
  const int64_t row_bytes = K / 8 * B;
  TORCH_CHECK(codes.scalar_type() == torch::kUInt8 && codes.is_contiguous() && codes.numel() >= N * row_bytes,
              "codes must be the chunk8 layout of the weight");
  auto w = torch::empty({N, K}, values.options());
  const bool vector = (isa < 0 || isa >= 2) && group_size % 16 == 0 && int(best_isa()) >= int(Isa::Avx512);
  auto args = std::make_tuple(codes.data_ptr<uint8_t>(), row_bytes, values.data_ptr<float>(), G, group_size,
                              w.data_ptr<float>(), K, N, vector);
  if (B == 1) std::apply(lookup_impl<1>, args);
  else if (B == 2) std::apply(lookup_impl<2>, args);
  else if (B == 3) std::apply(lookup_impl<3>, args);
  else std::apply(lookup_impl<4>, args);
  return w;
}

torch::Tensor vector_op(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, torch::Tensor levels,
                        int64_t group_size, int64_t isa) {
  return vector_gemv(x.contiguous(), codes, scales, levels, group_size, isa, c10::nullopt);
}

int64_t isa_level() { return static_cast<int64_t>(best_isa()); }

// The body that serves this isa, group and width (bits, or DSQ's planes): "portable", "avx2", "avx512" (float
// tokens), "avx512-vnni" or "avx2-int8" (int8 tokens).
std::string kernel_body(int64_t isa, int64_t group_size, int64_t bits) {
  static const char* names[] = {"portable", "avx2", "avx512", "avx512-vnni", "avx2-int8"};
  return names[static_cast<int>(body(isa, group_size, bits))];
}

// The same two kernels as torch operators (torch.ops.lowbit_cpu.*): what a torch.compile'd decode step calls, with
// no Python in between (kernels_cpu.dispatch registers their shape functions).
torch::Tensor uniform_op(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, torch::Tensor zeros, int64_t bits,
                         int64_t group_size, int64_t isa) {
  return uniform_gemv(x.contiguous(), codes, scales, zeros, bits, group_size, isa, c10::nullopt);
}

torch::Tensor dsq_op(torch::Tensor x, torch::Tensor codes, torch::Tensor row_scales, torch::Tensor tables,
                     int64_t group_size, int64_t isa) {
  return dsq_gemv(x.contiguous(), codes, row_scales, tables, group_size, isa, c10::nullopt);
}

torch::Tensor codebook_op(torch::Tensor x, torch::Tensor codes, torch::Tensor scales, torch::Tensor levels,
                          torch::Tensor tables, int64_t group_size, int64_t isa) {
  return codebook_gemv(x.contiguous(), codes, scales, levels, tables, group_size, isa, c10::nullopt);
}

TORCH_LIBRARY(lowbit_cpu, m) {
  m.def("uniform_gemv(Tensor x, Tensor codes, Tensor scales, Tensor zeros, int bits, int group_size, int isa) -> Tensor");
  m.def("dsq_gemv(Tensor x, Tensor codes, Tensor row_scales, Tensor tables, int group_size, int isa) -> Tensor");
  m.def("codebook_gemv(Tensor x, Tensor codes, Tensor scales, Tensor levels, Tensor tables, int group_size, int isa) "
        "-> Tensor");
  m.def("vector_gemv(Tensor x, Tensor codes, Tensor scales, Tensor levels, int group_size, int isa) -> Tensor");
}

TORCH_LIBRARY_IMPL(lowbit_cpu, CPU, m) {
  m.impl("uniform_gemv", &uniform_op);
  m.impl("dsq_gemv", &dsq_op);
  m.impl("codebook_gemv", &codebook_op);
  m.impl("vector_gemv", &vector_op);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("uniform_gemv", &uniform_gemv, "y = x W^T from chunk8 uniform codes (2/3/4/8-bit)", py::arg("x"),
        py::arg("codes"), py::arg("scales"), py::arg("zeros"), py::arg("bits"), py::arg("group_size"),
        py::arg("isa") = -1, py::arg("out") = py::none(), py::call_guard<py::gil_scoped_release>());
  m.def("dsq_gemv", &dsq_gemv, "y = x W^T from chunk8 DSQ codes", py::arg("x"), py::arg("codes"),
        py::arg("row_scales"), py::arg("tables"), py::arg("group_size"), py::arg("isa") = -1,
        py::arg("out") = py::none(), py::call_guard<py::gil_scoped_release>());
  m.def("codebook_gemv", &codebook_gemv, "y = x W^T from chunk8 codebook codes", py::arg("x"), py::arg("codes"),
        py::arg("scales"), py::arg("levels"), py::arg("tables"), py::arg("group_size"), py::arg("isa") = -1,
        py::arg("out") = py::none(), py::call_guard<py::gil_scoped_release>());
  m.def("vector_gemv", &vector_gemv, "y = x W^T from chunk8 vector codebook codes", py::arg("x"), py::arg("codes"),
        py::arg("scales"), py::arg("levels"), py::arg("group_size"), py::arg("isa") = -1,
        py::arg("out") = py::none(), py::call_guard<py::gil_scoped_release>());
  m.def("lookup_dequantize", &lookup_dequantize, "the float weight from chunk8 codes and each group's values",
        py::arg("codes"), py::arg("values"), py::arg("group_size"), py::arg("isa") = -1,
        py::call_guard<py::gil_scoped_release>());
  m.def("isa_level", &isa_level, "the CPU's best: 0 portable, 1 AVX2, 2 AVX-512, 3 AVX-512 VNNI");
  m.def("kernel_body", &kernel_body, "the body that serves this isa, group and width", py::arg("isa"),
        py::arg("group_size"), py::arg("bits"));
}
