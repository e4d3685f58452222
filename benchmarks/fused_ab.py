"""Each fused workload of benchmarks/cpu.toml against its plain counterpart, call for call: the two
built as cpu.toml has them, called in turn on the same x (alternating which goes first), and the
median of the per-pair time ratios taken, so that a drift of the machine between two rows of a
`normgen bench` table cancels out. Each call is timed in CPU time of this process (one thread), so
that other processes sharing the cores stretch neither. The activations are also tried on the
group-norm workload.

    python3 benchmarks/fused_ab.py [PAIRS]      # from the repository root; default 101 pairs
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from normgen import load_spec
from normgen.harness.bench import DEFAULT_FLAGS, CFunctions, load_config

SPEC = Path(__file__).resolve().parent / "cpu.toml"
#: fused workload → its plain counterpart in cpu.toml
PAIRS = {"sd_gn_silu": "sd_gn_nchw", "rn50_bn_relu_nhwc": "rn50_bn_nhwc", "llm_add_ln": "llm_ln"}
#: the other activations, on the group-norm workload
ACTIVATIONS = ("relu", "gelu", "gelu_tanh")


def _ratio(a: CFunctions, b: CFunctions, pairs: int) -> tuple[float, float, float]:
    calls = [a.call("predict"), b.call("predict")]
    times: list[list[float]] = [[], []]
    for i in range(pairs + 2):
        for k in (0, 1) if i % 2 else (1, 0):
            t = time.process_time()
            calls[k]()
            times[k].append(time.process_time() - t)
    ta, tb = np.array(times[0][2:]), np.array(times[1][2:])  # the first pair warms up
    return float(np.median(ta)), float(np.median(tb)), float(np.median(tb / ta))


def main(pairs: int) -> None:
    layers = load_spec(SPEC)
    cfg = load_config(layers, str(SPEC), None, None)
    by = {layer.name: layer for layer in layers}
    flags = DEFAULT_FLAGS.split()
    cases = [(by[plain], by[fused]) for fused, plain in PAIRS.items()]
    cases += [(by["sd_gn_nchw"], by["sd_gn_silu"].replace(name=f"sd_gn_{act}", activation=act)) for act in ACTIVATIONS]
    print(f"{'fused workload':20} {'plain':14} {'plain us':>9} {'fused us':>9} {'ratio':>6}  (median over {pairs} pairs)")
    for plain, fused in cases:
        batch = cfg.batch[plain.name]
        a = CFunctions(plain, flags, batch, np.random.default_rng(0))
        b = CFunctions(fused, flags, batch, np.random.default_rng(0))
        ta, tb, ratio = _ratio(a, b, pairs)
        print(f"{fused.name:20} {plain.name:14} {ta * 1e6:9.1f} {tb * 1e6:9.1f} {ratio:6.3f}", flush=True)
        del a, b


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 101)
