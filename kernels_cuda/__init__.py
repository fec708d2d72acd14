"""Custom CUDA low-bit GEMM kernels. Nothing here yet: until they land, ``QuantLinear`` runs its
dequantize-and-matmul path on every device."""
