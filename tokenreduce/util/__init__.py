"""Leaf helpers with no tokenreduce imports: atomic file writes (`files`) and batch-dimension helpers over
pytrees of inputs (`batch`). Every layer may use them; they may use none of the other layers."""
