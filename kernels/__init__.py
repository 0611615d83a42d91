"""Triton kernels of fastguide (installed as ``fastguide.kernels``), one op per module."""
