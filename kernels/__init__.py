"""Triton kernels of triton-adam (installed as ``triton_adam.kernels``)."""
