"""PacConv2D versus Keras Conv2D: forward and forward+backward time per strategy, plus peak memory.

    python benchmarks/pac.py            # k = 3, 5, 7 at 4x64x64, 32 -> 32, 8 guidance channels
    python benchmarks/pac.py --quick    # k = 3 only, fewer rounds

Every variant is a tf.function (no XLA: Keras does not use XLA on CPU by default), timed interleaved
round by round with convrewrite.timing.time_interleaved after a warm-up call (tracing excluded);
medians are reported, and ratios to Conv2D in the same round set, since the machine is shared.
A small-Cin row (3 -> 32) checks the `auto` rule where it picks `patch`.

Peak memory is *estimated analytically* (float32 bytes of the intermediates each strategy creates
besides x, guidance and output; see pac_contract's docstring): on CPU tf.config.experimental.
get_memory_info is unavailable, and tracemalloc does not see TensorFlow's allocator.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from convrewrite.layers.pac import PacConv2D, choose_strategy  # noqa: E402
from convrewrite.timing import time_interleaved  # noqa: E402

tf.get_logger().setLevel("ERROR")  # one tf.function per variant is intended; silence the retracing notice


def peak_bytes(strategy, n, h, w, c, o, f, k):
    """Analytic peak forward bytes of the intermediates (float32), 'same' padding, stride 1."""
    p, t = n * h * w, k * k
    kernel = p * t * (f + 2)  # distances per tap (before the reduction) and K
    if strategy == "conv":
        return 0
    if strategy == "patch":
        return 4 * (kernel + 2 * p * t * c)
    return 4 * (kernel + p * (c + 2 * o))  # one tap's slice and product, plus the running sum


def bench(n, h, w, c, o, f, k, repeats):
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal((n, h, w, c)), tf.float32)
    g = tf.constant(rng.standard_normal((n, h, w, f)), tf.float32)
    conv = keras.layers.Conv2D(o, k, padding="same")
    conv(x)
    layers = {"conv": conv}
    for strategy in ("patch", "shift", "auto"):
        layer = PacConv2D(o, k, padding="same", strategy=strategy)
        layer([x, g])
        layer.set_weights(conv.get_weights())
        layers[strategy] = layer

    def fwd(name):
        layer = layers[name]
        return tf.function(lambda: layer(x) if name == "conv" else layer([x, g]))

    def fwd_bwd(name):
        layer = layers[name]

        @tf.function
        def step():
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x) if name == "conv" else layer([x, g])
                loss = tf.reduce_sum(y * y)
            return tape.gradient(loss, [x] + layer.trainable_variables)

        return step

    fns = {}
    for name in layers:
        fns[f"fwd/{name}"] = fwd(name)
        fns[f"fwd+bwd/{name}"] = fwd_bwd(name)
    times = time_interleaved(fns, repeats=repeats, warmup=2)
    rows = []
    for name in layers:
        rows.append((name, times[f"fwd/{name}"]["median"], times[f"fwd+bwd/{name}"]["median"],
                     peak_bytes(choose_strategy(k * k, c, o) if name == "auto" else name, n, h, w, c, o, f, k)))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args(argv)
    repeats = args.repeats or (7 if args.quick else 15)
    cases = [(4, 64, 64, 32, 32, 8, k) for k in ((3,) if args.quick else (3, 5, 7))]
    cases.append((4, 64, 64, 3, 32, 8, 3))
    print(f"{'shape':34s} {'variant':8s} {'fwd ms':>8s} {'x conv':>7s} {'fwd+bwd ms':>10s} {'x conv':>7s} {'peak MB (est.)':>14s}")
    for n, h, w, c, o, f, k in cases:
        rows = bench(n, h, w, c, o, f, k, repeats)
        base_f, base_b = rows[0][1], rows[0][2]
        best_f = min(r[1] for r in rows if r[0] in ("patch", "shift"))
        shape = f"{n}x{h}x{w} {c}->{o} F={f} k={k}"
        for name, tf_, tb, mem in rows:
            label = f"auto={choose_strategy(k * k, c, o)}" if name == "auto" else name
            print(f"{shape:34s} {label:8s} {tf_ * 1e3:8.2f} {tf_ / base_f:7.2f} {tb * 1e3:10.2f} {tb / base_b:7.2f} "
                  f"{mem / 2**20:14.1f}")
        auto_f = rows[-1][1]
        print(f"{shape:34s} auto / best strategy (fwd): {auto_f / best_f:.2f}")


if __name__ == "__main__":
    main()
