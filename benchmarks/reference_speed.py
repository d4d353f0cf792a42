"""numpy reference conv2d vs a naive per-pixel loop vs TensorFlow, on one shape.

    python benchmarks/reference_speed.py

Prints median seconds and ratios. The naive loop is slow, so it gets its own 3 interleaved rounds beside
the reference, and its time is reported scaled by the reference's time in the main 15-round run.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from convrewrite import reference  # noqa: E402
from convrewrite.timing import time_interleaved  # noqa: E402


def naive_conv2d(x, k):
    """The loop users write first: one dot product per output pixel (VALID, stride 1)."""
    n, h, w, c = x.shape
    kh, kw, _, o = k.shape
    out = np.zeros((n, h - kh + 1, w - kw + 1, o), x.dtype)
    for b in range(n):
        for i in range(h - kh + 1):
            for j in range(w - kw + 1):
                out[b, i, j] = np.tensordot(x[b, i:i + kh, j:j + kw, :], k, axes=3)
    return out


def main():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 64, 64, 32)).astype("float32")
    k = rng.standard_normal((3, 3, 32, 32)).astype("float32")
    tf_conv = tf.function(lambda: tf.nn.conv2d(x, k, 1, "VALID"))
    res = time_interleaved({"numpy reference": lambda: reference.conv2d(x, k),
                            "tf.nn.conv2d": lambda: tf_conv()}, repeats=15, warmup=2)
    # The loop is ~10x slower than the reference: 3 rounds, interleaved with the reference it is compared to.
    slow = time_interleaved({"naive": lambda: naive_conv2d(x, k), "numpy reference": lambda: reference.conv2d(x, k)},
                            repeats=3, warmup=0)
    t_naive = slow["naive"]["median"] * res["numpy reference"]["median"] / slow["numpy reference"]["median"]
    naive = naive_conv2d(x, k)
    err = np.abs(naive - reference.conv2d(x, k)).max() / np.abs(naive).max()
    ref, tfm = res["numpy reference"]["median"], res["tf.nn.conv2d"]["median"]
    print("shape: x (4, 64, 64, 32), kernel 3x3 32->32, VALID")
    print(f"{'variant':<18} {'median s':>10} {'vs reference':>13}")
    print(f"{'naive loop':<18} {t_naive:>10.4f} {t_naive / ref:>12.1f}x")
    print(f"{'numpy reference':<18} {ref:>10.4f} {1.0:>12.1f}x")
    print(f"{'tf.nn.conv2d':<18} {tfm:>10.4f} {tfm / ref:>12.2f}x")
    print(f"naive vs reference relative error: {err:.1e}")


if __name__ == "__main__":
    main()
