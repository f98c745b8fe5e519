"""The ``triton`` backend (CUDA tensors)."""
