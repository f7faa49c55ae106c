"""The pass manager: run a named, ordered list of passes with timing, an opt-in graph dump, and one cleanup.

    results = run_passes("encoder", ENCODER_PASSES, gm, ctx)

Every pass has the signature `(gm, ctx) -> PassResult`. The manager times each pass (the report lists the
seconds), and, when `$TOKENREDUCE_DUMP_GRAPHS` names a folder, writes the graph before the first pass and
after every pass that changed it (`<pipeline>/<NN>_<pass>.txt`, FX's readable form with shapes) for
debugging. Dead-code elimination, lint and recompile run once at the end, and only if a pass changed the
graph (`cleanup`). Passes run under `torch.no_grad()`: a rewrite never needs autograd, and the fake-tensor
propagation some passes do must see the grad mode capture saw, whatever the caller's.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import fx

from tokenreduce.passes.common import PassContext, PassResult

log = logging.getLogger("tokenreduce")

Pass = Callable[[fx.GraphModule, Any], PassResult]
DUMP_ENV = "TOKENREDUCE_DUMP_GRAPHS"


def cleanup(gm: fx.GraphModule) -> None:
    """Drop dead nodes, check the graph, regenerate its code."""
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()


def _dump(folder: Path, index: int, name: str, gm: fx.GraphModule) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    text = gm.print_readable(print_output=False, include_stride=False, include_device=True)
    (folder / f"{index:02d}_{name}.txt").write_text(text)


def run_passes(pipeline: str, passes: Sequence[tuple[str, Pass]], gm: fx.GraphModule,
               ctx: PassContext) -> list[PassResult]:
    """Run `passes` in order on `gm`; return their results (with `seconds`)."""
    dump_root = os.environ.get(DUMP_ENV)
    folder = Path(dump_root) / pipeline if dump_root else None
    if folder is not None:
        gm.recompile()
        _dump(folder, 0, "captured", gm)
    results = []
    changed = False
    for i, (name, fn) in enumerate(passes, start=1):
        t0 = time.perf_counter()
        with torch.no_grad():
            res = fn(gm, ctx)
        res.seconds = time.perf_counter() - t0
        log.debug("%s pass %s: changed=%s rewrites=%d (%.2f s)", pipeline, name, res.changed, res.rewrites,
                  res.seconds)
        results.append(res)
        changed |= res.changed
        if folder is not None and res.changed:
            gm.recompile()
            _dump(folder, i, name, gm)
    if changed:
        cleanup(gm)
    return results
