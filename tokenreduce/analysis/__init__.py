"""Structure found in a captured graph: transformer blocks, their attention, token axis, protected tokens
(`encoder`), and the causal blocks, KV tensors and per-token side inputs of decoders (`decoder`)."""
