"""Compute backends for expert FFNs: the CPU tier (kt-kernel, torch fallback) and GPU kernels.

Shipped inside the package as ``hybrimoe_kt.kernels``; importing it imports nothing heavy.
"""
