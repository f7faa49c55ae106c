"""Token-reduction ops: pure-torch references, torch.library custom ops, and (later) GPU kernels."""
