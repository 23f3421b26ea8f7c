"""Triton kernels, one file per op, each with an autograd.Function and a PyTorch reference."""
