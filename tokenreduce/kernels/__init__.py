"""Token-reduction ops: pure-torch references, torch.library custom ops, and the Triton kernels that run
them on CUDA; `set_kernel_backend` / `use_reference_kernels` / `$TOKENREDUCE_KERNELS` force the references
on CUDA (`dispatch.py`, docs/kernels.md)."""

from tokenreduce.kernels.dispatch import (
    BACKENDS,
    ENV_VAR,
    kernel_backend,
    set_kernel_backend,
    use_kernel_backend,
    use_reference_kernels,
)

__all__ = ["BACKENDS", "ENV_VAR", "kernel_backend", "set_kernel_backend", "use_kernel_backend",
           "use_reference_kernels"]
