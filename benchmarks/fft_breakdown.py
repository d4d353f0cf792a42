"""Where a replacement convolution's time goes: its steps timed one by one beside the whole layer and Keras's.

    python benchmarks/fft_breakdown.py

For the two benchmark shapes of fft_vs_direct.py at the kernel size where this CPU's crossover question
is decided (dense 8x64x64, 32->32, 21x21; depthwise 8x56x56x128, 31x31), each step of
`convrewrite.layers.fft` (layout transpose, rfft2d, the per-bin product, irfft2d) runs alone on tensors
of the shapes the layer uses, interleaved with the whole FFT layer and Keras's layer; medians in ms.
The steps overlap inside the layer (TF runs independent ops in parallel), so they need not add up.

The same two shapes then run through the matmul transform (`transform="matmul"`, implementation
`fft-matmul`, `convrewrite/layers/dft_matmul.py`: the DFTs as matrix products, channels last), step by step:
the forward W and H products, the per-bin product (dense: with its two bins-major transposes; depthwise: a
broadcast complex multiply), the inverse H and W products for the kept outputs only, the whole layer.
A third case, depthwise 13x13 (a kernel width in TensorFlow's slow
band), times `WideDepthwiseConv2D`'s steps: its finiteness guard and the 13x14 kernel it runs.
Whole layers also show their fraction of the cores' nominal fp32 peak (see fft_vs_direct.nominal_peak_gflops).
"""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's convrewrite

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from convrewrite.layers import FFTConv2D, FFTDepthwiseConv2D, WideDepthwiseConv2D, backend  # noqa: E402
from convrewrite.layers.fft import fft_cost_features, matmul_cost_features  # noqa: E402
from convrewrite.spec import ConvSpec  # noqa: E402
from convrewrite.timing import time_interleaved  # noqa: E402
from fft_vs_direct import matmul_gflops, nominal_peak_gflops  # noqa: E402


def _layers(kind, shape, k, filters, **options):
    """(input, Keras's layer, its FFT-layer twin built with `options` and the same weights)."""
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal(shape).astype("float32"))
    if kind == "dense":
        ref, cls = keras.layers.Conv2D(filters, k, padding="same"), FFTConv2D
    else:
        ref, cls = keras.layers.DepthwiseConv2D(k, padding="same"), FFTDepthwiseConv2D
    ref.build(shape)
    twin = cls(**ref.get_config(), **options)
    twin.build(shape)
    twin.set_weights(ref.get_weights())
    return x, ref, twin


def steps(kind, shape, k, filters):
    x, ref, fft = _layers(kind, shape, k, filters)
    fft(x)  # fills the spectrum cache and the plan
    p, q = fft.fft_layout.fft_shape
    b, c, o = shape[0], shape[-1], (filters or shape[-1])
    bins = p * (q // 2 + 1)
    xt = tf.transpose(x, [0, 3, 1, 2])
    xf = tf.signal.rfft2d(xt, [p, q])
    yf = tf.signal.rfft2d(tf.transpose(tf.zeros(shape[:3] + (o,)), [0, 3, 1, 2]), [p, q])
    fns = {"transpose x (NHWC -> NCHW)": lambda: tf.transpose(x, [0, 3, 1, 2]),
           f"rfft2d {b * c} images {p}x{q}": lambda: tf.signal.rfft2d(xt, [p, q])}
    if kind == "dense":
        xb = tf.reshape(tf.transpose(xf, [2, 3, 0, 1]), (bins, 1, b, c))
        block = backend.real_block(tf.complex(tf.random.normal((bins, 1, c, o)), tf.random.normal((bins, 1, c, o))))
        prod = backend.real_block_matmul(xb, block)
        fns["spectra to bins-major layout"] = lambda: tf.reshape(tf.transpose(xf, [2, 3, 0, 1]), (bins, 1, b, c))
        fns[f"per-bin product ({bins} x ({b}x{c}) @ ({c}x{o}))"] = lambda: backend.real_block_matmul(xb, block)
        fns["bins-major back to images"] = lambda: tf.transpose(tf.reshape(prod, (p, q // 2 + 1, b, o)), [2, 3, 0, 1])
    else:
        kf = tf.complex(tf.random.normal((c, p, q // 2 + 1)), tf.random.normal((c, p, q // 2 + 1)))
        fns["per-bin product (broadcast multiply)"] = lambda: xf * kf
    fns[f"irfft2d {b * o} images"] = lambda: tf.signal.irfft2d(yf, [p, q])
    fns["transpose y (NCHW -> NHWC)"] = lambda: tf.transpose(xt, [0, 2, 3, 1])
    fns["whole FFT layer"] = lambda: fft(x)
    fns["Keras layer"] = lambda: ref(x)
    return {name: tf.function(fn) for name, fn in fns.items()}


def matmul_steps(kind, shape, k, filters):
    """The matmul transform (`FFTConv2D(..., transform="matmul")`, `layers/dft_matmul.py`): each of its steps
    alone on tensors of the shapes it uses, the whole layer, and its relative error vs Keras's layer."""
    x, ref, layer = _layers(kind, shape, k, filters, transform="matmul")
    want = np.asarray(ref(x), np.float64)
    err = np.max(np.abs(np.asarray(layer(x)) - want)) / np.max(np.abs(want))  # also fills the spectrum cache
    print(f"{kind} matmul transform: relative error vs Keras's layer {err:.1e}")
    p, q = layer.fft_layout.fft_shape
    f = q // 2 + 1
    b, h, w, c = shape
    o = filters or c
    m = {name: tf.constant(v) for name, v in layer._dft_matrices.items()}
    r = tf.random.normal
    t_w, t_h = r((b, 2 * h, f * c)), r((b, 2 * p, f * o))
    t_i = r((b * h, 2 * f, o))
    fns = {f"W: ({2 * f}x{w}) @ ({b * h} x {w}x{c})": lambda: tf.linalg.matmul(m["forward_w"][None], tf.reshape(x, (-1, w, c))),
           f"H: ({2 * p}x{2 * h}) @ ({b} x {2 * h}x{f * c})": lambda: tf.linalg.matmul(m["forward_h"][None], t_w)}
    if kind == "dense":
        xs, ks, zs = r((b, p, 2, f, c)), r((p, f, 1, 2 * c, 2 * o)), r((p, f, 1, b, 2 * o))
        fns["spectra to bins-major"] = lambda: tf.transpose(xs, (1, 3, 0, 2, 4))
        fns[f"per-bin product ({p * f} x ({b}x{2 * c}) @ ({2 * c}x{2 * o}))"] = lambda: tf.linalg.matmul(
            tf.reshape(tf.transpose(xs, (1, 3, 0, 2, 4)), (p, f, 1, b, 2 * c)), ks)
        fns["bins-major back"] = lambda: tf.transpose(tf.reshape(zs, (p, f, b, 2, o)), (2, 0, 3, 1, 4))
    else:
        xs, k1, k2 = r((b, p, 2, f, c, 1)), r((p, 2, f, c, 1)), r((p, 2, f, c, 1))
        fns["per-bin complex multiply (broadcast)"] = lambda: xs * k1 + tf.reverse(xs, [2]) * k2
    fns[f"inverse H: ({2 * h}x{2 * p}) @ ({b} x {2 * p}x{f * o})"] = lambda: tf.linalg.matmul(m["inverse_h"][None], t_h)
    fns[f"inverse W: ({w}x{2 * f}) @ ({b * h} x {2 * f}x{o})"] = lambda: tf.linalg.matmul(m["inverse_w"][None], t_i)
    fns["whole matmul-transform layer"] = lambda: layer(x)
    fns["Keras layer"] = lambda: ref(x)
    return {name: tf.function(fn) for name, fn in fns.items()}


def wide_steps(shape, k):
    """Depthwise k x k (k in TF's slow width band): Keras's layer, the wide layer, and its two steps."""
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal(shape).astype("float32"))
    ref = keras.layers.DepthwiseConv2D(k, padding="same")
    ref.build(shape)
    wide = WideDepthwiseConv2D(**ref.get_config())
    wide.build(shape)
    wide.set_weights(ref.get_weights())
    run = wide.run_kernel_size
    kernel = tf.pad(ref.kernel, [(0, run[0] - k), (0, run[1] - k), (0, 0), (0, 0)])
    fns = {"finiteness guard ||x|| ||kernel||": lambda: backend.l2_norm(x) * backend.l2_norm(ref.kernel),
           f"depthwise {run[0]}x{run[1]} alone": lambda: tf.nn.depthwise_conv2d(x, kernel, [1] * 4, "SAME"),
           "whole wide layer": lambda: wide(x), "Keras layer": lambda: ref(x)}
    return {name: tf.function(fn) for name, fn in fns.items()}


def flops(kind, shape, k, filters):
    """Arithmetic of the whole layers: 2 x MACs for direct kernels (zero taps included for the wide one), the
    FFT layer's transforms and per-bin products (`fft_cost_features`)."""
    b, h, w, c = shape
    macs = b * h * w * c * k * k * (filters or 1)
    spec = ConvSpec(kind="conv2d" if kind == "dense" else "depthwise_conv2d", in_channels=c, filters=filters or c,
                    kernel=(k, k), height=h, width=w, batch=b, padding="same", groups=1 if kind == "dense" else c)
    return {"Keras layer": 2.0 * macs, "whole wide layer": 2.0 * macs * 14 / k,
            "whole FFT layer": fft_cost_features(spec, "full")["flops"],
            "whole matmul-transform layer": matmul_cost_features(spec)["flops"]}


def main():
    cases = [("dense", (8, 64, 64, 32), 21, 32, "Conv2D 8x64x64, 32->32, 21x21, same"),
             ("dense-mm", (8, 64, 64, 32), 21, 32, "Conv2D 8x64x64, 32->32, 21x21, same, matmul transform"),
             ("depthwise", (8, 56, 56, 128), 31, None, "DepthwiseConv2D 8x56x56x128, 31x31, same"),
             ("depthwise-mm", (8, 56, 56, 128), 31, None, "DepthwiseConv2D 8x56x56x128, 31x31, same, matmul transform"),
             ("wide", (8, 56, 56, 128), 13, None, "DepthwiseConv2D 8x56x56x128, 13x13, same (wide: 13x14)")]
    tf.get_logger().setLevel("ERROR")
    peak = nominal_peak_gflops() or matmul_gflops()
    print(f"% peak: of {peak:.0f} GFLOP/s fp32 (a 2048^3 matmul runs at {matmul_gflops():.0f} here)")
    for kind, shape, k, filters, title in cases:
        if kind == "wide":
            fns = wide_steps(shape, k)
        elif kind.endswith("-mm"):
            fns = matmul_steps(kind[:-3], shape, k, filters)
        else:
            fns = steps(kind, shape, k, filters)
        res = time_interleaved(fns, repeats=9, warmup=2)
        work = flops(kind.replace("-mm", ""), shape, k, filters)
        print(f"\n{title}: median ms of 9 interleaved rounds")
        for name, r in res.items():
            pct = f"{100 * work[name] / r['median'] / 1e9 / peak:6.1f}% peak" if name in work else ""
            print(f"  {name:<48} {1e3 * r['median']:8.2f}  {pct}")


if __name__ == "__main__":
    main()
