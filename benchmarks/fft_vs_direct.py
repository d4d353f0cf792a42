"""FFT convolution vs Keras's own layer, kernel sizes 3..51, in one process.

For each kernel size it builds Keras's layer and the FFT layer with the same weights, compiles both
with tf.function (inference), runs them interleaved (warm-up excluded) and prints the median times,
the ratio (Keras / FFT: > 1 means FFT is faster) and the normwise relative error. Every size is printed,
including those where FFT loses; the crossover is the smallest kernel from which FFT stays faster.
"cpu ratio" is the same ratio of this process's CPU time (all its threads): on a shared machine the
wall-clock ratio swings with other processes' load (each layer gets one core or two), the CPU-time one
much less; it is not a speed-up on an idle machine, where Keras's conv uses both cores better than FFTs.

    python benchmarks/fft_vs_direct.py            # dense 8x64x64 32->32 and depthwise 8x56x56x128
    python benchmarks/fft_vs_direct.py --quick    # fewer sizes and repetitions
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from convrewrite.layers import FFTConv2D, FFTDepthwiseConv2D  # noqa: E402

FULL_SIZES = (3, 5, 7, 9, 11, 13, 15, 17, 21, 25, 31, 41, 51)
QUICK_SIZES = (3, 5, 7, 9, 11, 15, 21, 31)


def rel_error(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def make_pair(kind, k, channels, filters, tile_size=None):
    """(Keras layer, FFT layer) with identical weights, both built."""
    if kind == "dense":
        ref = keras.layers.Conv2D(filters, k, padding="same")
        cls = FFTConv2D
    else:
        ref = keras.layers.DepthwiseConv2D(k, padding="same")
        cls = FFTDepthwiseConv2D
    return ref, cls, tile_size


def median_ms(times):
    return 1e3 * statistics.median(times)


def run_case(kind, shape, k, filters, reps, warmup, tile_size=None):
    rng = np.random.default_rng(k)
    x = tf.constant(rng.standard_normal(shape).astype("float32"))
    ref, cls, tile = make_pair(kind, k, shape[-1], filters, tile_size)
    ref.build(shape)
    ref.set_weights([rng.standard_normal(w.shape).astype("float32") * 0.1 for w in ref.get_weights()])
    new = cls(**ref.get_config(), tile_size=tile)
    new.build(shape)
    new.set_weights(ref.get_weights())
    f_ref = tf.function(lambda t: ref(t, training=False))
    f_new = tf.function(lambda t: new(t, training=False))
    err = rel_error(f_new(x), f_ref(x))
    for _ in range(warmup):
        f_ref(x).numpy()
        f_new(x).numpy()
    t_ref, t_new, c_ref, c_new = [], [], [], []
    for _ in range(reps):  # interleaved, so load from other processes hits both alike
        for f, t, c in ((f_ref, t_ref, c_ref), (f_new, t_new, c_new)):
            c0, t0 = time.process_time(), time.perf_counter()
            f(x).numpy()
            t.append(time.perf_counter() - t0)
            c.append(time.process_time() - c0)
    plan = new.fft_layout
    mode = f"tiled {plan.rows.tile}x{plan.cols.tile}" if plan.tiled else "full"
    cpu_ratio = statistics.median(c_ref) / statistics.median(c_new)
    return median_ms(t_ref), median_ms(t_new), err, f"{plan.fft_shape[0]}x{plan.fft_shape[1]} {mode}", cpu_ratio


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer kernel sizes and repetitions")
    parser.add_argument("--sizes", type=int, nargs="*", help="kernel sizes (default: 3..51)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per layer")
    args = parser.parse_args(argv)
    sizes = args.sizes or (QUICK_SIZES if args.quick else FULL_SIZES)
    reps = args.reps or (3 if args.quick else 7)
    warmup = 1 if args.quick else 2
    cases = [
        ("dense", (8, 64, 64, 32), 32, "Conv2D 8x64x64, 32->32, same"),
        ("depthwise", (8, 56, 56, 128), None, "DepthwiseConv2D 8x56x56x128, same"),
    ]
    print(f"tensorflow {tf.__version__}, keras {keras.__version__}, {os.cpu_count()} CPUs; medians of {reps} "
          f"interleaved runs after {warmup} warm-up; ratio = keras / fft (> 1: FFT faster)")
    for kind, shape, filters, title in cases:
        print(f"\n{title}")
        header = f"{'k':>3}  {'keras ms':>10}  {'fft ms':>9}  {'ratio':>7}  {'cpu ratio':>9}  {'rel err':>8}  transform"
        print(header)
        print("-" * len(header))
        crossover = None
        for k in sizes:
            t_ref, t_new, err, how, cpu_ratio = run_case(kind, shape, k, filters, reps, warmup)
            ratio = t_ref / t_new
            if ratio > 1 and crossover is None:
                crossover = k
            elif ratio <= 1:
                crossover = None
            print(f"{k:>3}  {t_ref:>10.2f}  {t_new:>9.2f}  {ratio:>6.2f}x  {cpu_ratio:>8.2f}x  {err:>8.1e}  {how}",
                  flush=True)
        print(f"crossover ({kind}): FFT faster from k = {crossover} on" if crossover else
              f"crossover ({kind}): FFT never stays faster in this range")


if __name__ == "__main__":
    main()
