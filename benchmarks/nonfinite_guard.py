"""What the FFT layers' non-finite / overflow guard costs: the layer as shipped (guard + tf.cond + FFT)
against its FFT path called alone (no guard), interleaved, under tf.function, on finite inputs.

    python benchmarks/nonfinite_guard.py [--repeats 15]

The guard (see `_FFTConvMixin._fft_is_exact`) is one ||x||_2 reduction over the input (one read of x)
and a tf.cond per call; the kernel's bound is cached with its spectrum. Warm-up calls (tracing, the spectrum cache fill) are excluded; each round calls
every variant once; medians in ms; the ratio is guarded / unguarded (1.00 = free). The guard's own ops are
timed alone too. Shapes: the dense and depthwise benchmark shapes of fft_vs_direct.py, a smaller dense
one (where a fixed cost weighs most) and a tiled (overlap-save) layer.
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's convrewrite

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from convrewrite.layers import FFTConv2D, FFTDepthwiseConv2D  # noqa: E402
from convrewrite.timing import time_interleaved  # noqa: E402

CASES = [
    # (label, kind, input shape, kernel, filters, tile_size)
    ("dense 8x64x64 32->32 k21 full", "dense", (8, 64, 64, 32), 21, 32, "full"),
    ("dense 8x32x32 16->16 k9 full", "dense", (8, 32, 32, 16), 9, 16, "full"),
    ("depthwise 8x56x56x128 k31 full", "dw", (8, 56, 56, 128), 31, None, "full"),
    ("dense 4x128x128 16->16 k15 tiled", "dense", (4, 128, 128, 16), 15, 16, None),
]


def variants(kind, shape, k, filters, tile):
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal(shape).astype("float32"))
    if kind == "dense":
        ref, cls = keras.layers.Conv2D(filters, k, padding="same"), FFTConv2D
    else:
        ref, cls = keras.layers.DepthwiseConv2D(k, padding="same"), FFTDepthwiseConv2D
    ref.build(shape)
    layer = cls(**ref.get_config(), tile_size=tile)
    layer.build(shape)
    layer.set_weights(ref.get_weights())
    layer(x)  # builds the plan and fills the spectrum cache
    plan = layer.fft_layout

    def unguarded():
        kernel, bias = layer._float32_weights()
        spectrum, _ = layer._spectrum(kernel, plan, False)
        return layer._fft_call(x, spectrum, bias, plan)

    kernel, bias = layer._float32_weights()
    lip = layer._spectrum(kernel, plan, False)[1]

    def guard_alone():
        return tf.cast(layer._fft_is_exact(x, lip, bias, plan), tf.float32)

    fns = {"guarded (as shipped)": lambda: layer(x), "unguarded FFT path": unguarded, "guard alone": guard_alone}
    fns = {name: tf.function(fn) for name, fn in fns.items()}
    got, want = fns["guarded (as shipped)"]().numpy(), fns["unguarded FFT path"]().numpy()
    assert np.array_equal(got, want), "the guarded layer did not take the FFT path on a finite input"
    return fns


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    print(f"TF {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} CPUs; medians of {args.repeats} "
          f"interleaved rounds, 3 warm-up calls excluded")
    print(f"{'case':<36} {'unguarded ms':>12} {'guarded ms':>11} {'ratio':>6} {'guard alone ms':>15}")
    for label, kind, shape, k, filters, tile in CASES:
        times = time_interleaved(variants(kind, shape, k, filters, tile), repeats=args.repeats, warmup=3)
        g, u = times["guarded (as shipped)"]["median"], times["unguarded FFT path"]["median"]
        print(f"{label:<36} {u * 1e3:>12.2f} {g * 1e3:>11.2f} {g / u:>6.3f} {times['guard alone']['median'] * 1e3:>15.3f}")


if __name__ == "__main__":
    main()
