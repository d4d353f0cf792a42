"""The backend-specific operations convrewrite's layers need, in one place.

Everything that calls TensorFlow directly lives here (real FFTs, framing, complex batched matmul, the
kernel-spectrum cache with its custom gradient), so that the layers themselves use `keras.ops` only and a
JAX version of this module is the whole port. Every function documents shapes; complex tensors are
complex64 unless noted.
"""

from __future__ import annotations

import tensorflow as tf

__all__ = [
    "rfft2d", "irfft2d", "complex_matmul", "complex_multiply", "conj", "frame", "bits_equal",
    "SpectrumCache", "cached_transform",
]


# ---- transforms -----------------------------------------------------------------------------------
def rfft2d(x, fft_length):
    """Real 2-D DFT over the two innermost axes.

    x: (..., h, w) float32 with h <= P, w <= Q; zero-padded at the end to fft_length = (P, Q).
    Returns (..., P, Q // 2 + 1) complex64.
    """
    return tf.signal.rfft2d(x, fft_length=[int(fft_length[0]), int(fft_length[1])])


def irfft2d(x, fft_length):
    """Inverse of `rfft2d`: x: (..., P, Q // 2 + 1) complex64 -> (..., P, Q) float32."""
    return tf.signal.irfft2d(x, fft_length=[int(fft_length[0]), int(fft_length[1])])


def conj(x):
    return tf.math.conj(x)


def complex_matmul(a, b):
    """Batched complex matrix product: a: (..., M, K) @ b: (..., K, N) -> (..., M, N), one call.

    Measured on CPU: one complex64 batched matmul beats the 2x-wide real block formulation
    [[Re, Im], [-Im, Re]] and the 4-real-matmul split, both of which pay extra passes to split/join."""
    return tf.linalg.matmul(a, b)


def complex_multiply(a, b):
    """Elementwise (broadcasting) complex product."""
    return tf.math.multiply(a, b)


def frame(x, length, step, axis):
    """Overlapping windows along `axis`: (..., n, ...) -> (..., num, length, ...), num = (n - length) // step + 1.

    Used for overlap-save tiling; `n` may be dynamic (unknown until run time)."""
    return tf.signal.frame(x, frame_length=int(length), frame_step=int(step), pad_end=False, axis=axis)


def bits_equal(a, b):
    """Scalar bool: a and b hold bit-identical float32 values (so NaN == NaN, -0.0 != 0.0).

    Bitwise rather than `==` so that a cached value derived from `b` is provably the one `a` gives."""
    a = tf.bitcast(tf.cast(a, tf.float32), tf.int32)
    b = tf.bitcast(tf.cast(b, tf.float32), tf.int32)
    return tf.reduce_all(tf.equal(a, b))


# ---- the kernel-spectrum cache --------------------------------------------------------------------
class SpectrumCache(tf.Module):
    """Holds one cached transform of one kernel, plus the exact kernel value it was computed from.

    value: the cached transform (any shape/dtype, fixed at creation); key: a float32 copy of the kernel
    it was computed from; valid: False until the first computation. None of these are Keras weights:
    they are not in `layer.weights`, not in `get_weights()`, and not saved in `.keras` files. They are
    tf.Module-tracked so that TensorFlow's own SavedModel export can still capture them.
    """

    def __init__(self, key_shape, value_shape, value_dtype, name="spectrum_cache"):
        super().__init__(name=name)
        with tf.init_scope():  # create eagerly even if the layer is first built inside a tf.function
            self.key = tf.Variable(tf.zeros(key_shape, tf.float32), trainable=False, name="key")
            self.value = tf.Variable(tf.zeros(value_shape, value_dtype), trainable=False, name="value")
            self.valid = tf.Variable(False, trainable=False, name="valid")

    def invalidate(self):
        self.valid.assign(False)


def cached_transform(kernel, cache: SpectrumCache, compute):
    """compute(kernel), taken from `cache` when `kernel` is bit-identical to the kernel cached last.

    kernel: float32 tensor (the layer's current kernel value); compute: a differentiable function of
    it (e.g. its FFT). The check reads the whole kernel (kh*kw*Cin*Cout values), far cheaper than the
    transform, and it is exact: whatever changed the kernel (fit, set_weights, load_weights,
    `kernel.assign`, an optimizer step inside the same tf.function) changes its bits, so a stale
    transform is never returned. On a miss the transform is recomputed and stored.

    Gradients flow to `kernel` as if compute(kernel) had been evaluated: the backward pass recomputes
    compute's vector-Jacobian product, so a GradientTape around an inference-mode call still trains.
    """
    kernel = tf.convert_to_tensor(kernel, tf.float32)

    @tf.custom_gradient
    def lookup(k):
        def refresh():
            value = compute(k)
            with tf.control_dependencies([cache.value.assign(value), cache.key.assign(k), cache.valid.assign(True)]):
                return tf.identity(value)

        hit = tf.logical_and(cache.valid, bits_equal(k, cache.key))
        value = tf.cond(hit, lambda: tf.identity(cache.value.read_value()), refresh)

        def grad(upstream):
            with tf.GradientTape() as tape:
                tape.watch(k)
                recomputed = compute(k)
            return tape.gradient(recomputed, k, output_gradients=upstream)

        return value, grad

    return lookup(kernel)
