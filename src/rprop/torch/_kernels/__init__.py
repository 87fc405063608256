"""Kernel sources for the fused step: ``rprop_kernel.c`` (CPU, compiled at
first use by :mod:`rprop.torch._fused`) and ``triton_kernel`` (CUDA, needs
Triton)."""
