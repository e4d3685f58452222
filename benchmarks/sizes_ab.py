"""Fixed sizes against run-time sizes, call for call: each workload of benchmarks/sizes.toml built
twice (as cpu.toml has it, and with its non-C sizes given at run time), the two called in turn on
the same data, alternating which goes first, and the median of the per-pair time ratios taken.
A drift of the machine between two rows of a `normgen bench` table cancels out here.

    python3 benchmarks/sizes_ab.py [PAIRS]      # from the repository root; default 201 pairs
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from normgen import load_spec
from normgen.harness.bench import DEFAULT_FLAGS, CFunctions, load_config

SPEC = Path(__file__).resolve().parent / "sizes.toml"


def main(pairs: int) -> None:
    layers = load_spec(SPEC)
    cfg = load_config(layers, str(SPEC), None, None)
    by = {layer.name: layer for layer in layers}
    flags = DEFAULT_FLAGS.split()
    print(f"{'workload':34} {'fixed us':>9} {'run-time us':>12} {'ratio':>6}  (median over {pairs} pairs)")
    for layer in layers:
        if layer.name.endswith("_dyn"):
            continue
        dyn = by[layer.name + "_dyn"]
        fixed = CFunctions(layer, flags, cfg.batch[layer.name], np.random.default_rng(0))
        sized = CFunctions(dyn, flags, cfg.batch[dyn.name], np.random.default_rng(0), cfg.sizes[dyn.name])
        for role in cfg.functions.get(layer.name) or fixed.roles():
            calls = [fixed.call(role), sized.call(role)]
            times: list[list[float]] = [[], []]
            for i in range(pairs + 2):
                for k in (0, 1) if i % 2 else (1, 0):
                    t = time.perf_counter()
                    calls[k]()
                    times[k].append(time.perf_counter() - t)
            a, b = np.array(times[0][2:]), np.array(times[1][2:])  # the first pair warms up
            print(f"{layer.name + '.' + role:34} {np.median(a) * 1e6:9.1f} {np.median(b) * 1e6:12.1f}"
                  f" {np.median(b / a):6.3f}", flush=True)
        del fixed, sized


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 201)
