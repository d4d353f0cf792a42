"""Where a replacement convolution's time goes: its steps timed one by one beside the whole layer and Keras's.

    python benchmarks/fft_breakdown.py

For the two benchmark shapes of fft_vs_direct.py at the kernel size where this CPU's crossover question
is decided (dense 8x64x64, 32->32, 21x21; depthwise 8x56x56x128, 31x31), each step of
`convrewrite.layers.fft` (layout transpose, rfft2d, the per-bin product, irfft2d) runs alone on tensors
of the shapes the layer uses, interleaved with the whole FFT layer and Keras's layer; medians in ms.
The steps overlap inside the layer (TF runs independent ops in parallel), so they need not add up.

Beside them: the dense case also times a *dense DFT written as matrix products* (channels last, zero-padding
folded into the DFT matrices, real-input symmetry, re/im kept as separate real matmul operands, the complex
combination folded into the per-bin product and into the inverse, only kept outputs computed): the
"FFT at matrix-multiply speed" candidate, measured here and not shipped (it ran no faster than the tf.signal
layer on Xeon 6/167/1, see the README). A third case, depthwise 13x13 (a kernel width in TensorFlow's slow
band), times `WideDepthwiseConv2D`'s steps: its finiteness guard and the 13x14 kernel it runs.
Whole layers also show their fraction of the cores' nominal fp32 peak (see fft_vs_direct.nominal_peak_gflops).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from convrewrite.layers import FFTConv2D, FFTDepthwiseConv2D, WideDepthwiseConv2D, backend  # noqa: E402
from convrewrite.layers.fft import fft_cost_features  # noqa: E402
from convrewrite.spec import ConvSpec  # noqa: E402
from convrewrite.timing import time_interleaved  # noqa: E402
from fft_vs_direct import matmul_gflops, nominal_peak_gflops  # noqa: E402


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
    if kind == "dense":
        gemm = gemm_dft_conv(ref.kernel.numpy(), shape, k)
        want = np.asarray(ref.convolution_op(x, ref.kernel), np.float64)
        err = np.max(np.abs(np.asarray(gemm(x)) - want)) / np.max(np.abs(want))
        print(f"dense DFT as matmuls: relative error vs Keras's convolution {err:.1e}")
        fns["dense DFT as matmuls (prototype, not shipped)"] = lambda: gemm(x)
    fns["Keras layer"] = lambda: ref(x)
    return {name: tf.function(fn) for name, fn in fns.items()}


def gemm_dft_conv(kernel, shape, k):
    """A SAME, stride-1 Conv2D (x: (B, H, W, C), kernel (k, k, C, O)) through dense DFTs as matrix products.

    W: real DFT (2Q' x W) @ (B*H, W, C); H: complex DFT as [cos; -sin] (2P x H) @ (B, H, 2Q' C); one transpose
    to bins-major; per-bin product (B x 4C) @ (4C x 2O), whose rows combine the four (H re/im) x (W re/im)
    partial products (no complex elementwise pass); inverse H only for the kept rows; one transpose; inverse
    real DFT along W with the Hermitian weights and the re/im combination in one (W x 4Q') matrix."""
    b, h, w, c = shape
    o = kernel.shape[-1]
    pb = (k - 1) // 2
    p = max(h + pb, h + k - 1 - pb)
    q = max(w + pb, w + k - 1 - pb)
    qq = np.arange(q // 2 + 1)
    fw = np.concatenate([np.cos(2 * np.pi * np.outer(qq, np.arange(w)) / q),
                         -np.sin(2 * np.pi * np.outer(qq, np.arange(w)) / q)])
    fh = np.concatenate([np.cos(2 * np.pi * np.outer(np.arange(p), np.arange(h)) / p),
                         -np.sin(2 * np.pi * np.outer(np.arange(p), np.arange(h)) / p)])
    padded = np.zeros((p, q, c, o))
    padded[:k, :k] = kernel
    spec = np.conj(np.fft.rfft2(np.roll(padded, (-pb, -pb), (0, 1)), axes=(0, 1)))  # (P, Q', C, O)
    re, im = spec.real, spec.imag
    rows = [np.concatenate(pair, -1) for pair in ((re, im), (-im, re), (-im, re), (-re, -im))]  # rr, ri, ir, ii
    k4 = np.stack(rows, 2).reshape(p, len(qq), 4 * c, 2 * o)
    gh = np.concatenate([np.cos(2 * np.pi * np.outer(np.arange(h), np.arange(p)) / p),
                         np.sin(2 * np.pi * np.outer(np.arange(h), np.arange(p)) / p)]) / p
    weight = np.where((qq == 0) | ((q % 2 == 0) & (qq == q // 2)), 1.0, 2.0) / q
    cos = np.cos(2 * np.pi * np.outer(np.arange(w), qq) / q) * weight
    sin = np.sin(2 * np.pi * np.outer(np.arange(w), qq) / q) * weight
    inv_w = np.stack([np.stack([cos, -sin], -1), np.stack([-sin, -cos], -1)], 1).reshape(w, 4 * len(qq))
    fw, fh, k4, gh, inv_w = (tf.constant(a.astype("float32")) for a in (fw, fh, k4, gh, inv_w))
    n = len(qq)

    def conv(x):
        t = tf.linalg.matmul(fw[None], tf.reshape(x, (b * h, w, c)))  # (B H, 2Q', C)
        t = tf.reshape(tf.linalg.matmul(fh[None], tf.reshape(t, (b, h, 2 * n * c))), (b, 2, p, 2, n, c))
        t = tf.reshape(tf.transpose(t, (2, 4, 0, 1, 3, 5)), (p, n, b, 4 * c))  # bins-major, rows (s, t, c)
        z = tf.linalg.matmul(t, k4)  # (P, Q', B, 2 O)
        a = tf.reshape(tf.linalg.matmul(gh, tf.reshape(z, (p, n * b * 2 * o))), (2, h, n, b, 2, o))
        a = tf.reshape(tf.transpose(a, (3, 1, 0, 2, 4, 5)), (b * h, 4 * n, o))  # (B H, (s', q, u), O)
        return tf.reshape(tf.linalg.matmul(inv_w[None], a), (b, h, w, o))

    return conv


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
            "whole FFT layer": fft_cost_features(spec, "full")["flops"]}


def main():
    cases = [("dense", (8, 64, 64, 32), 21, 32, "Conv2D 8x64x64, 32->32, 21x21, same"),
             ("depthwise", (8, 56, 56, 128), 31, None, "DepthwiseConv2D 8x56x56x128, 31x31, same"),
             ("wide", (8, 56, 56, 128), 13, None, "DepthwiseConv2D 8x56x56x128, 13x13, same (wide: 13x14)")]
    tf.get_logger().setLevel("ERROR")
    peak = nominal_peak_gflops() or matmul_gflops()
    print(f"% peak: of {peak:.0f} GFLOP/s fp32 (a 2048^3 matmul runs at {matmul_gflops():.0f} here)")
    for kind, shape, k, filters, title in cases:
        fns = wide_steps(shape, k) if kind == "wide" else steps(kind, shape, k, filters)
        res = time_interleaved(fns, repeats=9, warmup=2)
        work = flops(kind, shape, k, filters)
        print(f"\n{title}: median ms of 9 interleaved rounds")
        for name, r in res.items():
            pct = f"{100 * work[name] / r['median'] / 1e9 / peak:6.1f}% peak" if name in work else ""
            print(f"  {name:<48} {1e3 * r['median']:8.2f}  {pct}")


if __name__ == "__main__":
    main()
