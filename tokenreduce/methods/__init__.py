"""Reduction policies: score -> plan. Pure tensor code; knows nothing of models or graphs."""
