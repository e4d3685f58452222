"""Train a small network with and without the generated batch-norm layer.

A NumPy multilayer perceptron (dense layers, ReLU, softmax cross-entropy) classifies a synthetic
data set whose features have wildly different scales. The batch-norm layers are normgen's
generated C (format "BC", run-time parameters) driven through the cffi test bench:
``train_forward_save`` → ``backward_saved`` → ``update`` (MATLAB's sgdm with the layer's
learn-rate and L2 factors), and at the end the 'population' statistics (``accumulate`` /
``finalize``) become the trained statistics that ``predict`` uses.

    python examples/train/train.py                 # the full run recorded in README.md
    python examples/train/train.py --epochs 3      # a quick look
    python examples/train/train.py --plot loss.png # also plot (needs matplotlib)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a source checkout

from normgen import BatchNorm, build  # noqa: E402

DTYPE = np.float32


def make_data(n: int, features: int = 16, classes: int = 4, seed: int = 0):
    """Gaussian clusters, then every feature scaled by a factor between 1e-2 and 1e2 and
    shifted: the ill-conditioned inputs that make plain SGD slow."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0.0, 1.0, (classes, features))
    labels = rng.integers(0, classes, n)
    x = centers[labels] + rng.normal(0.0, 1.2, (n, features))
    x = x * 10.0 ** rng.uniform(-2, 2, features) + rng.normal(0.0, 5.0, features)
    return x.astype(DTYPE), labels


class Dense:
    """y = x W + b, trained with the same sgdm step the generated update performs."""

    def __init__(self, n_in: int, n_out: int, rng: np.random.Generator):
        self.w = (rng.normal(0.0, 1.0, (n_in, n_out)) * np.sqrt(2.0 / n_in)).astype(DTYPE)
        self.b = np.zeros(n_out, DTYPE)
        self.vw, self.vb = np.zeros_like(self.w), np.zeros_like(self.b)

    def forward(self, x):
        self.x = x
        return x @ self.w + self.b

    def backward(self, dy):
        self.dw, self.db = self.x.T @ dy, dy.sum(axis=0)
        return dy @ self.w.T

    def update(self, learn_rate, l2, momentum):
        self.vw = momentum * self.vw - learn_rate * (self.dw + l2 * self.w)
        self.vb = momentum * self.vb - learn_rate * (self.db + l2 * self.b)
        self.w += self.vw
        self.b += self.vb


class GeneratedBatchNorm:
    """The generated C batch norm (format "BC") in the network, through normgen's test bench."""

    def __init__(self, name: str, width: int):
        self.layer = BatchNorm(name=name, format="BC", shape=[width], param_storage="runtime",
                               mean_decay=0.1, variance_decay=0.1)  # fmt: skip
        self.c = build(self.layer)

    def forward(self, x, training: bool):
        if not training:
            return self.c.predict(x)
        self.x = np.ascontiguousarray(x)
        y, self.mean, self.invstd = self.c.train_forward_save(self.x)
        return y

    def backward(self, dy):
        dx, self.dscale, self.doffset = self.c.backward_saved(self.x, dy, self.mean, self.invstd)
        return dx

    def update(self, learn_rate, l2, momentum):
        self.c.update(self.dscale, self.doffset, learn_rate=learn_rate, l2=l2, momentum=momentum)


class Relu:
    def forward(self, x, training=True):
        self.mask = x > 0
        return x * self.mask

    def backward(self, dy):
        return dy * self.mask


def build_network(features, hidden, classes, batch_norm: bool, seed: int):
    rng = np.random.default_rng(seed)
    layers, n_in = [], features
    for i, width in enumerate(hidden):
        layers.append(Dense(n_in, width, rng))
        if batch_norm:
            layers.append(GeneratedBatchNorm(f"train_bn{i}_{width}", width))
        layers.append(Relu())
        n_in = width
    layers.append(Dense(n_in, classes, rng))
    return layers


def forward(layers, x, training=True):
    for layer in layers:
        x = layer.forward(x) if isinstance(layer, Dense) else layer.forward(x, training)
    return x


def cross_entropy(logits, labels):
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    loss = -np.log(p[np.arange(len(labels)), labels] + 1e-12).mean()
    grad = p
    grad[np.arange(len(labels)), labels] -= 1.0
    return float(loss), (grad / len(labels)).astype(DTYPE)


def evaluate(layers, x, labels):
    loss, _ = cross_entropy(forward(layers, x, training=False), labels)
    return loss


def train(
    batch_norm: bool,
    *,
    epochs: int,
    samples: int,
    batch: int = 64,
    hidden=(64, 64, 64),
    learn_rate: float = 0.01,
    l2: float = 1e-4,
    momentum: float = 0.9,
    seed: int = 0,
    log=print,
):
    """Train; return the mean training loss of every epoch."""
    x, labels = make_data(samples, seed=seed)
    layers = build_network(x.shape[1], hidden, int(labels.max()) + 1, batch_norm, seed)
    rng = np.random.default_rng(seed + 1)
    history = []
    for epoch in range(1, epochs + 1):
        order = rng.permutation(samples)
        losses = []
        for start in range(0, samples - batch + 1, batch):
            idx = order[start : start + batch]
            loss, grad = cross_entropy(forward(layers, x[idx]), labels[idx])
            if not np.isfinite(loss):
                break
            losses.append(loss)
            for layer in reversed(layers):
                grad = layer.backward(grad)
            for layer in layers:
                if hasattr(layer, "update"):
                    layer.update(learn_rate, l2, momentum)
        history.append(float(np.mean(losses)) if losses else float("nan"))
        log(f"  {'with' if batch_norm else 'without'} batch norm  epoch {epoch:3d}  training loss {history[-1]:.4f}")
        if not np.isfinite(history[-1]):
            break
    if batch_norm:
        # MATLAB's 'population' statistics: a pass over the training data per batch-norm layer
        # (earlier layers already in inference mode), merged exactly, then finalized into the
        # run-time params, which predict uses from then on.
        for k, bn in enumerate(layers):
            if not isinstance(bn, GeneratedBatchNorm):
                continue
            bn.c.reset_stats()
            for start in range(0, samples, 256):
                bn.c.accumulate(np.ascontiguousarray(forward(layers[:k], x[start : start + 256], training=False)))
            bn.c.finalize()
    log(
        f"  {'with' if batch_norm else 'without'} batch norm  final loss on the whole set (inference mode):"
        f" {evaluate(layers, x, labels):.4f}"
    )
    return history


def epochs_to_reach(history, target):
    return next((i + 1 for i, loss in enumerate(history) if loss <= target), None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--samples", type=int, default=4096)
    p.add_argument("--learn-rate", type=float, default=0.01)
    p.add_argument("--plot", metavar="FILE", help="save a loss-per-epoch plot (needs matplotlib)")
    args = p.parse_args(argv)
    results = {}
    for bn in (False, True):
        t0 = time.perf_counter()
        print(f"{'with' if bn else 'without'} batch norm:")
        results[bn] = train(bn, epochs=args.epochs, samples=args.samples, learn_rate=args.learn_rate)
        print(f"  ({time.perf_counter() - t0:.1f} s)")
    plain, normed = results[False], results[True]
    print("epochs to reach a training loss:")
    print(f"  {'loss':>6}  {'without BN':>10}  {'with BN':>8}")
    for target in (0.6, 0.4, 0.3, 0.25, plain[-1]):
        a, b = epochs_to_reach(plain, target), epochs_to_reach(normed, target)
        print(f"  {target:6.4f}  {a if a else '-':>10}  {b if b else '-':>8}")
    if args.plot:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib is not installed: no plot")
            return 0
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(range(1, len(plain) + 1), plain, label="without batch norm")
        ax.plot(range(1, len(normed) + 1), normed, label="with generated batch norm")
        ax.set_xlabel("epoch")
        ax.set_ylabel("training loss")
        ax.set_yscale("log")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
