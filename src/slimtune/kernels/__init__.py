"""Fast paths: fused autograd functions (CPU and GPU), optional Triton pieces behind a check."""
