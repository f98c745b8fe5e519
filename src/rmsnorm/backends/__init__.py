"""Backends: ``reference`` (pure PyTorch, any device), ``cpu`` (fused C++ kernels), ``triton`` (CUDA)."""

from . import cpu, reference_backend, triton  # noqa: F401  (registration side effects)
from .registry import Backend, BackendInfo, backends, get, select

__all__ = ["Backend", "BackendInfo", "backends", "get", "select"]
