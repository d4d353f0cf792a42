"""Where an FFT convolution's time goes: its steps timed one by one beside the whole layer and Keras's.

    python benchmarks/fft_breakdown.py

For the two benchmark shapes of fft_vs_direct.py at the kernel size where this CPU's crossover question
is decided (dense 8x64x64, 32->32, 21x21; depthwise 8x56x56x128, 31x31), each step of
`convrewrite.layers.fft` (layout transpose, rfft2d, the per-bin product, irfft2d) runs alone on tensors
of the shapes the layer uses, interleaved with the whole FFT layer and Keras's layer; medians in ms.
The steps overlap inside the layer (TF runs independent ops in parallel), so they need not add up.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from convrewrite.layers import FFTConv2D, FFTDepthwiseConv2D, backend  # noqa: E402
from convrewrite.timing import time_interleaved  # noqa: E402


def steps(kind, shape, k, filters):
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal(shape).astype("float32"))
    if kind == "dense":
        ref, cls = keras.layers.Conv2D(filters, k, padding="same"), FFTConv2D
    else:
        ref, cls = keras.layers.DepthwiseConv2D(k, padding="same"), FFTDepthwiseConv2D
    ref.build(shape)
    fft = cls(**ref.get_config())
    fft.build(shape)
    fft.set_weights(ref.get_weights())
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


def main():
    cases = [("dense", (8, 64, 64, 32), 21, 32, "Conv2D 8x64x64, 32->32, 21x21, same"),
             ("depthwise", (8, 56, 56, 128), 31, None, "DepthwiseConv2D 8x56x56x128, 31x31, same")]
    tf.get_logger().setLevel("ERROR")
    for kind, shape, k, filters, title in cases:
        res = time_interleaved(steps(kind, shape, k, filters), repeats=9, warmup=2)
        print(f"\n{title}: median ms of 9 interleaved rounds")
        for name, r in res.items():
            print(f"  {name:<48} {1e3 * r['median']:8.2f}")


if __name__ == "__main__":
    main()
