"""Mixture-of-Experts support (adapters, routing metrics, MPI). Nothing here yet: the MoE work builds on
the quantization spine in ``quant/`` and lands separately."""
