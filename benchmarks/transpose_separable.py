"""Conv2DTranspose and SeparableConv2D: Keras's own layer vs each convrewrite replacement, side by side.

For each shape it builds Keras's layer and every replacement that applies, all with the same weights, compiles
each call with tf.function (inference), runs them interleaved (warm-up excluded) and prints median times,
the ratio Keras / replacement (> 1: faster than Keras) and the normwise relative error vs Keras.

  * Conv2DTranspose, decoder shapes (4x4 / 3x3 / 2x2 stride 2, 3x3 stride 1) and larger kernels:
    `subpixel` (one stride-1 Conv2D with s*s*filters outputs + depth_to_space) and `subpixel-fft` (that
    conv by FFT);
  * SeparableConv2D at 56x56x128: `sep-fft` (depthwise stage by full-image FFT), `sep-fft-tiled` (overlap-save
    tiles) and, for kernel widths 12-13, `sep-wide` (depthwise stage at width 14).

    python benchmarks/transpose_separable.py            # batch 8, 7 rounds
    python benchmarks/transpose_separable.py --quick    # batch 2, 3 rounds
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

from convrewrite import implementations  # noqa: E402
from convrewrite.spec import spec_from_layer  # noqa: E402
from convrewrite.timing import compiled, time_interleaved  # noqa: E402

TRANSPOSE = [  # (kernel, stride, Cin, Cout, size)
    (4, 2, 64, 32, 56), (3, 2, 64, 32, 56), (2, 2, 128, 64, 28), (4, 2, 256, 128, 14), (3, 1, 64, 64, 56),
    (8, 2, 32, 32, 32), (11, 1, 32, 32, 56), (16, 2, 16, 16, 32), (21, 1, 32, 32, 64), (31, 1, 16, 16, 64),
]
SEPARABLE = [(3, 128, 128, 56), (7, 128, 128, 56), (13, 128, 128, 56), (31, 128, 128, 56)]
NAMES = {"conv2d_transpose": ("subpixel", "subpixel-fft"), "separable_conv2d": ("sep-fft", "sep-fft-tiled", "sep-wide")}


def rel_error(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def compare(layer, x, repeats):
    """{name: (median ms, ratio vs Keras, rel error)} for Keras's `layer` and every replacement that applies."""
    rng = np.random.default_rng(0)
    layer(x)
    layer.set_weights([rng.standard_normal(w.shape).astype("float32") * 0.1 for w in layer.get_weights()])
    spec = spec_from_layer(layer, x.shape)
    variants = {"keras": layer}
    for name in NAMES[spec.kind]:
        impl = implementations.get(name)
        if impl.applicable(spec)[0]:
            new = impl.make_layer(layer, spec)
            new(x)
            impl.transfer_weights(layer, new, spec)
            variants[name] = new
    want = layer(x)
    fns = {name: compiled(lambda v=v: v(x)) for name, v in variants.items()}
    times = time_interleaved(fns, repeats=repeats, warmup=2)
    base = times["keras"]["median"]
    return spec, {name: (1e3 * t["median"], base / t["median"], rel_error(variants[name](x), want))
                  for name, t in times.items()}


def report(spec, rows):
    cells = [f"{name} {ms:8.2f} ms {ratio:5.2f}x (err {err:.1e})" if name != "keras" else f"keras {ms:8.2f} ms"
             for name, (ms, ratio, err) in rows.items()]
    best = max((r for n, r in rows.items() if n != "keras"), key=lambda r: r[1], default=None)
    wins = f"best {best[1]:.2f}x" if best else ""
    print(f"{spec.short():42s} " + " | ".join(cells) + f"  -> {wins}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 2, 3 rounds")
    parser.add_argument("--only", choices=("transpose", "separable"), help="one kind only")
    args = parser.parse_args()
    batch, repeats = (2, 3) if args.quick else (8, 7)
    rng = np.random.default_rng(1)
    print(f"batch {batch}, {repeats} interleaved rounds, medians; ratio = Keras / replacement (> 1: faster)")
    if args.only != "separable":
        for k, s, cin, cout, hw in TRANSPOSE:
            x = rng.standard_normal((batch, hw, hw, cin)).astype("float32")
            report(*compare(keras.layers.Conv2DTranspose(cout, k, strides=s, padding="same"), x, repeats))
    if args.only != "transpose":
        for k, cin, cout, hw in SEPARABLE:
            x = rng.standard_normal((batch, hw, hw, cin)).astype("float32")
            report(*compare(keras.layers.SeparableConv2D(cout, k, padding="same"), x, repeats))


if __name__ == "__main__":
    main()
