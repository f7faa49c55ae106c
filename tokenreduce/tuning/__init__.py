"""Choosing settings for the user, and showing what they do (`tokenreduce.tune` is this package's `tune`).

`tune` (`tuning/search.py`) searches the registered encoder methods and per-block schedules (`tuning/space.py`) for
the setting closest to the full model within a FLOPs or measured-latency budget, and returns a `Plan` that
`tokenreduce.compile(..., plan=...)`, the Dynamo backend's options and `tokenreduce convert --plan` accept;
`tuning/measure.py` holds what it measures and its resumable cache, `tuning/pareto.py` the plot and table.
`token_map` (`tuning/tokenmap.py`) draws which image patches a reduced model merged or pruned at chosen blocks.

This layer sits above `evaluate` (it may use its data loaders and models) and below the command line.
"""

from tokenreduce.tuning.search import pareto_front, parse_budget, tune
from tokenreduce.tuning.tokenmap import TokenMap, token_map

__all__ = ["TokenMap", "pareto_front", "parse_budget", "token_map", "tune"]
