// Attention of one query token over a KV cache, as a decode step computes it (torch.ops.lowbit_cpu.decode_attention):
//
//   out[b, 0, h, :] = sum_j p_j v[b, h / group, j, :],  p = softmax_j(scale * q[b, h, 0, :] . k[b, h / group, j, :])
//
// over the positions j that mask[b, j] allows (grouped-query attention: Hq is a multiple of Hkv). A static KV cache
// is mostly empty positions at the start of a generation: only positions up to the last allowed one are read.
// Under torch.compile, inductor's own decode attention over a static cache costs ~160 us a layer on SmolLM2 (2
// threads); this is a few microseconds. GCC's target_clones picks the AVX-512, AVX2 or portable loop at load time.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>

namespace {

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LOWBIT_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define LOWBIT_CLONES
#endif

// One query head over positions [0, L) of its KV head; s is scratch of L floats. An all-masked row gives zeros.
LOWBIT_CLONES void attend(const float* q, const float* k, const float* v, const bool* mask, int64_t L, int64_t D,
                          float scale, float* s, float* out) {
  float mx = -INFINITY;
  for (int64_t j = 0; j < L; ++j) {
    if (!mask[j]) continue;
    const float* kj = k + j * D;
    float acc = 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t d = 0; d < D; ++d) acc += q[d] * kj[d];
    s[j] = acc * scale;
    mx = std::max(mx, s[j]);
  }
  for (int64_t d = 0; d < D; ++d) out[d] = 0.f;
  if (mx == -INFINITY) return;
  float total = 0.f;
  for (int64_t j = 0; j < L; ++j) {
    if (!mask[j]) continue;
    const float p = std::exp(s[j] - mx);
    total += p;
    const float* vj = v + j * D;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) out[d] += p * vj[d];
  }
  const float inv = 1.f / total;
  for (int64_t d = 0; d < D; ++d) out[d] *= inv;
}

}  // namespace

// q: [B, Hq, 1, D]; k, v: [B, Hkv, L, D]; mask: bool [B, L] (true = attend); all float32 on the CPU.
// Returns [B, 1, Hq, D], the layout transformers' attention functions return.
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor mask, double scale) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && q.size(2) == 1, "q must be [B, Hq, 1, D], k and v [B, Hkv, L, D]");
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && k.scalar_type() == torch::kFloat32 &&
                  v.scalar_type() == torch::kFloat32 && q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(),
              "q, k and v must be float32 CPU tensors");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(3), Hkv = k.size(1), L = k.size(2);
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == B && k.size(3) == D && Hkv > 0 && Hq % Hkv == 0,
              "k and v must be [B, Hkv, L, D] with Hq a multiple of Hkv");
  TORCH_CHECK(mask.scalar_type() == torch::kBool && mask.dim() == 2 && mask.size(0) == B && mask.size(1) == L,
              "mask must be bool [B, L]");
  q = q.contiguous(), k = k.contiguous(), v = v.contiguous(), mask = mask.contiguous();
  auto out = torch::empty({B, 1, Hq, D}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  const bool* mp = mask.data_ptr<bool>();
  float* op = out.data_ptr<float>();
  std::vector<int64_t> len(B);  // positions up to the last allowed one
  for (int64_t b = 0; b < B; ++b) {
    int64_t n = L;
    while (n > 0 && !mp[b * L + n - 1]) --n;
    len[b] = n;
  }
  const int64_t group = Hq / Hkv;
  at::parallel_for(0, B * Hq, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> s(L);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / Hq, h = i % Hq, off = (b * Hkv + h / group) * L * D;
      attend(qp + i * D, kp + off, vp + off, mp + b * L, len[b], D, float(scale), s.data(), op + i * D);
    }
  });
  return out;
}

TORCH_LIBRARY_FRAGMENT(lowbit_cpu, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor mask, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(lowbit_cpu, CPU, m) { m.impl("decode_attention", &decode_attention); }
