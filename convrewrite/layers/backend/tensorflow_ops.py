"""The backend operations on TensorFlow (see `convrewrite.layers.backend` for the interface).

Everything in convrewrite that calls TensorFlow directly lives here (real FFTs, framing, complex batched
matmul, the kernel-spectrum cache with its custom gradient, compiled calls for timing, device details).
Every function documents shapes; complex tensors are complex64 unless noted.
"""

from __future__ import annotations

import contextlib

import numpy as np
import tensorflow as tf
from tensorflow.python.ops import control_flow_util  # TF's own test for an XLA context (no public one)

__all__ = [
    "rfft2d", "irfft2d", "rfft", "irfft", "rfft3d", "irfft3d", "complex_as_real", "real_as_complex", "real_block", "real_block_matmul",
    "matmul", "complex_multiply", "conj", "frame", "bits_equal", "l2_norm",
    "SpectrumCache", "cached_transform", "exporting", "export_format", "real_arithmetic",
    "resize_bilinear", "after", "device_details", "graph_function",
    "forward_backward", "jit", "custom_gradient", "wait_for",
]


# ---- compiled calls for timing -------------------------------------------------------------------
def graph_function(fn, layers=()):
    """`fn` as a TensorFlow graph function (traced once per input signature), with TF's retracing
    warnings off: timing harnesses build one function per variant on purpose. (`layers`: the layers whose
    variables fn reads; a graph function reads variables by reference already, so they are not needed here.)"""
    tf.get_logger().setLevel("ERROR")
    return tf.function(fn)


def wait_for(result):
    """Wait until every tensor in `result` (any nesting) is computed, by pulling one element of each to the
    host (TensorFlow has no wait without a copy; one element costs a few eager ops)."""
    for t in tf.nest.flatten(result):
        if isinstance(t, (tf.Tensor, tf.Variable)):
            tf.reshape(t, [-1])[:1].numpy()


def forward_backward(call, x, variables):
    """What one training step costs a layer: `call(x)` forward, then the gradients of sum(call(x)) with
    respect to `x` and `variables` (the backward pass a layer inside a network runs). Returns the gradients."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(call(x))
    return tape.gradient(loss, [x, *variables])


# ---- device identity ------------------------------------------------------------------------------
def device_details():
    """("tensorflow", its version, GPU details or None) for `convrewrite.device.fingerprint`.

    GPU details: {"name", "compute_capability": [major, minor], "count", "cuda", "cudnn"} of the first
    visible GPU, with the CUDA / cuDNN versions TensorFlow was built against."""
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "tensorflow", tf.__version__, None
    details = tf.config.experimental.get_device_details(gpus[0])
    build = tf.sysconfig.get_build_info()
    return "tensorflow", tf.__version__, {"name": details.get("device_name", gpus[0].name),
                            "compute_capability": list(details.get("compute_capability", ())), "count": len(gpus),
                            "cuda": build.get("cuda_version"), "cudnn": build.get("cudnn_version")}


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


def rfft(x, fft_length):
    """Real 1-D DFT over the innermost axis: x: (..., n) float32 with n <= P, zero-padded at the end to
    fft_length = P. Returns (..., P // 2 + 1) complex64. (For 1-D convolutions: about 2x faster than
    `rfft2d` of the same data as (..., 1, n), measured on 128 rows of 16384, Xeon 6/167/1, TF 2.21.)"""
    return tf.signal.rfft(x, fft_length=[int(fft_length)])


def irfft(x, fft_length):
    """Inverse of `rfft`: x: (..., P // 2 + 1) complex64 -> (..., P) float32."""
    return tf.signal.irfft(x, fft_length=[int(fft_length)])


def _leading_pair_last(z):
    """(..., a, b, c) -> (..., c, a, b), and the permutation back."""
    rank = len(z.shape)
    lead = list(range(rank - 3))
    return tf.transpose(z, lead + [rank - 1, rank - 3, rank - 2]), lead + [rank - 2, rank - 1, rank - 3]


def _rfft3d_composed(x, fft_length):
    """rfft3d as ops TF can differentiate (it registers no gradient for RFFT3D / IRFFT3D): a real transform
    along the last axis, then a complex 2-D one over the other two."""
    p, q, r = (int(n) for n in fft_length)
    y = tf.signal.rfft(x, fft_length=[r])
    pads = [[0, 0]] * (len(x.shape) - 3) + [[0, p - x.shape[-3]], [0, q - x.shape[-2]], [0, 0]]
    y, back = _leading_pair_last(tf.pad(y, pads))
    return tf.transpose(tf.signal.fft2d(y), back)


def _irfft3d_composed(z, fft_length):
    """irfft3d as differentiable ops: a complex inverse 2-D transform over the leading two axes, then a real
    inverse along the last."""
    y, back = _leading_pair_last(z)
    return tf.signal.irfft(tf.transpose(tf.signal.ifft2d(y), back), fft_length=[int(fft_length[2])])


def _fused_differentiated_as(fused, composed, x):
    """fused(x), with the gradient of composed(x) (the same function as ops TF can differentiate)."""
    @tf.custom_gradient
    def f(x):
        def grad(dy):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = composed(x)
            return tape.gradient(y, x, output_gradients=dy)

        return fused(x), grad

    return f(x)


def rfft3d(x, fft_length):
    """Real 3-D DFT over the three innermost axes: x: (..., d, h, w) float32, zero-padded at the end to
    fft_length = (P, Q, R). Returns (..., P, Q, R // 2 + 1) complex64. TF's fused RFFT3D forward; its gradient
    (which TF does not register) through the same transform written as rfft + fft2d."""
    return _fused_differentiated_as(lambda t: tf.signal.rfft3d(t, fft_length=[int(n) for n in fft_length]),
                                    lambda t: _rfft3d_composed(t, fft_length), x)


def irfft3d(x, fft_length):
    """Inverse of `rfft3d`: x: (..., P, Q, R // 2 + 1) complex64 -> (..., P, Q, R) float32 (fused forward,
    gradient through ifft2d + irfft, as `rfft3d`)."""
    return _fused_differentiated_as(lambda z: tf.signal.irfft3d(z, fft_length=[int(n) for n in fft_length]),
                                    lambda z: _irfft3d_composed(z, fft_length), x)


def l2_norm(x):
    """sqrt(sum(x^2)) over all of x as a float32 scalar (NaN if x holds a NaN, Inf if it holds an Inf or if the
    sum of squares overflows, i.e. some |x| > ~1.8e19). An upper bound on max |x| at the cost of one read of
    x, the cheapest guard a per-call check can have.

    In TensorFlow's executor: EuclideanNorm, one pass without temporaries (x . x as one MatMul, the other
    one-pass form, took 0.95-1.27x its time on benchmarks/nonfinite_guard.py's four inputs, one run). Under
    XLA or for export (`_portable`): sum(square(x)), which XLA fuses into one pass and every converter has;
    EuclideanNorm has no XLA kernel and no ONNX, OpenVINO or LiteRT conversion."""
    x = tf.cast(x, tf.float32)
    if _portable():
        return tf.sqrt(tf.reduce_sum(tf.square(x)))
    return tf.math.reduce_euclidean_norm(x)


def conj(x):
    return tf.math.conj(x)


def _portable() -> bool:
    """True while tracing for XLA (`jit_compile=True`) or for an exported artifact (`exporting()`): places
    without TensorFlow's complex<->float Bitcast (XLA has no kernel for it; converters no rule)."""
    return bool(_EXPORTING) or (not tf.executing_eagerly()
                                   and control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))


def complex_as_real(z):
    """View z: (..., N) complex64 as (..., 2N) float32, real and imaginary parts interleaved
    (re_0, im_0, re_1, im_1, ...). A bitcast and a reshape, no copy, in TensorFlow's executor; under XLA or
    for export (see `_portable`) the parts are taken and interleaved (a copy XLA fuses). Differentiable (the
    gradient is the inverse view, TF's convention for complex inputs: d/d(re) + i d/d(im))."""
    if _portable():
        shape = tf.shape(z)
        pairs = tf.stack([tf.math.real(z), tf.math.imag(z)], -1)
        return tf.reshape(pairs, tf.concat([shape[:-1], [2 * shape[-1]]], 0))
    return _bitcast_complex_as_real(z)


def real_as_complex(r):
    """Inverse of `complex_as_real`: (..., 2N) float32 interleaved -> (..., N) complex64 (no copy, except
    under XLA or for export, as there)."""
    if _portable():
        shape = tf.shape(r)
        pairs = tf.reshape(r, tf.concat([shape[:-1], [shape[-1] // 2, 2]], 0))
        return tf.complex(pairs[..., 0], pairs[..., 1])
    return _bitcast_real_as_complex(r)


@tf.custom_gradient
def _bitcast_complex_as_real(z):
    shape = tf.shape(z)
    r = tf.reshape(tf.bitcast(z, tf.float32), tf.concat([shape[:-1], [2 * shape[-1]]], 0))

    def grad(upstream):
        return tf.bitcast(tf.reshape(upstream, tf.concat([shape, [2]], 0)), tf.complex64)

    return r, grad


@tf.custom_gradient
def _bitcast_real_as_complex(r):
    shape = tf.shape(r)
    z = tf.bitcast(tf.reshape(r, tf.concat([shape[:-1], [shape[-1] // 2, 2]], 0)), tf.complex64)

    def grad(upstream):
        return tf.reshape(tf.bitcast(upstream, tf.float32), shape)

    return z, grad


def real_block(b):
    """b: (..., K, N) complex64 -> (..., 2K, 2N) float32 R such that, for any a: (..., M, K) complex64,
    complex_as_real(a) @ R == complex_as_real(a @ b): rows (k, re) hold (Re b, Im b) and rows (k, im)
    hold (-Im b, Re b), interleaved like `complex_as_real`. Differentiable."""
    br, bi = tf.math.real(b), tf.math.imag(b)
    rows = tf.stack([tf.stack([br, bi], -1), tf.stack([-bi, br], -1)], -3)  # (..., K, 2, N, 2)
    shape = tf.shape(b)
    return tf.reshape(rows, tf.concat([shape[:-2], [2 * shape[-2], 2 * shape[-1]]], 0))


def real_block_matmul(a, block):
    """a: (..., M, K) complex64 @ b -> (..., M, N) complex64, where block = real_block(b): (..., 2K, 2N).

    One real float32 batched matmul on views of a and of the result (no split or join passes), which TF
    runs through oneDNN; measured on this 2-core CPU it beats TF's complex64 matmul (Eigen) on the FFT layers'
    per-bin products (e.g. 2850 x (8 x 32) @ (32 x 32)) even though the block reads 2x the bytes."""
    return real_as_complex(tf.linalg.matmul(complex_as_real(a), block))


def matmul(a, b):
    """Batched float32 matmul with broadcast batch dimensions (a (1, M, K) @ b (N, K, L) shares a), at full
    float32 precision on CPU (oneDNN). On an Ampere or newer GPU TensorFlow rounds the operands to TF32 unless
    `tf.config.experimental.enable_tensor_float_32_execution(False)` (~1e-3 relative error: verification then
    refuses the site at a float32 tolerance; GPUs are reached through the JAX backend here, which asks for
    float32 per call)."""
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
            self.aux = tf.Variable(0.0, trainable=False, name="aux")  # a scalar derived with value (see cached_transform)

    def invalidate(self):
        self.valid.assign(False)


_EXPORTING = []  # the formats of the open `exporting()` contexts, outermost first

_REAL_FORMATS = frozenset({"onnx", "openvino", "litert"})
"""Export formats whose converters take no complex tensors: an FFT layer traced for them computes its
transforms as real matrix products on (real, imaginary) pairs (`layers/real_dft.py`)."""


@contextlib.contextmanager
def exporting(fmt="tf_saved_model"):
    """Within: functions traced for an exported inference artifact of format `fmt` (Keras's `model.export`,
    an `ExportArchive`) take each kernel's transform as a constant computed once, at trace time, from the
    kernel's current value (see `cached_transform`). Such an artifact then holds no cache variables, no
    variable assignment inside a cond and no bitwise kernel comparison: ops that XLA, ONNX, OpenVINO and
    LiteRT converters lack, and a SavedModel cannot restore the cache's state into anyway."""
    _EXPORTING.append(fmt)
    try:
        yield
    finally:
        _EXPORTING.pop()


def export_format():
    """The format being traced for (see `exporting`), or None outside an export: the outermost export's, since
    Keras writes ONNX and LiteRT through a SavedModel export of its own, nested inside."""
    return _EXPORTING[0] if _EXPORTING else None


def real_arithmetic() -> bool:
    """True while tracing for ONNX, OpenVINO or LiteRT, whose converters take no complex tensors."""
    return export_format() in _REAL_FORMATS and not tf.executing_eagerly()


def _constant_transform(kernel_fn, compute, aux):
    """compute(kernel) (and aux(kernel)) evaluated now, outside the function being traced, as constants of it.
    For a format without complex tensors (`real_arithmetic`) a complex value becomes (2, ...) float32: its
    real and imaginary parts stacked on a new leading axis."""
    pairs = real_arithmetic()
    with tf.init_scope():
        k = tf.convert_to_tensor(kernel_fn(), tf.float32)
        value = np.asarray(compute(k))
        if pairs and np.iscomplexobj(value):
            value = np.stack([value.real, value.imag]).astype(np.float32)
        extra = None if aux is None else np.float32(tf.cast(aux(k), tf.float32))
    value = tf.constant(value)
    return value if aux is None else (value, tf.constant(extra))


def cached_transform(kernel, cache: SpectrumCache, compute, aux=None):
    """compute(kernel), taken from `cache` when `kernel` is bit-identical to the kernel cached last.

    kernel: float32 tensor (the layer's current kernel value), or a function of no arguments returning it;
    compute: a differentiable function of it (e.g. its FFT). Given as a function, the kernel is read where
    the transform is needed: while a function is traced for export (`exporting()`), that is once, at trace
    time, and the transform becomes a constant of the traced function (no gradient flows to the kernel
    there: an exported artifact is for inference). The check reads the whole kernel (kh*kw*Cin*Cout values), far
    cheaper than the transform, and it is exact: whatever changed the kernel (fit, set_weights, load_weights,
    `kernel.assign`, an optimizer step inside the same tf.function) changes its bits, so a stale
    transform is never returned. On a miss the transform is recomputed and stored.

    Gradients flow to `kernel` as if compute(kernel) had been evaluated: the backward pass recomputes
    compute's vector-Jacobian product, so a GradientTape around an inference-mode call still trains.

    aux: optionally a function of the kernel giving a float32 scalar (no gradient), cached beside the transform
    under the same key; then (transform, aux scalar) is returned.
    """
    if callable(kernel):
        if _EXPORTING and not tf.executing_eagerly():
            return _constant_transform(kernel, compute, aux)
        kernel = kernel()
    kernel = tf.convert_to_tensor(kernel, tf.float32)

    @tf.custom_gradient
    def lookup(k):
        def refresh():
            value = compute(k)
            updates = [cache.value.assign(value), cache.key.assign(k), cache.valid.assign(True)]
            if aux is not None:
                updates.append(cache.aux.assign(tf.cast(aux(k), tf.float32)))
            with tf.control_dependencies(updates):
                return tf.identity(value)

        hit = tf.logical_and(cache.valid, bits_equal(k, cache.key))
        value = tf.cond(hit, lambda: tf.identity(cache.value.read_value()), refresh)

        def grad(upstream):
            with tf.GradientTape() as tape:
                tape.watch(k)
                recomputed = compute(k)
            return tape.gradient(recomputed, k, output_gradients=upstream)

        return value, grad

    value = lookup(kernel)
    if aux is None:
        return value
    with tf.control_dependencies([value]):  # read after a refresh has stored it
        return value, tf.identity(cache.aux.read_value())


# ---- PAC: run-time resize and op ordering ---------------------------------------------------------
def resize_bilinear(images, size):
    """images: (N, H, W, C) float32 -> (N, size[0], size[1], C), bilinear, half-pixel centres, no antialiasing.

    `size` may hold scalar tensors known only at run time (keras.ops.image.resize needs Python ints).
    Same arithmetic as keras.ops.image.resize(..., interpolation="bilinear", antialias=False); to the
    same size it is the identity, bit for bit (every sample lands on a pixel, its neighbour weighs 0)."""
    return tf.image.resize(images, tf.stack([size[0], size[1]]), method="bilinear", antialias=False)


def after(deps, fn):
    """fn() with every op it creates ordered after the tensors `deps` (a list; None entries are skipped).

    Graph mode: tf.control_dependencies, so the executor cannot start fn's ops early and keep their
    results alive (the PAC shift strategy slices tap t only once the partial sum of taps < t exists).
    Eager mode runs ops in program order already; fn() is just called."""
    deps = [d for d in deps if d is not None]
    if not deps or tf.executing_eagerly():
        return fn()
    with tf.control_dependencies(deps):
        return fn()


def jit(fn):
    """fn as an XLA-compiled function (tf.function(jit_compile=True)); fn must be a pure tensor function.

    For PAC's many small per-tap ops (slices, differences, scaled adds), which XLA fuses into a few loops
    and runs several times faster than as separate TF ops on CPU; the large matmuls stay outside (TF's
    oneDNN kernels beat XLA's CPU matmul). Works eagerly, inside an outer tf.function (also one with
    unknown spatial sizes: XLA compiles once per concrete input shape and caches it), under autodiff
    (the gradient is compiled too) and in any float dtype. Non-tensor arguments must be hashable
    Python values (ints, tuples); each distinct value traces once."""
    return tf.function(fn, jit_compile=True, autograph=False)


def custom_gradient(forward, backward):
    """f(*tensors) = forward(*tensors), whose gradient is backward(*tensors, upstream) -> one per tensor.

    (tf.custom_gradient; first-order only: the gradient itself is not differentiated.)"""
    @tf.custom_gradient
    def f(*args):
        def grad(upstream):
            return backward(*args, upstream)

        return forward(*args), grad

    return f
