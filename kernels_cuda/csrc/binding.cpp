// torch binding for the low-bit GEMM. Host-only C++: it validates tensors, allocates the output
// and hands raw pointers to lowbit::gemm_launch (lowbit_gemm.cu). The CUDA stream comes from
// Python (torch.cuda.current_stream().cuda_stream) so this file needs no CUDA or ATen-CUDA header
// and compiles against a CPU-only torch too (the compile check does that).
#include <torch/extension.h>

#include <cstdint>
#include <optional>

#include "lowbit_gemm.h"

namespace {

void check_operand(const torch::Tensor& t, const torch::Tensor& x, at::ScalarType dtype, int64_t numel,
                   const char* name) {
  TORCH_CHECK(t.device() == x.device(), name, " must be on ", x.device(), ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.numel() == numel, name, " has ", t.numel(), " elements, expected ", numel);
}

// y[m, n] = x[m, k] . dequant(W)^T (+ bias), W given in the kernel layout (kernels_cuda/layout.py).
// `out` (optional) receives y; tests pass a NaN-filled one to catch elements the kernel never writes.
torch::Tensor gemm(const torch::Tensor& x, const torch::Tensor& qweight, const torch::Tensor& scales,
                   const torch::Tensor& zeros, const std::optional<torch::Tensor>& bias, int64_t n,
                   int64_t group_size, int64_t bits, int64_t wn, int64_t wk, int64_t splits, int64_t stream,
                   const std::optional<torch::Tensor>& out) {
  TORCH_CHECK(x.is_cuda(), "x must be a CUDA tensor");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [m, k] matrix");
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, "x must be fp16 or bf16, got ",
              x.scalar_type());
  const int64_t m = x.size(0), k = x.size(1);
  TORCH_CHECK(m >= 1 && m <= lowbit::kMaxRows, "x must have 1..", lowbit::kMaxRows, " rows, got ", m);
  TORCH_CHECK(bits >= 2 && bits <= 4, "bits must be 2, 3 or 4, got ", bits);
  TORCH_CHECK(group_size >= 1 && k % group_size == 0, "group size ", group_size, " does not divide k = ", k);
  const int64_t ntiles = (n + lowbit::kTileN - 1) / lowbit::kTileN;
  const int64_t kt = (k + lowbit::kTileK - 1) / lowbit::kTileK;
  const int64_t groups = k / group_size;
  check_operand(qweight, x, at::kInt, ntiles * kt * bits * 128, "qweight");
  check_operand(scales, x, at::kHalf, ntiles * groups * lowbit::kTileN, "scales");
  check_operand(zeros, x, at::kByte, ntiles * groups * lowbit::kTileN, "zeros");
  if (bias.has_value()) check_operand(*bias, x, x.scalar_type(), n, "bias");

  torch::Tensor y;
  if (out.has_value()) {
    check_operand(*out, x, x.scalar_type(), m * n, "out");
    TORCH_CHECK(out->dim() == 2 && out->size(0) == m && out->size(1) == n, "out must be [", m, ", ", n, "]");
    y = *out;
  } else {
    y = torch::empty({m, n}, x.options());
  }
  torch::Tensor ws;
  if (splits > 1) ws = torch::zeros({m, n}, x.options().dtype(at::kFloat));

  lowbit::GemmParams p{};
  p.x = x.data_ptr();
  p.qweight = qweight.data_ptr<int32_t>();
  p.scales = scales.data_ptr();
  p.zeros = zeros.data_ptr<uint8_t>();
  p.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  p.y = y.data_ptr();
  p.ws = splits > 1 ? ws.data_ptr<float>() : nullptr;
  p.m = static_cast<int>(m);
  p.n = static_cast<int>(n);
  p.k = static_cast<int>(k);
  p.kp = static_cast<int>(kt * lowbit::kTileK);
  p.ntiles = static_cast<int>(ntiles);
  p.groups = static_cast<int>(groups);
  p.group_size = static_cast<int>(group_size);
  p.bits = static_cast<int>(bits);
  p.dtype = x.scalar_type() == at::kHalf ? 0 : 1;
  p.wn = static_cast<int>(wn);
  p.wk = static_cast<int>(wk);
  p.splits = static_cast<int>(splits);
  p.x_vec = (k % 8 == 0) && (reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0);
  p.device = x.get_device();

  const int err = lowbit::gemm_launch(p, reinterpret_cast<void*>(static_cast<intptr_t>(stream)));
  TORCH_CHECK(err == 0, "lowbit gemm failed: ", lowbit::gemm_error_string(err));
  if (splits > 1) y.copy_(ws);
  return y;
}

int64_t smem_bytes(int64_t m, int64_t wn, int64_t wk) {
  lowbit::GemmParams p{};
  p.m = static_cast<int>(m);
  p.wn = static_cast<int>(wn);
  p.wk = static_cast<int>(wk);
  return static_cast<int64_t>(lowbit::gemm_smem_bytes(p));
}

int64_t max_smem(int64_t device) { return lowbit::gemm_max_smem(static_cast<int>(device)); }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lowbit: group-wise 2/3/4-bit weight x fp16/bf16 activation GEMM for 1..64 tokens";
  m.def("gemm", &gemm, "y = x . dequant(W)^T (+ bias); W in the kernels_cuda.layout format", py::arg("x"),
        py::arg("qweight"), py::arg("scales"), py::arg("zeros"), py::arg("bias"), py::arg("n"),
        py::arg("group_size"), py::arg("bits"), py::arg("wn"), py::arg("wk"), py::arg("splits"),
        py::arg("stream"), py::arg("out") = py::none());
  m.def("smem_bytes", &smem_bytes, "dynamic shared memory of a launch", py::arg("m"), py::arg("wn"),
        py::arg("wk"));
  m.def("max_smem", &max_smem, "largest dynamic shared memory per block on a device (opt-in limit)",
        py::arg("device"));
}
