"""The backend operations on JAX (see `convrewrite.layers.backend` for the interface).

Everything in convrewrite that calls JAX directly lives here. Same names, shapes and semantics as
`tensorflow_ops`, whose docstrings are the contract; what differs on JAX is said per function:

- compiled calls (`graph_function`) pass the layers' variables as arguments of one `jax.jit`, as Keras's
  own JAX trainer does, so that a timing sees weights as inputs (XLA cannot fold weight-only work, such as a
  kernel's spectrum, into constants);
- there is no spectrum cache between calls (`cached_transform` computes in every call): a JAX computation is a pure function
  of its inputs, and inside `predict` / `fit` the weights are traced inputs, so the kernel spectrum is
  recomputed in every call (part of every timing the profiler takes on JAX, so plans account for it);
- shapes are always static, so `frame` and `resize_bilinear` take Python sizes, and `after` is a no-op (XLA
  schedules one fused computation).
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import keras
from jax import lax

__all__ = [
    "rfft2d", "irfft2d", "rfft", "irfft", "rfft3d", "irfft3d", "complex_as_real", "real_as_complex", "real_block",
    "real_block_matmul", "matmul", "complex_multiply", "conj", "frame", "bits_equal", "l2_norm",
    "SpectrumCache", "cached_transform", "exporting", "export_format", "real_arithmetic",
    "resize_bilinear", "after", "device_details", "graph_function",
    "forward_backward", "jit", "custom_gradient", "wait_for",
]


# ---- compiled calls for timing -------------------------------------------------------------------
def _unique_variables(layers):
    seen, out = set(), []
    for layer in layers:
        for v in layer.variables:
            if id(v) not in seen:
                seen.add(id(v))
                out.append(v)
    return out


def graph_function(fn, layers=()):
    """`fn` compiled with `jax.jit`, the variables of `layers` passed as arguments (read when called, so
    later weight changes are seen) and bound inside through `keras.StatelessScope`. Variables fn reads that
    are not among them are compiled in as constants. While one of `layers` is not built yet, fn runs
    eagerly (which builds it: variables created inside a trace would hold traced values)."""
    layers = list(layers)
    state = {}

    def body(values, *args):
        with keras.StatelessScope(state_mapping=list(zip(state["variables"], values))):
            return fn(*args)

    def call(*args):
        if not all(layer.built for layer in layers):
            return fn(*args)
        if "variables" not in state:
            state["variables"], state["compiled"] = _unique_variables(layers), jax.jit(body)
        return state["compiled"]([v.value for v in state["variables"]], *args)

    return call


def wait_for(result):
    """Wait until every array in `result` (any nesting) is computed (jax.block_until_ready: no copy)."""
    jax.block_until_ready(result)


def forward_backward(call, x, variables):
    """`call(x)` forward, then the gradients of sum(call(x)) with respect to `x` and `variables` (Keras
    variables, bound to traced values through `keras.StatelessScope`). Returns the gradients."""
    variables = list(variables)

    def loss(t, values):
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            return jnp.sum(call(t).astype(jnp.float32))

    gx, gv = jax.grad(loss, argnums=(0, 1))(x, [v.value for v in variables])
    return [gx, *gv]


# ---- device identity ------------------------------------------------------------------------------
def _cuda_versions():
    """(CUDA runtime, cuDNN) versions jaxlib's CUDA plugin reports, or (None, None)."""
    try:
        from jax._src.lib import cuda_versions  # private: absent from CPU builds and possibly renamed later
    except ImportError:
        return None, None
    if cuda_versions is None:
        return None, None
    out = []
    for name in ("cuda_runtime_get_version", "cudnn_get_version"):
        try:
            out.append(getattr(cuda_versions, name)())
        except Exception:  # noqa: BLE001 - a version is informative only
            out.append(None)
    return tuple(out)


def device_details():
    """("jax", its version, GPU details or None) for `convrewrite.device.fingerprint`, GPU details as on
    TensorFlow: {"name", "compute_capability": [major, minor], "count", "cuda", "cudnn"} of the first device,
    when JAX's default device is a GPU."""
    devices = jax.devices()
    dev = devices[0]
    if dev.platform == "cpu":
        return "jax", jax.__version__, None
    capability = str(getattr(dev, "compute_capability", "") or "")
    cuda, cudnn = _cuda_versions()
    return "jax", jax.__version__, {"name": dev.device_kind,
                                    "compute_capability": [int(p) for p in capability.split(".") if p.isdigit()],
                                    "count": len(devices), "cuda": cuda, "cudnn": cudnn}


# ---- transforms -----------------------------------------------------------------------------------
def rfft2d(x, fft_length):
    return jnp.fft.rfft2(x, s=(int(fft_length[0]), int(fft_length[1])), axes=(-2, -1))


def irfft2d(x, fft_length):
    return jnp.fft.irfft2(x, s=(int(fft_length[0]), int(fft_length[1])), axes=(-2, -1))


def rfft(x, fft_length):
    return jnp.fft.rfft(x, n=int(fft_length), axis=-1)


def irfft(x, fft_length):
    return jnp.fft.irfft(x, n=int(fft_length), axis=-1)


def rfft3d(x, fft_length):
    return jnp.fft.rfftn(x, s=tuple(int(n) for n in fft_length), axes=(-3, -2, -1))


def irfft3d(x, fft_length):
    return jnp.fft.irfftn(x, s=tuple(int(n) for n in fft_length), axes=(-3, -2, -1))


def l2_norm(x):
    """sqrt(sum(x^2)) over all of x (NaN / Inf propagate, as on TensorFlow); XLA fuses it into one pass."""
    return jnp.sqrt(jnp.sum(jnp.square(x)))


def conj(x):
    return jnp.conj(x)


def complex_as_real(z):
    """(..., N) complex64 -> (..., 2N) float32, (re, im) interleaved. (A copy that XLA fuses into its
    consumer; JAX cannot bitcast complex values.)"""
    return jnp.stack([jnp.real(z), jnp.imag(z)], axis=-1).reshape(z.shape[:-1] + (2 * z.shape[-1],))


def real_as_complex(r):
    """Inverse of `complex_as_real`: (..., 2N) float32 interleaved -> (..., N) complex64."""
    pairs = r.reshape(r.shape[:-1] + (r.shape[-1] // 2, 2))
    return lax.complex(pairs[..., 0], pairs[..., 1])


def real_block(b):
    br, bi = jnp.real(b), jnp.imag(b)
    rows = jnp.stack([jnp.stack([br, bi], -1), jnp.stack([-bi, br], -1)], -3)  # (..., K, 2, N, 2)
    return rows.reshape(b.shape[:-2] + (2 * b.shape[-2], 2 * b.shape[-1]))


def real_block_matmul(a, block):
    """a: (..., M, K) complex64 @ b -> (..., M, N) complex64 with block = real_block(b), as one real matmul
    at float32 precision (`precision="highest"`: on GPUs JAX's default would round operands to TF32)."""
    return real_as_complex(jnp.matmul(complex_as_real(a), block, precision=lax.Precision.HIGHEST))


def matmul(a, b):
    """Batched float32 matmul with broadcast batch dimensions, at float32 precision (`precision="highest"`:
    on GPUs JAX's default would round the operands to TF32)."""
    return jnp.matmul(a, b, precision=lax.Precision.HIGHEST)


def complex_multiply(a, b):
    return a * b


def frame(x, length, step, axis):
    """Overlapping windows along `axis`: (..., n, ...) -> (..., num, length, ...), one gather."""
    axis = axis % x.ndim
    n = x.shape[axis]
    num = (n - int(length)) // int(step) + 1
    index = (jnp.arange(num) * int(step))[:, None] + jnp.arange(int(length))[None, :]
    return jnp.take(x, index, axis=axis)


def bits_equal(a, b):
    a = lax.bitcast_convert_type(jnp.asarray(a, jnp.float32), jnp.int32)
    b = lax.bitcast_convert_type(jnp.asarray(b, jnp.float32), jnp.int32)
    return jnp.all(a == b)


# ---- the kernel spectrum (no cache on JAX) ----------------------------------------------------------
class SpectrumCache:
    """The TensorFlow cache's interface with nothing cached (see the module docstring): layers create one
    at build as they do on TensorFlow, and `cached_transform` computes the transform each call."""

    def __init__(self, key_shape, value_shape, value_dtype, name="spectrum_cache"):
        self.key_shape, self.value_shape, self.value_dtype, self.name = key_shape, value_shape, value_dtype, name

    def invalidate(self):
        pass


@contextlib.contextmanager
def exporting(fmt="tf_saved_model"):
    """Nothing to change on JAX: no cache state exists, and an export (jax2tf) traces the transform as a
    function of the kernel, as every call computes it."""
    yield


def export_format():
    """None: the layers trace the same on JAX whatever an export writes (see `exporting`)."""
    return None


def real_arithmetic() -> bool:
    """False: JAX exports only a SavedModel (through jax2tf), which takes complex tensors."""
    return False


def cached_transform(kernel, cache: SpectrumCache, compute, aux=None):
    """compute(kernel) (and the float32 scalar aux(kernel), without gradient, when `aux` is given), computed
    in this call: never stale, and differentiable as compute is. (kernel: a tensor or a function returning it.)"""
    kernel = jnp.asarray(kernel() if callable(kernel) else kernel, jnp.float32)
    value = compute(kernel)
    if aux is None:
        return value
    return value, lax.stop_gradient(jnp.asarray(aux(kernel), jnp.float32))


# ---- PAC: resize and op ordering ------------------------------------------------------------------
def resize_bilinear(images, size):
    """images: (N, H, W, C) -> (N, size[0], size[1], C): bilinear, half-pixel centres, no antialiasing (the
    arithmetic of TensorFlow's resize and of keras.ops.image.resize). Sizes are Python ints on JAX."""
    n, _, _, c = images.shape
    return jax.image.resize(images, (n, int(size[0]), int(size[1]), c), method="linear", antialias=False)


def after(deps, fn):
    """fn(): XLA orders one computation's ops itself (no control dependencies to add)."""
    return fn()


def jit(fn):
    """fn itself: on JAX the whole layer runs inside the caller's jit (Keras compiles predict / fit), where
    XLA fuses fn's small ops as TensorFlow's `jit` does; a separate jit here would need static arguments."""
    return fn


def custom_gradient(forward, backward):
    """f(*arrays) = forward(*arrays), whose gradient is backward(*arrays, upstream) -> one per array
    (jax.custom_vjp; first-order only, as on TensorFlow)."""
    f = jax.custom_vjp(lambda *args: forward(*args))
    f.defvjp(lambda *args: (forward(*args), args), lambda saved, upstream: tuple(backward(*saved, upstream)))
    return f
