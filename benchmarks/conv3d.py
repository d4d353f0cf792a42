"""FFTConv3D vs Keras's own Conv3D, side by side in one process, kernel sizes 3..11.

Each size builds Keras's Conv3D and FFTConv3D with the same weights (batch 2, 16 x 32 x 32 volume, 16 -> 16
channels, SAME padding by default), compiles both with tf.function (inference), runs them interleaved after
a warm-up and prints medians, the ratio Keras / FFT (> 1: the FFT is faster) and the normwise relative error
against Keras. A k^3 kernel costs k^3 MACs per output and channel pair directly and about the same through the
FFT whatever k, so the crossover comes at much smaller kernels than in 2-D.

    python benchmarks/conv3d.py            # kernels 3, 5, 7, 9, 11
    python benchmarks/conv3d.py --quick    # 3, 5, 7, fewer repetitions
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from convrewrite.layers import FFTConv3D  # noqa: E402
from convrewrite.timing import compiled, time_interleaved  # noqa: E402


def rel_error(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def run_case(k, size=(16, 32, 32), channels=16, batch=2, repeats=7):
    rng = np.random.default_rng(k)
    shape = (batch, *size, channels)
    conv = keras.layers.Conv3D(channels, k, padding="same")
    conv.build(shape)
    weights = [rng.standard_normal(w.shape).astype("float32") / k ** 1.5 for w in conv.get_weights()]
    conv.set_weights(weights)
    fft = FFTConv3D(**conv.get_config())
    fft.build(shape)
    fft.set_weights(weights)
    x = rng.standard_normal(shape).astype("float32")
    fns = {"keras": compiled(lambda t: conv(t)), "fft": compiled(lambda t: fft(t))}
    err = rel_error(fns["fft"](x), fns["keras"](x))
    times = time_interleaved({n: (lambda f=f: f(x)) for n, f in fns.items()}, repeats=repeats, warmup=1)
    ms = {n: 1e3 * t["median"] for n, t in times.items()}
    print(f"conv3d {k}x{k}x{k} {batch}x{'x'.join(map(str, size))} {channels}->{channels}   keras {ms['keras']:8.2f} ms"
          f" | fft {ms['fft']:8.2f} ms x{ms['keras'] / ms['fft']:5.2f} (err {err:.1e})", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="kernels 3, 5, 7 and fewer repetitions")
    args = parser.parse_args()
    print(f"load: {os.getloadavg()[0]:.2f} (1-min average), {os.cpu_count()} CPUs; ratios are Keras / FFT")
    for k in ((3, 5, 7) if args.quick else (3, 5, 7, 9, 11)):
        run_case(k, repeats=5 if args.quick else 9)


if __name__ == "__main__":
    main()
