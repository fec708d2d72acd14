"""Mixture-of-Experts support: per-expert linears (``experts``), routing fidelity metrics (``routing``) and
MPI router power-iteration (``mpi``). The quantizers in ``quant/`` use these for sparse blocks."""
