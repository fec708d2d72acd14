"""Tensor arithmetic every other part uses: the integer grid (scales, zero-points, rounding), bit packing and
Hadamard transforms. Imports nothing of ``quant`` but ``quant.errors``."""
