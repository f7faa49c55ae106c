"""Token-reduction methods, one file each, behind one interface (`base.py`) and one registry (`registry.py`).

A method file holds its options, where it applies, its plan for the model's blocks and what it emits into
the graph; the plan arithmetic it shares with other methods is in `kernels/plans.py`. See
docs/adding_a_method.md.
"""
